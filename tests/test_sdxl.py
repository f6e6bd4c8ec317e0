"""SDXL: two text encoders, the pooled text and the size conditioning, against diffusers'
StableDiffusionXLPipeline on the same weights and noise (float32), and the web UI's rules where
they differ from diffusers (an empty negative prompt, long prompts, emphasis on each encoder)."""
import json

import numpy as np
import pytest
import torch

import sdrt
from sdrt.conditioning import pack_added, sdxl_time_ids, unpack_added

SEED, STEPS, SIZE = 3, 8, 64
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def xl():
    return sdrt.Pipeline.from_pretrained("random:sdxl-tiny")


def diffusers_xl(pipe, prompt, negative, cfg=6.0, size=SIZE, **kwargs):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    c = pipe.components
    ref = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                    tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                    scheduler=EulerDiscreteScheduler(**BETAS, use_karras_sigmas=True,
                                                                     timestep_spacing="linspace"),
                                    force_zeros_for_empty_prompt=True)
    ref.set_progress_bar_config(disable=True)
    f = c.latent_factor
    noise = torch.randn((1, 4, size // f, size // f), generator=torch.Generator().manual_seed(SEED))
    return ref(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=cfg, height=size,
               width=size, latents=noise, output_type="np", **kwargs).images


def ours(pipe, prompt, negative, cfg=6.0, size=SIZE, **kwargs):
    return pipe(prompt, negative_prompt=negative, steps=STEPS, cfg_scale=cfg, seed=SEED, width=size, height=size,
                rng="cpu", sampler="Euler", schedule="Karras", **kwargs).pixels


@pytest.mark.parametrize("negative", ["blurry, low quality", None])
def test_equals_diffusers(xl, negative):
    """A non-empty negative prompt is encoded by both; none at all (diffusers) is the web UI's
    empty negative prompt: zero text and pooled embeddings."""
    ref = diffusers_xl(xl, "a photo of an astronaut riding a horse", negative)
    got = ours(xl, "a photo of an astronaut riding a horse", negative or "")
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4
    assert ref.std() > 0.01


def test_size_conditioning_reaches_the_unet(xl):
    """Another size gives other size values in the added embedding (not only other noise): the
    same latents with the size values of 96x96 give another image."""
    c = xl.components
    hidden = torch.randn(2, 77, 64)
    pooled = torch.randn(2, 32)
    a = torch.stack([pack_added(h, p, sdxl_time_ids(64, 64)) for h, p in zip(hidden, pooled)])
    b = torch.stack([pack_added(h, p, sdxl_time_ids(96, 96)) for h, p in zip(hidden, pooled)])
    h, p, t = unpack_added(a, 32)
    assert torch.equal(h, hidden) and torch.equal(p, pooled) and t[0].tolist() == [64, 64, 0, 0, 64, 64]
    x = torch.randn(2, 4, 8, 8)
    ts = torch.full((2,), 500.0)
    assert not torch.allclose(xl.backend.unet(x, ts, a), xl.backend.unet(x, ts, b))
    ref = c.unet(x, ts, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": t},
                 return_dict=False)[0]
    assert torch.allclose(xl.backend.unet(x, ts, a), ref, atol=1e-6)


def test_empty_negative_is_zero_per_image(xl):
    """The web UI zeroes an empty negative prompt's embeddings; sdrt decides per image, so an image
    whose negative prompt is empty is the same alone or beside one that has a negative prompt."""
    alone = xl("a cat", negative_prompt="", steps=3, seed=5, width=SIZE, height=SIZE).pixels[0]
    mixed = xl(["a cat", "a cat"], negative_prompt=["", "ugly"], steps=3, seed=[5, 6], width=SIZE,
               height=SIZE).pixels
    assert np.abs(mixed[0] - alone).max() <= 1e-5
    encoded = xl("a cat", negative_prompt="", steps=3, seed=5, width=SIZE, height=SIZE, cfg_scale=7.0)
    job = xl.validate(sdrt.GenerationParams("a cat", negative_prompt="", steps=3, seed=5, width=SIZE, height=SIZE))
    cond = xl.encode(job)
    ctx = cond.uncond[0][0][1]
    assert float(ctx[:-1].abs().max()) == 0.0 and float(ctx[-1, :32].abs().max()) == 0.0
    assert ctx[-1, 32:38].tolist() == [64, 64, 0, 0, 64, 64]
    assert encoded.images[0].size == (SIZE, SIZE)


def test_long_prompt_and_emphasis_per_encoder(xl):
    """Windows of 75 tokens on both encoders (the pooled text from the first window), and the
    emphasis rescaled on each encoder's own output as the web UI's two embedders do."""
    from sdrt.conditioning import apply_emphasis, encode_texts_sdxl, tokenize_weighted
    c = xl.components
    long = ", ".join(["a (red:1.4) apple on a wooden table"] * 12)
    emb = encode_texts_sdxl(xl.backend, [c.tokenizer, c.tokenizer_2], [long])
    hidden, pooled = emb[long]
    windows = [tokenize_weighted(t, long) for t in (c.tokenizer, c.tokenizer_2)]
    assert len(windows[0]) == len(windows[1]) >= 2 and hidden.shape == (77 * len(windows[0]), 64)
    for i, width in enumerate((32, 32)):
        ids = torch.tensor([[x for w in windows[i] for x in w[0]]])
        weights = torch.tensor([[x for w in windows[i] for x in w[1]]])
        raw = xl.backend.encode_text(ids, 1, encoder=i)
        want = apply_emphasis(raw, weights)[0]
        assert torch.allclose(hidden[:, 32 * i:32 * i + width], want, atol=1e-6)
    first = torch.tensor([windows[1][0][0]])
    assert torch.allclose(pooled, c.text_encoder_2(first).text_embeds[0], atol=1e-6)
    assert windows[1][0][0][-1] == 0 and windows[0][0][0][-1] == 49407     # OpenCLIP pads with 0, CLIP with EOS


def test_fast_path_equals_eager(xl):
    """The static loop moves SDXL's contexts (with their pooled row) like any other."""
    eager = xl("a cat", steps=5, seed=2, width=SIZE, height=SIZE, sampler="DPM++ 2M").pixels
    xl.set_fast_path(use_kernel=False)
    try:
        fast = xl("a cat", steps=5, seed=2, width=SIZE, height=SIZE, sampler="DPM++ 2M").pixels
    finally:
        xl.set_fast_path(False)
    assert np.abs(fast - eager).max() <= 1e-5


def test_kv_cache_reads_the_text_part(xl):
    """The cross-attention K/V cache projects the text rows only (not the pooled row) and hits."""
    ref = xl("a cat", steps=3, seed=4, width=SIZE, height=SIZE).pixels
    xl.backend.enable_kv_cache(True)
    try:
        got = xl("a cat", steps=3, seed=4, width=SIZE, height=SIZE).pixels
        assert xl.backend.kv.hits > 0
    finally:
        xl.backend.enable_kv_cache(False)
    assert np.abs(got - ref).max() <= 1e-5


def test_onnxruntime_equals_torch(xl, tmp_path):
    """The SDXL graphs (two text encoders, the UNet with its pooled-text and size inputs) on ONNX
    Runtime give the torch backend's image."""
    ort = sdrt.Pipeline.from_pretrained("random:sdxl-tiny", backend="onnxruntime", engine_dir=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["networks"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    args = dict(steps=4, seed=3, width=SIZE, height=SIZE, negative_prompt="")
    for prompt in ("a (cat:1.2) on a mat", "a [cat:dog:2] photo, " + "very long " * 40):
        assert np.abs(ort(prompt, **args).pixels - xl(prompt, **args).pixels).max() <= 1e-4


def test_tensorrt_fake_equals_torch(xl, tmp_path):
    """The TensorRT engines of SDXL (built and run against the fake API; nothing here runs real
    TensorRT): the second text encoder's engine, the UNet's extra inputs bound like the others."""
    import tensorrt_fake as fake

    from sdrt.backends.tensorrt_backend import TensorRTBackend
    from sdrt.export.tensorrt import BuildOptions, build_tensorrt
    build_tensorrt(xl.components, tmp_path, profile=fake.PROFILE, options=BuildOptions(precision="fp32"),
                   trt=fake.module(), arch="sm_90", log=lambda m: None)
    fake.compute_with(xl.components, xl.backend)
    be = TensorRTBackend(xl.components, torch.device("cpu"), torch.float32, tmp_path, trt=fake.module(),
                         arch="sm_90", log=lambda m: None)
    trt = sdrt.Pipeline(xl.components, be)
    assert set(be.engines) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    assert set(be.engines["unet"].inputs) == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
    args = dict(steps=4, seed=3, width=SIZE, height=SIZE, sampler="DPM++ 2M")
    assert np.abs(trt("a cat", **args).pixels - xl("a cat", **args).pixels).max() <= 1e-5
    trt.set_fast_path(use_kernel=False)
    assert np.abs(trt("a cat", **args).pixels - xl("a cat", **args).pixels).max() <= 1e-5


def test_float16_builds_keep_the_vae_float32(tmp_path):
    """SDXL's VAE overflows float16 (black or NaN images): an fp16 TensorRT folder builds it float32."""
    import tensorrt_fake as fake

    from sdrt.export.tensorrt import BuildOptions, build_tensorrt
    from sdrt.models import build_random
    c = build_random("sdxl-tiny")
    manifest = build_tensorrt(c, tmp_path, profile=fake.PROFILE, options=BuildOptions(precision="fp16"),
                              trt=fake.module(), arch="sm_90", log=lambda m: None)
    import onnx
    for name, want in (("unet", onnx.TensorProto.FLOAT16), ("vae_decoder", onnx.TensorProto.FLOAT)):
        graph = onnx.load(str(tmp_path / "onnx" / f"{name}.onnx"), load_external_data=False).graph
        assert {i.data_type for i in graph.initializer if len(i.dims) > 1} == {want}
    assert "vae-fp32" in manifest["networks"]["vae_decoder"]["key"]["optimization"]


def test_torch_float16_decodes_sdxl_in_float32():
    """At float16 the SDXL UNet and text encoders are float16 and the VAE float32 (it overflows
    float16); constructed directly, as check_target keeps float16 to CUDA devices."""
    from sdrt.backends.torch_backend import TorchBackend
    from sdrt.models import build_random
    c = build_random("sdxl-tiny")
    be = TorchBackend(c, torch.device("cpu"), torch.float16)
    assert be.vae_dtype == torch.float32 and next(c.vae.parameters()).dtype == torch.float32
    assert next(c.unet.parameters()).dtype == torch.float16
    out = be.decode(torch.randn(1, 4, 8, 8, dtype=torch.float16) * 50)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_sdrt_build_compiles_sdxl_for_onnxruntime(tmp_path, capsys):
    from sdrt.cli import main
    assert main(["build", "random:sdxl-tiny", "--backend", "onnxruntime", "--out", str(tmp_path),
                 "--max", "1x96x96"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["networks"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    assert manifest["networks"]["unet"]["profile"]["height"][2] == 96
