"""img2img (sdrt.img2img, sdrt.images): the web UI's step rule, its resize modes and batch rule,
parity with diffusers' img2img pipeline where the two agree, the static loop, the compiled
backends, and bad images."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import sdrt
from sdrt.images import load_image, resize_image
from sdrt.img2img import img2img_sigmas, img2img_steps
from sdrt.params import GenerationParams


def _image(w=64, h=64, seed=0, mode="RGB"):
    a = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(a).convert(mode)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


ARGS = dict(prompt="a [cat:dog:0.5]", steps=20, seed=3, width=64, height=64, sampler="Euler", schedule="Karras",
            rng="cpu", cfg_scale=7.0)


@pytest.mark.parametrize("steps,strength,fix,planned,run", [
    (20, 0.75, False, 20, 16),      # t_enc = 15: the last 16 steps of a 20-step schedule
    (20, 1.0, False, 20, 20),       # min(s, 0.999): all 20
    (20, 0.0, False, 20, 1),        # the last step only
    (20, 0.5, True, 40, 20),        # img2img_fix_steps: the requested steps run
    (20, 0.75, True, 26, 20),
    (7, 0.3, False, 7, 3),
])
def test_the_web_uis_step_rule(steps, strength, fix, planned, run):
    n, t_enc = img2img_steps(steps, strength, fix)
    assert n == planned
    full = np.linspace(14.6, 0.0, n + 1)
    sig = img2img_sigmas(full, t_enc)
    assert len(sig) - 1 == run and sig[-1] == 0.0 and np.array_equal(sig, full[n - t_enc - 1:])
    with pytest.raises(ValueError, match="img2img_fix_steps"):
        img2img_steps(20, 0.0, True)


def _ours_and_diffusers(pipe):
    """sdrt's img2img at strength 0.75 (20 Karras steps), and a function giving diffusers' img2img
    pipeline (SD or SDXL) at a strength, from the init latent sdrt sampled (given as latents) and
    the same CPU generator for the noise."""
    import diffusers

    from sdrt.bench.harness import _BETAS
    c = pipe.components
    params = GenerationParams(init_images=_image(), denoising_strength=0.75, **{**ARGS, "prompt": "a cat"})
    latents = pipe.encode_images(pipe.validate(params))
    ours = pipe(params).pixels
    sched = diffusers.EulerDiscreteScheduler(**_BETAS, use_karras_sigmas=True, timestep_spacing="linspace")
    if c.is_sdxl:
        ref = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=sched, requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=True)
    else:
        ref = diffusers.StableDiffusionImg2ImgPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)

    def run(strength):
        return ref("a cat", image=latents, strength=strength, num_inference_steps=20, guidance_scale=7.0,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
    return ours, run


def test_same_as_diffusers_img2img_at_the_strength_that_runs_the_same_steps(tiny):
    """The web UI at strength 0.75 (20 steps) runs the last 16 steps: diffusers at 0.8 runs those;
    diffusers at 0.75 runs 15 and gives another image."""
    ours, run = _ours_and_diffusers(tiny)
    assert np.abs(run(0.8) - ours).max() < 1e-4
    assert np.abs(run(0.75) - ours).max() > 1e-2


def test_strength_and_noise_multiplier_and_the_infotext(tiny):
    img = _image()
    calls = []
    r = tiny(init_images=img, denoising_strength=0.5, initial_noise_multiplier=0.9,
             callback=lambda i, n: calls.append((i, n)), **ARGS)
    assert calls[-1] == (11, 11)                      # t_enc = 10: 11 steps
    text = r.infotexts[0]
    assert "Denoising strength: 0.5" in text and "Noise multiplier: 0.9" in text and "Steps: 20" in text
    assert r.timings["vae_encode"] > 0
    txt = tiny(**ARGS)
    assert "Denoising strength" not in txt.infotexts[0]
    low = tiny(init_images=img, denoising_strength=0.05, **ARGS).pixels[0]
    high = tiny(init_images=img, denoising_strength=0.95, **ARGS).pixels[0]
    # the VAE of the tiny model is random: compare against its own round trip of the image
    job = tiny.validate(GenerationParams(init_images=img, **ARGS))
    trip = tiny.decode(tiny.encode_images(job)).pixels[0]
    assert np.abs(low - trip).mean() < np.abs(high - trip).mean()
    fixed = []
    tiny(init_images=img, denoising_strength=0.5, img2img_fix_steps=True, callback=lambda i, n: fixed.append(n),
         **ARGS)
    assert fixed[-1] == 20


def test_prompt_editing_counts_the_requested_steps(tiny):
    job = tiny.validate(GenerationParams(init_images=_image(), denoising_strength=0.75, **ARGS))
    assert len(job.sigmas) - 1 == 16 and job.model_calls == 20
    # at step 10 of 20 the prompt becomes "dog": in the 16 steps run, after the 11th
    pos, _, _ = tiny._prompt_schedules(job)
    assert [end for end, _ in pos[0]] == [10, 20]


def test_a_seed_repeats_and_the_batch_rule(tiny):
    a = tiny(init_images=_image(), **ARGS)
    b = tiny(init_images=_png(_image()), **ARGS)             # the same picture as PNG bytes
    assert np.array_equal(a.pixels, b.pixels)
    r = tiny(init_images=_image(), batch_size=3, **ARGS)
    assert len(r.images) == 3 and r.seeds == [3, 4, 5]
    r = tiny(init_images=[_image(seed=1), _image(seed=2)], batch_size=4, **ARGS)
    assert len(r.images) == 2                                # fewer images make the batch
    with pytest.raises(ValueError, match="3 images for a batch of 2"):
        tiny.validate(GenerationParams(init_images=[_image()] * 3, batch_size=2, **ARGS))
    two = tiny(init_images=[_image(seed=1), _image(seed=2)], **{**ARGS, "prompt": ["a", "b"]})
    assert len(two.images) == 2 and not np.array_equal(two.pixels[0], two.pixels[1])
    with pytest.raises(ValueError, match="init_images is empty"):
        tiny.validate(GenerationParams(init_images=[], **ARGS))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM"])
def test_static_loop_equals_the_eager_loop(torch_pipe, sampler):
    from loops import eager_and_static
    args = dict(ARGS, sampler=sampler, schedule="Automatic", init_images=_image(seed=4), denoising_strength=0.6)
    eager, static, built = eager_and_static(torch_pipe, **args)
    assert built == 1 and np.abs(static - eager).max() < 1e-4


def test_resize_modes_follow_the_web_ui():
    wide = Image.new("RGB", (128, 64))
    wide.paste((255, 0, 0), (0, 0, 64, 64))
    wide.paste((0, 0, 255), (64, 0, 128, 64))
    assert resize_image(0, wide, 64, 64).size == (64, 64)
    crop = np.asarray(resize_image(1, wide, 64, 64), dtype=int)         # covers, crops the centre
    assert crop.shape == (64, 64, 3) and crop[32, 2, 0] > 200 and crop[32, 61, 2] > 200
    fill = np.asarray(resize_image(2, wide, 64, 64), dtype=int)         # fits, fills top and bottom
    assert fill.shape == (64, 64, 3)
    top, bottom = fill[:16], fill[48:]
    assert (top == top[:1]).all() and (bottom == bottom[:1]).all()      # the edge rows, stretched
    tall = np.asarray(resize_image(2, wide.transpose(Image.Transpose.ROTATE_90), 64, 64), dtype=int)
    assert (tall[:, :16] == tall[:, :1]).all()
    with pytest.raises(ValueError, match="resize_mode 7"):
        resize_image(7, wide, 64, 64)


def test_latent_upscale_mode_encodes_at_the_images_own_size(tiny):
    job = tiny.validate(GenerationParams(init_images=_image(96, 48), resize_mode=3, **ARGS))
    assert job.init_images[0].size == (96, 48)
    assert tuple(tiny.encode_images(job).shape) == (1, 4, 8, 8)
    assert len(tiny(init_images=_image(90, 50), resize_mode=3, **ARGS).images) == 1   # rounded to the factor


def _gif(frames: int) -> bytes:
    buf = io.BytesIO()
    imgs = [_image(16, 16, seed=i).convert("P") for i in range(frames)]
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:])
    return buf.getvalue()


@pytest.mark.parametrize("value,match", [
    (b"not an image at all", "not a readable image"),
    (_png(_image())[:200], "not a readable image"),                       # truncated
    (_png(_image(1, 1)), "too small"),
    (_image(16, 16).convert("CMYK"), "'CMYK' is not supported"),
    (Image.new("I;16", (16, 16)), "'I;16' is not supported"),
    (_gif(3), "animated"),
    ("data:image/png;base64,@@@not-base64@@@", "not base64"),
    ("data:image/png,rawtext", "must be base64"),
    (12345, "give a PIL image"),
    (np.zeros((8, 8, 2), np.uint8), "an array must be uint8"),
])
def test_bad_images_are_named(value, match):
    with pytest.raises(ValueError, match=match):
        load_image(value, "init_images[0]")


def test_images_from_every_form(tmp_path):
    img = _image(16, 16)
    png = _png(img)
    path = tmp_path / "x.png"
    path.write_bytes(png)
    b64 = base64.b64encode(png).decode()
    forms = [img, png, str(path), path, b64, "data:image/png;base64," + b64, np.asarray(img)]
    for form in forms:
        assert np.array_equal(np.asarray(load_image(form)), np.asarray(img))
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))           # transparent: flattened over white
    assert np.asarray(load_image(rgba)).min() == 255


@pytest.mark.slow
def test_onnxruntime_builds_the_encoder_on_first_use(tiny, tmp_path):
    from sdrt.export import Profile, build_onnxruntime, read_manifest
    build_onnxruntime(tiny.components, tmp_path, profile=Profile(batch=(1, 1, 2), height=(32, 64, 64),
                                                                 width=(32, 64, 64), windows=(1, 1, 1)),
                      log=lambda m: None)
    assert "vae_encoder" not in read_manifest(tmp_path)["networks"]
    ort = sdrt.Pipeline.from_pretrained("random:tiny", backend="onnxruntime", engine_dir=str(tmp_path))
    args = dict(ARGS, init_images=_image(seed=6), denoising_strength=0.6)
    a, b = tiny(**args).pixels, ort(**args).pixels
    assert "vae_encoder" in read_manifest(tmp_path)["networks"]
    assert np.abs(a - b).max() < 1e-3
    with pytest.raises(ValueError, match="profile"):
        ort(**dict(args, init_images=_image(96, 48), resize_mode=3))      # the encoder's size is outside it


def test_tensorrt_fake_builds_the_encoder_on_first_use(torch_pipe, trt_engines):
    import tensorrt_fake as fake

    from sdrt.backends import tensorrt_backend as tb
    backend = tb.TensorRTBackend(torch_pipe.components, torch.device("cpu"), torch.float32, trt_engines,
                                 trt=fake.module(), arch="sm_90", log=lambda m: None)
    pipe = sdrt.Pipeline(torch_pipe.components, backend)
    args = dict(ARGS, init_images=_image(seed=7), denoising_strength=0.6)
    assert np.abs(pipe(**args).pixels - torch_pipe(**args).pixels).max() < 1e-4
    assert "vae_encoder" in backend.engines


def test_cli_img2img(tmp_path):
    from sdrt.cli import main
    src = tmp_path / "in.png"
    _image().save(src)
    out = tmp_path / "out.png"
    assert main(["generate", "a lighthouse", "--model", "random:tiny", "--steps", "4", "--quiet", "--width", "64",
                 "--height", "64", "--init-image", str(src), "--strength", "0.5", "-o", str(out)]) == 0
    assert "Denoising strength: 0.5" in Image.open(out).info["parameters"]
    assert main(["generate", "a lighthouse", "--model", "random:tiny", "--init-image", str(tmp_path / "nope.png"),
                 "-o", str(tmp_path / "x.png")]) != 0


@pytest.mark.slow
def test_sdxl_img2img_equals_diffusers_and_every_workflow_runs():
    """SDXL: img2img equals diffusers' StableDiffusionXLImg2ImgPipeline at the strength that runs
    the same steps (size conditioning at the output size, zeros for the empty negative prompt);
    inpainting keeps the pixels outside the mask, also on the static loop; the hires fix and
    tiling run."""
    pipe = sdrt.Pipeline.from_pretrained("random:sdxl-tiny")
    ours, run = _ours_and_diffusers(pipe)
    assert np.abs(run(0.8) - ours).max() < 1e-4
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    args = dict(ARGS, steps=4, init_images=_image(seed=2), mask=mask, mask_blur=0, inpaint_full_res=False)
    from loops import eager_and_static
    eager, static, built = eager_and_static(pipe, **args)
    src = np.asarray(_image(seed=2), dtype=np.float32) / 255.0
    assert built == 1 and np.abs(eager - static).max() < 1e-4
    assert np.array_equal(np.asarray(pipe(**args).images[0])[:, 32:], np.asarray(_image(seed=2))[:, 32:])
    assert np.abs(eager[0][:, :32] - src[:, :32]).mean() > 0.01
    assert pipe(**dict(ARGS, steps=3), enable_hr=True, hr_scale=1.5, denoising_strength=0.5).images[0].size == (96, 96)
    assert "Tiling: True" in pipe(**dict(ARGS, steps=2), tiling=True).infotexts[0]
