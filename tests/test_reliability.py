"""Bad input gets a clear error, never a traceback or a silently wrong result (part of the issue
"Nothing silently wrong, nothing unbounded, no open door"): engine folders whose manifest has the
wrong shape are rebuilt, an up-to-date folder is used without writing to it, damaged model
folders and prompts that are not Unicode are refused by name, and deeply nested prompts parse in
bounded work."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import sdrt
from sdrt.models import ModelError, load_model, save_diffusers_folder
from sdrt.prompts import MAX_DEPTH, parse_attention

ROOT = Path(__file__).resolve().parent.parent


# engine folders -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_engine(tmp_path_factory, tiny):
    from sdrt.export import build_onnxruntime
    d = tmp_path_factory.mktemp("eng")
    build_onnxruntime(tiny.components, d, networks=("text_encoder",), log=lambda m: None)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["[]", "null", '{"networks": {"text_encoder": 5}}',
                                 '{"networks": {"text_encoder": {"file": 3}}}', '{"networks": [1]}'])
def test_a_manifest_of_the_wrong_shape_is_rebuilt(tiny, text_engine, tmp_path, bad, capsys):
    from sdrt.cli import main
    from sdrt.export import build_onnxruntime, read_manifest
    d = tmp_path / "eng"
    d.mkdir()
    for f in text_engine.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "manifest.json").write_text(bad)
    assert read_manifest(d)["damaged"] is True
    assert main(["info", str(d)]) == 2 and "holds no engines" in capsys.readouterr().err   # no traceback
    logs = []
    manifest = build_onnxruntime(tiny.components, d, networks=("text_encoder",), log=logs.append)
    assert "damaged" in logs[0] and manifest["networks"]["text_encoder"]["files"]
    assert main(["info", str(d)]) == 0


@pytest.mark.slow
def test_an_up_to_date_folder_is_used_without_writing_to_it(tiny, text_engine, monkeypatch):
    """A valid engine folder on a read-only mount: loading writes nothing."""
    from sdrt.export import build_onnxruntime

    def refuse(*a, **k):
        raise PermissionError(30, "Read-only file system")
    monkeypatch.setattr(Path, "write_text", refuse)
    monkeypatch.setattr(Path, "write_bytes", refuse)
    monkeypatch.setattr(os, "replace", refuse)
    logs = []
    build_onnxruntime(tiny.components, text_engine, networks=("text_encoder",), log=logs.append)
    assert logs == ["text_encoder: up to date"]


# model folders ------------------------------------------------------------------------------------

class _WritesAFile:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("model") / "tiny"
    save_diffusers_folder(tiny.components, d)
    return d


def _copy(folder, dest):
    for f in folder.rglob("*"):
        if f.is_file():
            (dest / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (dest / f.relative_to(folder)).write_bytes(f.read_bytes())
    return dest


@pytest.mark.parametrize("damage, message", [
    ("config", "unet/config.json must hold a JSON object"),
    ("truncated", "could not load text_encoder/"),
    ("timesteps", "num_train_timesteps must be at least 2"),
    ("pickle", "could not load text_encoder/"),
])
def test_a_damaged_model_folder_is_refused_by_name(folder, tmp_path, damage, message):
    d = _copy(folder, tmp_path / "m")
    marker = tmp_path / "pwned"
    if damage == "config":
        (d / "unet" / "config.json").write_text("[1, 2, 3]")
    elif damage == "truncated":
        f = next((d / "text_encoder").glob("*.safetensors"))
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "timesteps":
        cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
        (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(cfg, num_train_timesteps=0)))
    else:
        for f in (d / "text_encoder").glob("*.safetensors"):
            f.unlink()
        (d / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _WritesAFile(marker)}))
    with pytest.raises(ModelError, match=message):
        load_model(d)
    assert not marker.exists()                   # the pickle's code never ran


# prompts ------------------------------------------------------------------------------------------

def test_a_prompt_that_is_not_unicode_is_refused_by_name(tiny):
    with pytest.raises(ValueError, match="negative_prompt holds a character that is not valid Unicode at position 2"):
        tiny.validate(sdrt.GenerationParams("ok", negative_prompt="ab\udcffc", width=64, height=64))


@pytest.mark.slow
def test_invalid_utf8_on_the_command_line_is_one_line_and_rc_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", b"a \xff cat", "--steps", "2",
                           "-o", str(tmp_path / "x.png")], capture_output=True, cwd=ROOT)
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr.decode(errors="replace")
    assert err[-1].startswith("sdrt generate: error: prompt holds a character that is not valid Unicode")


def test_seed_resize_from_must_be_a_pair(tiny):
    with pytest.raises(ValueError, match="seed_resize_from must be"):
        tiny.validate(sdrt.GenerationParams("x", seed_resize_from=5, width=64, height=64))


def test_deep_nesting_is_bounded():
    """Brackets deeper than MAX_DEPTH stay literal, so each piece gets at most MAX_DEPTH factors
    (the web UI's algorithm is quadratic here: 30,000 nested '(a' took 28 s)."""
    pieces = parse_attention("(a" * 30000)
    assert len(pieces) == MAX_DEPTH and max(w for _, w in pieces) == pytest.approx(1.1 ** MAX_DEPTH)
    assert pieces[-1][0].startswith("a(a(a")                     # the rest is literal text
    assert parse_attention("((a))") == [("a", pytest.approx(1.21))]


# two builds into one folder ---------------------------------------------------------------------------

BUILD = """
import sys
from sdrt.export import build_onnxruntime
from sdrt.models import load_model
c = load_model("random:tiny")
build_onnxruntime(c, sys.argv[1], networks=("text_encoder", "vae_decoder"), log=lambda m: print(m, flush=True))
"""


@pytest.mark.slow
def test_two_processes_building_one_folder_build_it_once(tmp_path):
    """Two jobs sharing an engine folder (two replicas, two `sdrt generate`): the lock makes one
    wait for the other, which then finds every artifact up to date and verified."""
    from sdrt.export import check_artifact, read_manifest
    d = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    logs = [o[0] for o in outs]
    assert sorted(log.count("built in") for log in logs) == [0, 2]          # one built both, the other none
    assert sorted(log.count("up to date") for log in logs) == [0, 2]
    manifest = read_manifest(d)
    for name, entry in manifest["networks"].items():
        assert check_artifact(d, entry, entry["key"]).ok, name
        assert all(f["hash"] == "sha256-full" for f in entry["files"])


def test_every_byte_of_an_artifact_is_verified(tmp_path):
    """Large files used to be sample-hashed (64 blocks of 64 KiB above 512 MiB): a damaged byte
    elsewhere went unnoticed. Every byte counts now (shown on a small file: the method is one)."""
    from sdrt.export.build import check_artifact, file_record
    f = tmp_path / "unet.onnx.data"
    f.write_bytes(bytes(3 << 20))
    entry = {"files": [file_record(f)], "key_digest": "k"}
    key = {}
    import sdrt.export.build as build
    entry["key_digest"] = build.key_digest(key)
    assert check_artifact(tmp_path, entry, key).ok
    data = bytearray(f.read_bytes())
    data[1_234_567] ^= 1                               # one bit, in the middle
    f.write_bytes(bytes(data))
    assert "corrupted" in check_artifact(tmp_path, entry, key).reason
    legacy = {"files": [{k: v for k, v in file_record(f).items() if k != "hash"}], "key_digest": entry["key_digest"]}
    assert "sampled hash" in check_artifact(tmp_path, legacy, key).reason


def test_artifacts_appear_under_their_names_only_when_complete(tiny, tmp_path, monkeypatch):
    """Built in a private staging folder and renamed into place: a reader never sees a half-built
    graph under its name, and a failed build leaves neither a partial artifact nor its staging."""
    from sdrt.export import build as build_module
    real = build_module.ort_offline_optimize
    seen = []

    def optimize(path):
        seen.append((path.parent.name, (tmp_path / "d" / path.name).exists()))
        return real(path)
    monkeypatch.setattr(build_module, "ort_offline_optimize", optimize)
    d = tmp_path / "d"
    build_module.build_onnxruntime(tiny.components, d, networks=("text_encoder",), log=lambda m: None)
    assert seen[0][0].startswith(".staging-text_encoder-") and seen[0][1] is False
    assert (d / "text_encoder.onnx").is_file() and not list(d.glob(".staging-*"))

    def broken(path):
        raise RuntimeError("the optimiser crashed")
    monkeypatch.setattr(build_module, "ort_offline_optimize", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        build_module.build_onnxruntime(tiny.components, tmp_path / "e", networks=("text_encoder",),
                                       log=lambda m: None)
    assert not list((tmp_path / "e").glob("*.onnx*")) and not list((tmp_path / "e").glob(".staging-*"))


@pytest.mark.slow
def test_a_rebuild_does_not_disturb_a_session_already_running(tiny, tmp_path):
    """Another job rebuilds the folder (here: for other weights) while this one generates: the
    new files are renamed over the old ones, so the running sessions keep what they loaded."""
    import copy
    import dataclasses

    import numpy as np
    import torch

    from sdrt.backends import create_backend
    from sdrt.export import build_onnxruntime
    d = tmp_path / "eng"
    args = dict(prompt="a boat", steps=3, sampler="Euler", seed=3, width=64, height=64)
    pipe = sdrt.Pipeline(tiny.components, create_backend("onnxruntime", tiny.components, "cpu", "float32",
                                                         engine_dir=str(d)))
    before = pipe(**args)
    other_text = copy.deepcopy(tiny.components.text_encoder)
    with torch.no_grad():
        for p in other_text.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other = dataclasses.replace(tiny.components, text_encoder=other_text, model_hash="0ther0ne00")
    build_onnxruntime(other, d, networks=("text_encoder", "unet", "vae_decoder"), log=lambda m: None)
    assert np.array_equal(pipe(**args).pixels, before.pixels)
