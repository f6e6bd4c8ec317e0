"""Inpainting (sdrt.inpaint): the web UI's mask processing (binary, invert, blur, "only masked"
crop, fill), the per-step blend and the overlay, 9-channel inpainting models, and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sdrt
from sdrt.inpaint import blur, crop_region, expand_crop_region
from sdrt.params import GenerationParams


def _image(w=64, h=64, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def _left_mask(w=64, h=64, cut=32):
    m = Image.new("L", (w, h))
    m.paste(255, (0, 0, cut, h))
    return m


ARGS = dict(prompt="a cat", steps=8, seed=3, width=64, height=64, sampler="Euler")


@pytest.mark.parametrize("sigma", [1, 4, 7.5])
def test_blur_is_the_web_uis_gaussian(sigma):
    from scipy.ndimage import gaussian_filter1d
    a = (np.random.default_rng(1).random((40, 50)) > 0.7).astype(np.float64) * 255
    k = 2 * int(2.5 * sigma + 0.5) + 1
    ref = a
    for axis in (1, 0):       # OpenCV's BORDER_REFLECT_101 is scipy's "mirror"; the same kernel size
        ref = np.clip(np.rint(gaussian_filter1d(ref, sigma, axis=axis, mode="mirror",
                                                truncate=((k - 1) / 2) / sigma)), 0, 255)
    ours = np.asarray(blur(Image.fromarray(a.astype(np.uint8)), sigma, sigma), dtype=np.float64)
    assert np.abs(ours - ref).max() <= 1


def test_crop_region_and_its_expansion():
    m = Image.new("L", (64, 64))
    m.paste(255, (10, 20, 20, 24))
    assert crop_region(m) == (10, 20, 20, 24)
    assert crop_region(m, 4) == (6, 16, 24, 28)
    assert crop_region(Image.new("L", (8, 8))) is None
    assert expand_crop_region((10, 20, 20, 24), 64, 64, 64, 64) == (10, 17, 20, 27)     # to a square
    assert expand_crop_region((0, 0, 4, 60), 64, 64, 64, 64) == (0, 0, 60, 60)         # kept inside the image
    assert expand_crop_region((60, 0, 64, 40), 64, 32, 64, 64) == (0, 0, 64, 40)


def test_outside_the_mask_the_image_is_kept(tiny):
    img, mask = _image(), _left_mask()
    r = tiny(init_images=img, mask=mask, mask_blur=0, inpaint_full_res=False, inpainting_fill=1, **ARGS)
    out, src = np.asarray(r.images[0], dtype=int), np.asarray(img, dtype=int)
    assert np.array_equal(out[:, 32:], src[:, 32:])                 # the overlay: the original pixels
    assert np.abs(out[:, :32] - src[:, :32]).mean() > 5
    job = tiny.validate(GenerationParams(init_images=img, mask=mask, mask_blur=0, inpaint_full_res=False,
                                         inpainting_fill=1, **ARGS))
    tiny.prepare_latents(job)
    assert job.latent_mask.shape == (1, 4, 8, 8)
    assert (job.latent_mask[..., :4] == 1).all() and (job.latent_mask[..., 4:] == 0).all()
    # the latents outside the mask are the init latents at every step: the final latents too
    latents = tiny.denoise(job, tiny.encode(job))
    assert torch.equal(latents[..., 4:], job.init_latents[..., 4:])


def test_invert_and_alpha_masks_name_the_same_area(tiny):
    img = _image(seed=2)
    base = dict(init_images=img, mask_blur=0, inpaint_full_res=False, inpainting_fill=1, **ARGS)
    a = tiny(mask=_left_mask(), **base).pixels
    inverted = Image.eval(_left_mask(), lambda v: 255 - v)
    b = tiny(mask=inverted, inpainting_mask_invert=True, **base)
    assert np.array_equal(a, b.pixels) and "Mask mode: Inpaint not masked" in b.infotexts[0]
    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 0))             # transparent but where painted
    alpha.paste((255, 255, 255, 255), (0, 0, 32, 64))
    assert np.array_equal(tiny(mask=alpha, **base).pixels, a)


def test_only_masked_crops_processes_and_pastes_back(tiny):
    img = _image(96, 64, seed=3)
    mask = Image.new("L", (96, 64))
    mask.paste(255, (60, 20, 76, 36))                                  # 16x16 at (60, 20)
    r = tiny(init_images=img, mask=mask, mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=4,
             inpainting_fill=1, **ARGS)
    assert r.images[0].size == (96, 64)                                # the init image's size
    out, src = np.asarray(r.images[0], dtype=int), np.asarray(img, dtype=int)
    assert np.array_equal(out[:, :56], src[:, :56]) and np.array_equal(out[:16], src[:16])
    assert np.abs(out[20:36, 60:76] - src[20:36, 60:76]).mean() > 5
    text = r.infotexts[0]
    assert "Inpaint area: Only masked" in text and "Masked area padding: 4" in text
    item = tiny.validate(GenerationParams(init_images=img, mask=mask, mask_blur=0, inpaint_full_res_padding=4,
                                          inpainting_fill=1, **ARGS)).inpainting[0]
    assert item.paste_to == (56, 16, 24, 24) and item.image.size == (64, 64)
    blank = tiny(init_images=img, mask=Image.new("L", (96, 64)), **ARGS)   # nothing masked: plain img2img
    assert blank.images[0].size == (64, 64) and "Inpaint area" not in blank.infotexts[0]


@pytest.mark.parametrize("fill,name", [(0, "fill"), (2, "latent noise"), (3, "latent nothing")])
def test_masked_content(tiny, fill, name):
    img, mask = _image(seed=4), _left_mask()
    params = GenerationParams(init_images=img, mask=mask, mask_blur=0, inpaint_full_res=False, inpainting_fill=fill,
                              rng="cpu", **ARGS)
    job = tiny.validate(params)
    tiny.prepare_latents(job)
    masked = job.init_latents[..., :4]
    if fill == 3:
        assert (masked == 0).all()
    elif fill == 2:            # the image's own noise (its seed's first draw)
        noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3))
        assert torch.allclose(masked[0], noise[..., :4])
    else:                      # the encoded image was filled from its surroundings before encoding
        filled = np.asarray(job.init_images[0], dtype=int)
        assert np.abs(filled[:, :28] - np.asarray(img, dtype=int)[:, :28]).mean() > 10
    assert f"Masked content: {name}" in tiny(params).infotexts[0]


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DDIM"])
def test_static_loop_equals_the_eager_loop(torch_pipe, sampler):
    """The static loop blends the noise predictions of both CFG rows before the fused step: the
    same images as the eager loop's blend of the denoised prediction."""
    from loops import eager_and_static
    args = dict(ARGS, sampler=sampler, init_images=_image(seed=5), mask=_left_mask(), mask_blur=2)
    eager, fast, built = eager_and_static(torch_pipe, **args)
    assert built == 1 and np.abs(eager - fast).max() < 1e-4


def test_mask_errors(tiny):
    with pytest.raises(ValueError, match="mask is 32x32 but its init image is 64x64"):
        tiny.validate(GenerationParams(init_images=_image(), mask=Image.new("L", (32, 32)), **ARGS))
    with pytest.raises(ValueError, match="give init_images too"):
        tiny.validate(GenerationParams(mask=_left_mask(), **ARGS))
    with pytest.raises(ValueError, match="inpainting_fill 5"):
        tiny.validate(GenerationParams(init_images=_image(), mask=_left_mask(), inpainting_fill=5, **ARGS))
    with pytest.raises(ValueError, match="mask_blur must be"):
        tiny.validate(GenerationParams(init_images=_image(), mask=_left_mask(), mask_blur=-1, **ARGS))
    with pytest.raises(ValueError, match="mask\\[0\\]: not a readable image"):
        tiny.validate(GenerationParams(init_images=_image(), mask=b"junk", **ARGS))
    with pytest.raises(ValueError, match="2 masks for 3 images"):
        tiny.validate(GenerationParams(init_images=[_image()] * 3, mask=[_left_mask()] * 2, batch_size=3, **ARGS))


@pytest.fixture(scope="module")
def inpaint_model():
    return sdrt.Pipeline.from_pretrained("random:tiny-inpaint")


def test_nine_channel_models_get_the_mask_and_the_masked_image(inpaint_model):
    pipe = inpaint_model
    seen = []
    real = pipe.backend.unet
    pipe.backend.unet = lambda x, t, ctx: (seen.append(x.clone()), real(x, t, ctx))[1]
    try:
        img, mask = _image(seed=6), _left_mask()
        r = pipe(init_images=img, mask=mask, mask_blur=0, inpaint_full_res=False, inpainting_fill=1, **ARGS)
        txt = pipe(**ARGS)                                             # txt2img: everything masked
    finally:
        pipe.backend.unet = real
    assert len(r.images) == 1 and len(txt.images) == 1
    x = seen[0]
    assert x.shape[1] == 9
    assert (x[:, 4, :, :4] == 1).all() and (x[:, 4, :, 4:] == 0).all()        # the mask at the latent size
    job = pipe.validate(GenerationParams(init_images=img, mask=mask, mask_blur=0, inpaint_full_res=False,
                                         inpainting_fill=1, **ARGS))
    pipe.prepare_latents(job)
    assert torch.allclose(x[:, 5:], job.image_cond[[0, 0], 1:].to(x.dtype))   # cond and uncond rows alike
    # the masked-image latents: the image with the masked area removed, encoded
    removed = np.asarray(img, dtype=np.float32).copy()
    removed[:, :32] = 127.5
    from sdrt.images import to_tensor_array
    moments = pipe.backend.encode_image(torch.from_numpy(to_tensor_array(Image.fromarray(removed.astype(np.uint8))))
                                        [None])
    mean = moments[:, :4] * pipe.components.vae.config.scaling_factor
    assert (job.image_cond[:, 1:] - mean).abs().mean() < (job.image_cond[:, 1:]).abs().mean()
    assert seen[-1].shape[1] == 9 and (seen[-1][:, 4] == 1).all()              # txt2img: all masked


@pytest.mark.slow
def test_nine_channel_models_on_onnxruntime(inpaint_model, tmp_path):
    """The exported UNet takes the model's 9 input channels and gives 4: inpainting and txt2img
    with an inpainting model on ONNX Runtime equal the torch backend."""
    from sdrt.export import Profile, build_onnxruntime
    build_onnxruntime(inpaint_model.components, tmp_path, profile=Profile(batch=(1, 1, 1), height=(64, 64, 64),
                                                                          width=(64, 64, 64), windows=(1, 1, 1)),
                      log=lambda m: None)
    ort = sdrt.Pipeline.from_pretrained("random:tiny-inpaint", backend="onnxruntime", engine_dir=str(tmp_path))
    for args in (dict(ARGS, init_images=_image(seed=10), mask=_left_mask()), ARGS,      # only masked (the default)
                 dict(ARGS, init_images=_image(seed=10), mask=_left_mask(), inpaint_full_res=False)):
        assert np.abs(ort(**args).pixels - inpaint_model(**args).pixels).max() < 1e-3


def test_cli_inpainting(tmp_path):
    from sdrt.cli import main
    _image().save(tmp_path / "in.png")
    _left_mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", "a lighthouse", "--model", "random:tiny", "--steps", "3", "--quiet", "--width", "64",
                 "--height", "64", "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--mask-blur", "0", "--inpainting-fill", "1", "-o", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    assert "Masked content" not in text and "Inpaint area: Only masked" in text
    src, got = np.asarray(_image(), dtype=int), np.asarray(Image.open(out).convert("RGB"), dtype=int)
    assert np.array_equal(got[:, 32:], src[:, 32:])
    assert main(["generate", "a lighthouse", "--model", "random:tiny", "--steps", "3", "--quiet", "--width", "64",
                 "--height", "64", "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--whole-picture", "-o", str(out)]) == 0
    assert "Inpaint area" not in Image.open(out).info["parameters"]


def test_a_captured_inpainting_loop_replays_new_images_and_masks(torch_pipe):
    """Captured once (the CUDA-graph fake records every operation and replays it on the same
    memory): replays with another image, mask and seed give the eager loop's images, so the init
    latents and the mask are inputs of the graph, not baked into it."""
    from cuda_graph_fake import FakeCuda
    fake = FakeCuda()
    runs = [dict(init_images=_image(seed=7), mask=_left_mask(cut=24), seed=1),
            dict(init_images=_image(seed=8), mask=_left_mask(cut=40), seed=2)]
    common = dict(ARGS, mask_blur=0, inpaint_full_res=False, sampler="Euler a")
    common.pop("seed")
    try:
        torch_pipe.set_fast_path(capture=True, cuda=fake)
        got = [torch_pipe(**common, **r).pixels for r in runs]
        assert len(fake.graphs) == 1 and next(iter(torch_pipe.loops.values())).replays == 1
    finally:
        torch_pipe.set_fast_path(False)
    for r, g in zip(runs, got):
        assert np.abs(torch_pipe(**common, **r).pixels - g).max() <= 1e-4


def test_inpainting_on_the_tensorrt_fake(torch_pipe, trt_engines):
    import tensorrt_fake as fake

    from sdrt.backends import tensorrt_backend as tb
    backend = tb.TensorRTBackend(torch_pipe.components, torch.device("cpu"), torch.float32, trt_engines,
                                 trt=fake.module(), arch="sm_90", log=lambda m: None)
    pipe = sdrt.Pipeline(torch_pipe.components, backend)
    args = dict(ARGS, init_images=_image(seed=9), mask=_left_mask())
    assert np.abs(pipe(**args).pixels - torch_pipe(**args).pixels).max() < 1e-4


def test_tensorrt_profiles_give_the_unet_its_nine_channels(inpaint_model):
    from sdrt.export.specs import Profile, model_dims, profile_shapes
    shapes = profile_shapes("unet", Profile(batch=(1, 1, 2), height=(64, 64, 96), width=(64, 64, 96),
                                            windows=(1, 1, 1)), model_dims(inpaint_model.components))
    assert [s[1] for s in shapes["sample"]] == [9, 9, 9]
    assert shapes["sample"][2] == (4, 9, 12, 12)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_with_an_inpainting_model(inpaint_model, upscaler):
    """Both passes give a 9-channel model its extra input (the second pass fully masked with a
    latent upscaler, the upscaled image's with a pixel one)."""
    r = inpaint_model(**ARGS, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=2,
                      denoising_strength=0.5)
    assert r.images[0].size == (96, 96)


@pytest.mark.parametrize("kind", ["inpaint", "txt2img"])
def test_nine_channel_models_on_the_static_loop(inpaint_model, kind):
    from loops import eager_and_static
    args = dict(ARGS, sampler="DPM++ 2M")
    if kind == "inpaint":
        args.update(init_images=_image(seed=11), mask=_left_mask(), mask_blur=2)
    eager, static, built = eager_and_static(inpaint_model, **args)
    assert built == 1 and np.abs(eager - static).max() < 1e-4


def test_the_batcher_merges_inpainting_requests_with_their_own_masks(tiny):
    """Two requests with different images and masks share a batch and each gets the image it
    gets alone (per-image init latents, latent masks and overlays)."""
    reqs = [sdrt.Request("a cat", seed=s, init_images=_image(seed=s), mask=_left_mask(cut=c), mask_blur=0,
                         inpaint_full_res=False, **{k: v for k, v in ARGS.items() if k not in ("prompt", "seed")})
            for s, c in ((1, 24), (2, 40))]
    with sdrt.Batcher(tiny, max_batch_size=2, max_wait=0.5) as b:
        futures = [b.submit(r) for r in reqs]
        got = [f.result(timeout=120) for f in futures]
        assert b.metrics["batch_size"].count == 1            # one batch of two
    for r, g in zip(reqs, got):
        alone = tiny(r)
        assert np.abs(np.asarray(alone.images[0], dtype=int) - np.asarray(g.images[0], dtype=int)).max() <= 1



def test_sdxl_inpainting_model():
    """SDXL's 9-channel variant: the extra input next to the pooled text and size conditioning,
    on both loops; the pixels outside the mask are the original's."""
    from loops import eager_and_static
    pipe = sdrt.Pipeline.from_pretrained("random:sdxl-tiny-inpaint")
    args = dict(ARGS, steps=4, init_images=_image(seed=12), mask=_left_mask(), mask_blur=0, inpaint_full_res=False)
    eager, static, built = eager_and_static(pipe, **args)
    assert built == 1 and np.abs(eager - static).max() < 1e-4
    out = np.asarray(pipe(**args).images[0])
    assert np.array_equal(out[:, 32:], np.asarray(_image(seed=12))[:, 32:])
    assert pipe(**dict(ARGS, steps=2)).images[0].size == (64, 64)          # txt2img, fully masked
