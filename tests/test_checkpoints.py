"""Single-file checkpoints (the web UI's .safetensors / .ckpt): written from random models in the
original layout, read back through diffusers' converters, the same images as the diffusers folder
they came from; pickles that would run code are refused; bad files get errors that name them."""
import hashlib
import json
import os
import pickle
import types

import numpy as np
import pytest
import torch

import sdrt
from sdrt import checkpoints
from sdrt.checkpoints import CheckpointError, save_single_file
from sdrt.models import ModelError, build_random, load_model, save_diffusers_folder

KINDS = ("tiny", "sd2-tiny", "sdxl-tiny")
ARGS = dict(steps=4, seed=7, width=64, height=64, sampler="DPM++ 2M", negative_prompt="blurry")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{kind: (float32 .safetensors, diffusers folder)} of the same random model."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for kind in KINDS:
        c = build_random(kind)
        save_diffusers_folder(c, root / kind)
        out[kind] = (save_single_file(c, root / f"{kind}.safetensors", dtype=torch.float32), root / kind)
    return out


def _weights(c):
    return {f"{i}.{k}": v for i, m in enumerate(c.networks) for k, v in m.state_dict().items()
            if not k.endswith("position_ids")}


@pytest.mark.parametrize("kind", KINDS)
def test_same_image_as_the_folder(files, kind):
    path, folder = files[kind]
    from_file = sdrt.Pipeline.from_pretrained(path)
    from_folder = sdrt.Pipeline.from_pretrained(folder)
    c = from_file.components
    assert c.family == from_folder.components.family and c.is_sdxl == (kind == "sdxl-tiny")
    a, b = _weights(c), _weights(from_folder.components)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got, ref = from_file("a red house by the sea", **ARGS), from_folder("a red house by the sea", **ARGS)
    assert np.abs(got.pixels - ref.pixels).max() == 0.0 and ref.pixels.std() > 0.01
    # the web UI's "Model hash" (the file's sha256, 10 digits) and "Model" (the file's stem)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {digest}" in got.infotexts[0] and f"Model: {kind}," in got.infotexts[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tmp_path, dtype):
    c = build_random("tiny")
    loaded = load_model(save_single_file(c, tmp_path / "half.safetensors", dtype=dtype))
    a, b = _weights(c), _weights(loaded)
    assert all(torch.equal(b[k], a[k].to(dtype).float()) for k in a)
    assert all(v.dtype == torch.float32 for v in b.values())


def test_ckpt_with_ema_and_nested_state_dict(tmp_path):
    """A full training checkpoint: ``state_dict`` nested, ``model_ema.*`` beside the weights (ignored,
    as the web UI does), an old transformers text layout (``transformer.embeddings.*``)."""
    c = build_random("tiny")
    sd = checkpoints.to_state_dict(c)
    ema = {f"model_ema.{k.replace('model.diffusion_model.', '').replace('.', '')}": torch.randn(1)
           for k in list(sd)[:150] if k.startswith("model.diffusion_model.")}
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in sd.items()}
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": {**old, **ema}, "global_step": 1234, checkpoints.CONFIG_KEY: json.dumps(
        {"unet": dict(c.unet.config), "vae": dict(c.vae.config), "text": checkpoints._text_config(c.text_encoder)})},
        path)
    loaded = load_model(path)
    a, b = _weights(c), _weights(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(CheckpointError, match="refused.*weights_only"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"), "not a readable safetensors"),
    (lambda p: _save({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, p), "no Stable Diffusion UNet"),
    (lambda p: _save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
                      "conditioner.embedders.0.model.ln_final.weight": torch.zeros(4)}, p), "SDXL refiner"),
    (lambda p: _save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 8, 3, 3)}, p),
     "instruct-pix2pix"),
    (lambda p: _save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, p),
     "text encoder sdrt knows"),
])
def test_bad_files_name_the_problem(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ModelError, match=message) as e:
        load_model(path)
    assert "bad.safetensors" in str(e.value)


def _save(sd, path):
    from safetensors.torch import save_file
    save_file(sd, str(path))


def test_a_truncated_file(files, tmp_path):
    data = files["tiny"][0].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated or damaged"):
        load_model(path)


def test_wrong_architecture_is_named(files, tmp_path):
    """Without its recorded configuration a test model is read as a real SD 1.5: the mismatch is
    reported with the weight and both shapes, not a stack trace."""
    from safetensors import safe_open
    with safe_open(str(files["tiny"][0]), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "unlabelled.safetensors"
    _save(sd, path)
    with pytest.raises(CheckpointError, match=r"does not match the SD 1.x architecture.*in the file.*expected"):
        load_model(path)


def test_real_layouts_are_recognised_by_diffusers():
    """The full-size architectures sdrt ships, written in the single-file layout on the meta device:
    diffusers' own detector names each, sdrt's detector agrees, and they convert back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from sdrt.architectures import family_config, text_model
    want = {("sd1", False): "v1", ("sd1", True): "inpainting", ("sd2", False): "v2", ("sdxl", False): "xl_base",
            ("sdxl", True): "xl_inpaint"}
    for (family, inpainting), name in want.items():
        cfg = family_config(family, inpainting)
        with checkpoints.meta_parameters():
            c = types.SimpleNamespace(
                unet=UNet2DConditionModel(**cfg["unet"]), vae=AutoencoderKL(**cfg["vae"]), family=family,
                text_encoder=text_model(cfg["text"], family),
                text_encoder_2=text_model(cfg["text_2"], family, projection=True) if "text_2" in cfg else None)
        sd = checkpoints.to_state_dict(c)
        assert infer_diffusers_model_type(sd) == name
        assert checkpoints.detect(sd) == (family, inpainting)
        unet, _, _, text_2 = checkpoints.networks(sd, family, cfg)
        assert unet.config.in_channels == (9 if inpainting else 4) and (text_2 is not None) == (family == "sdxl")


def test_v_prediction_detection(tmp_path):
    """The web UI's test (x = 0.5, t = 999, context 0.5: mean(out - x) < -1 means v), and a
    ``.yaml`` beside the file that says ``parameterization: "v"`` decides instead."""
    c = build_random("sd2-tiny")
    unet = c.unet
    assert not checkpoints.uses_v_prediction(unet)
    with torch.no_grad():
        bias = unet.conv_out.bias.clone()
        unet.conv_out.bias.fill_(-5.0)
        try:
            assert checkpoints.uses_v_prediction(unet)
        finally:
            unet.conv_out.bias.copy_(bias)
    path = save_single_file(c, tmp_path / "sd2.safetensors", dtype=torch.float32, record_config=True)
    assert load_model(path).noise_schedule.prediction_type == "epsilon"
    # the recorded configuration decides for a test model; a yaml decides for a file without one
    assert checkpoints._yaml_says_v(path) is None
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert checkpoints._yaml_says_v(path) is True


def test_inpainting_checkpoint_is_loaded_and_reported(tmp_path):
    """A 9-channel UNet loads, reports itself and generates (txt2img: everything masked, as the web UI)."""
    c = build_random("tiny")
    from diffusers import UNet2DConditionModel
    cfg = dict(c.unet.config)
    cfg["in_channels"] = 9
    c.unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    path = save_single_file(c, tmp_path / "inpaint.safetensors", dtype=torch.float32)
    pipe = sdrt.Pipeline.from_pretrained(path)
    assert pipe.components.inpainting and pipe.components.latent_channels == 4
    assert pipe("a cat", steps=2, width=64, height=64).images[0].size == (64, 64)


def test_hash_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoints.file_sha256(path) == want
    cached = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert list(cached.values()) == [want]
    path.write_bytes(b"abcd" * 1000)            # changed: hashed again
    assert checkpoints.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_generates_from_a_checkpoint(files, tmp_path):
    from sdrt.cli import main
    out = tmp_path / "out.png"
    assert main(["generate", "a lighthouse", "--model", str(files["sdxl-tiny"][0]), "--steps", "3",
                 "--width", "64", "--height", "64", "-o", str(out), "-q"]) == 0
    from PIL import Image
    assert "Model: sdxl-tiny" in Image.open(out).text["parameters"]
    assert main(["generate", "x", "--model", str(tmp_path / "missing.safetensors"), "-o", str(out), "-q"]) == 2


def test_a_checkpoint_without_its_vae(files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(files["tiny"][0]), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("first_stage_model.")}
        metadata = f.metadata()
    path = tmp_path / "novae.safetensors"
    save_file(sd, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="novae.safetensors.*holds no VAE"):
        load_model(path)
