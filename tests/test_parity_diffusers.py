"""The torch backend's images equal diffusers' StableDiffusionPipeline for the same weights,
initial noise and settings, with the scheduler that implements the same algorithm and sigmas."""
import numpy as np
import torch

SEED, STEPS, SIZE = 3, 12, 64
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def diffusers_images(pipe, scheduler, prompt, negative, cfg, seed=SEED):
    from diffusers import StableDiffusionPipeline

    c = pipe.components
    ref = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                  scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    f = c.latent_factor
    noise = torch.randn((1, 4, SIZE // f, SIZE // f), generator=torch.Generator().manual_seed(seed))
    out = ref(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=cfg,
              height=SIZE, width=SIZE, latents=noise, output_type="np")
    return out.images


def check(tiny, scheduler, cfg=7.5, prompt="a photo of an astronaut riding a horse", negative="", **ours):
    ref = diffusers_images(tiny, scheduler, prompt, negative, cfg)
    res = tiny(prompt, negative_prompt=negative, steps=STEPS, cfg_scale=cfg, seed=SEED, width=SIZE,
               height=SIZE, rng="cpu", **ours)
    assert res.pixels.shape == ref.shape
    err = np.abs(res.pixels - ref).max()
    assert err <= 1e-4, f"max abs difference {err:.3g}"
    assert ref.std() > 0.01   # not a flat image: the comparison means something


def test_ddim(tiny):
    from diffusers import DDIMScheduler
    check(tiny, DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
          sampler="DDIM", negative="blurry, low quality")


def test_euler_karras(tiny):
    from diffusers import EulerDiscreteScheduler
    check(tiny, EulerDiscreteScheduler(**BETAS, use_karras_sigmas=True, timestep_spacing="linspace"),
          sampler="Euler", schedule="Karras", cfg=5.0)


def test_unipc_web_ui_defaults(tiny):
    """UniPC as the web UI runs it (bh1, order 3) over diffusers' own sigmas. diffusers' bh1
    divides by -inf on a final sigma of 0 (NaN image), so its schedule ends at sigma_min here."""
    from diffusers import UniPCMultistepScheduler
    cfg = dict(BETAS, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")
    sched = UniPCMultistepScheduler(**cfg)
    sched.set_timesteps(STEPS)
    check(tiny, UniPCMultistepScheduler(**cfg), sampler="UniPC", sigmas=sched.sigmas.double().numpy())


def test_v_prediction_euler(tmp_path):
    """A v-prediction model (SD 2.x style): the denoiser's v scalings agree with diffusers."""
    from diffusers import EulerDiscreteScheduler

    import sdrt
    from sdrt.models import build_random
    from sdrt.schedules import DiscreteSchedule

    c = build_random("tiny")
    c.schedule = DiscreteSchedule.from_config(**BETAS, prediction_type="v_prediction")
    pipe = sdrt.Pipeline(c, sdrt.backends.create_backend("torch", c, "cpu", "float32"))
    check(pipe, EulerDiscreteScheduler(**BETAS, use_karras_sigmas=True, timestep_spacing="linspace",
                                       prediction_type="v_prediction"),
          sampler="Euler", schedule="Karras")
