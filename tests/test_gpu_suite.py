"""The GPU suite (benchmarks/gpu/run.py) on a CPU, with torch.cuda's graph, stream and event API
replaced by the recording fake: its sections run, write their results and the summary, so a
lent GPU's minutes are not lost to a bug in the harness. (The numbers here mean nothing.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture
def fake_cuda(monkeypatch):
    import diffusers.models.autoencoders.autoencoder_kl  # noqa: F401 - its type hints use torch.cuda.Stream
    import diffusers.pipelines  # noqa: F401
    import fastpath
    from cuda_graph_fake import patch_torch_cuda
    fastpath._load("random:tiny")
    return patch_torch_cuda(monkeypatch)


def test_unet_levers_reset_the_backend(fake_cuda):
    import fastpath

    from sdrt.backends import create_backend
    levers = {"baseline": {}, "channels_last": dict(channels_last=True),
              "sdpa_cudnn_first": dict(sdpa_order=fastpath.CUDNN_FIRST),
              "broken": dict(channels_last=True, sdpa_order=("fastest",))}     # refused
    r = fastpath.unet_levers("random:tiny", 64, 1, "cpu", "float32", levers=levers, log=lambda m: None)
    assert "sdpa_order ('fastest',)" in r["errors"]["broken"]
    assert set(r["rows"]) == set(levers) - {"broken"} and r["best"] in levers
    assert all(row["seconds"] > 0 and len(row["runs"]) == 2 for row in r["rows"].values())
    assert r["rows"]["baseline"]["speedup"] == 1.0
    assert len(fake_cuda.graphs) == 6                       # one capture per lever per round
    be = create_backend("torch", fastpath._load("random:tiny"), "cpu", "float32")
    conv = next(m for m in be.unet_module.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] == 3
                and m.weight.shape[1] > 4)
    assert conv.weight.is_contiguous()                      # channels_last was undone
    assert not torch.backends.cudnn.benchmark


def test_suite_sections_and_summary(fake_cuda, tmp_path, capsys):
    import run
    rc = run.main(["--quick", "--device", "cpu", "--dtype", "float32", "--steps", "3", "--batches", "1",
                   "--variants", "static-ops+kv", "--out", str(tmp_path),
                   "--only", "unet_levers", "decode_text", "end_to_end", "unet_graph", "sdxl"])
    out = capsys.readouterr().out
    files = list(tmp_path.glob("gpu-fake-gpu-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert rc == 0, record["errors"]
    s = record["sections"]
    assert set(s) >= {"unet_levers_batch1", "decode_text_batch1", "end_to_end_batch1", "unet_graph_batch1"}
    assert set(s["end_to_end_batch1"]["rows"]) == {"eager", "static-ops+kv", "diffusers"}
    sdxl = s["sdxl_end_to_end_batch1"]         # SDXL beside diffusers' SDXL pipeline (tiny here)
    assert sdxl["model"] == "random:sdxl-tiny" and set(sdxl["rows"]) == {"eager", "static-ops+kv", "diffusers"}
    assert sdxl["rows"]["static-ops+kv"]["max_abs_diff_vs_eager"] < 1e-4
    assert "SDXL random:sdxl-tiny" in out
    assert s["decode_text_batch1"]["vae_decode_s"] > 0 and s["unet_graph_batch1"] > 0
    if s["unet_levers_batch1"]["rows"][s["unet_levers_batch1"]["best"]]["speedup"] > 1.02:
        assert s["end_to_end_tuned_batch1"]["tune"] == s["unet_levers_batch1"]["best_tune"]
    assert "UNet levers" in out and "default options" in out


def test_suite_refuses_unknown_variants(fake_cuda, tmp_path):
    import run
    assert run.main(["--quick", "--device", "cpu", "--dtype", "float32", "--variants", "static-fast",
                     "--out", str(tmp_path), "--only", "end_to_end"]) == 2


def test_suite_compile_sections(fake_cuda, dynamo_only, tmp_path):
    import run
    rc = run.main(["--quick", "--device", "cpu", "--dtype", "float32", "--steps", "3", "--batches", "1",
                   "--variants", "static-ops+kv", "--compile", "default", "--out", str(tmp_path),
                   "--only", "compile", "end_to_end_compiled"])
    record = json.loads(next(tmp_path.glob("gpu-fake-gpu-*.json")).read_text())
    assert rc == 0, record["errors"]
    s = record["sections"]
    assert s["compile_batch1"]["compiled_s"] > 0 and s["compile_batch1"]["mode"] == "default"
    assert set(s["end_to_end_compiled_batch1"]["rows"]) == {"eager", "static-ops", "diffusers"}
    assert s["end_to_end_compiled_batch1"]["tune"] == {"channels_last": True, "compile": "default"}
    assert dynamo_only and set(dynamo_only) == {"default"}
    import fastpath

    from sdrt.backends import create_backend
    be = create_backend("torch", fastpath._load("random:tiny"), "cpu", "float32")
    assert be.options["compile"] is None and not be.channels_last


def test_suite_inductor_section(fake_cuda, dynamo_only, tmp_path, capsys):
    """--inductor compiles the UNet again (the cached wrapper is forgotten) with the settings in
    force, restores them, and appears in the summary; bad settings are refused before measuring."""
    import run
    import torch._inductor.config as inductor_config
    before = inductor_config.conv_1x1_as_mm
    rc = run.main(["--quick", "--device", "cpu", "--dtype", "float32", "--batches", "1", "--compile", "default",
                   "--inductor", f"conv_1x1_as_mm={not before}", "--out", str(tmp_path),
                   "--only", "compile"])
    record = json.loads(next(tmp_path.glob("gpu-fake-gpu-*.json")).read_text())
    assert rc == 0, record["errors"]
    s = record["sections"]
    assert s["compile_inductor_batch1"]["inductor"] == {"conv_1x1_as_mm": not before}
    assert s["compile_inductor_batch1"]["compiled_s"] > 0 and s["compile_batch1"]["inductor"] == {}
    assert dynamo_only == ["default", "default"]            # compiled again, not the cached wrapper
    assert inductor_config.conv_1x1_as_mm == before
    assert "conv_1x1_as_mm" in capsys.readouterr().out
    for bad in (["--inductor", "no_such_setting=1"], ["--inductor", "conv_1x1_as_mm=yes please"],
                ["--inductor", "conv_1x1_as_mm"]):
        assert run.main(["--quick", "--device", "cpu", "--compile", "default", "--out", str(tmp_path)] + bad) == 2
    assert run.main(["--quick", "--device", "cpu", "--inductor", "conv_1x1_as_mm=True", "--out", str(tmp_path)]) == 2


def test_suite_peer_and_float8_sections(fake_cuda, dynamo_only, tmp_path, capsys, monkeypatch):
    """--peer-compile puts diffusers compiled (its own UNet copy: channels_last, fused QKV) in the
    end-to-end rotation with its UNet alone timed, and times it again in its own process (here
    in-process: the child's own run is test_peer_subprocess) for the summary's ratio; --fp8 runs
    float8 against float32/16 compiled, with the PSNR of its image; the model's own modules are
    left as they were."""
    import fastpath
    import run
    monkeypatch.setattr(fastpath, "peer_subprocess", lambda **kw: fastpath.peer_in_process(
        **{k: v for k, v in kw.items() if k != "timeout"}))
    rc = run.main(["--quick", "--device", "cpu", "--dtype", "float32", "--steps", "3", "--batches", "1",
                   "--variants", "static-ops+kv", "--compile", "default", "--peer-compile", "reduce-overhead",
                   "--fp8", "--out", str(tmp_path), "--only", "end_to_end_batch", "fp8", "peer"])
    record = json.loads(next(tmp_path.glob("gpu-fake-gpu-*.json")).read_text())
    assert rc == 0, record["errors"]
    s = record["sections"]
    e2e = s["end_to_end_batch1"]
    assert set(e2e["rows"]) == {"eager", "static-ops+kv", "diffusers"}     # the compiled peer: not in-process
    assert e2e["rows"]["diffusers"]["unet_alone_s"] > 0
    assert "reduce-overhead" in dynamo_only
    assert all(r["rel_err"] < 0.08 for r in s["fp8_check"].values())
    fp8 = s["fp8_batch1"]
    assert set(fp8["rows"]) == {"float32", "fp8"} and fp8["compile"] == "default"
    assert 25 < fp8["rows"]["fp8"]["psnr_db"] < 200 and fp8["rows"]["fp8"]["unet_alone_s"] > 0
    peer = s["peer_compiled"]["batches"]["1"]
    assert peer["median_s"] > 0 and peer["unet_alone_s"] > 0 and peer["max_abs_diff_vs_diffusers"] < 1e-3
    versus = record["versus_peers"]["1"]
    assert versus["sdrt_best"].startswith("end_to_end_batch1/") and versus["ratio"] > 0
    out = capsys.readouterr().out
    assert "float8 linear layers" in out and "vs the best peer" in out
    components = fastpath._load("random:tiny")
    from diffusers.models.attention_processor import AttnProcessor2_0
    assert all(type(p) is AttnProcessor2_0 for p in components.unet.attn_processors.values())   # not fused
    assert not any(type(m).__name__ == "Float8Linear" for m in components.unet.modules())


def test_peer_subprocess_times_the_compiled_peer_apart(tmp_path):
    """The compiled peer in a child process (CUDA graphs of two owners never share one process):
    the same seeded weights, so its image equals diffusers eager's."""
    import fastpath
    logs, parts = [], []
    r = fastpath.peer_subprocess(model="random:tiny", size=64, steps=2, batches=[1], device="cpu", dtype="float32",
                                 mode="default", repeat=1, timeout=300, log=logs.append,
                                 on_batch=lambda p: parts.append(json.loads(json.dumps(p))))
    row = r["batches"]["1"]
    assert parts and parts[-1]["batches"]["1"] == row               # passed on as soon as measured
    assert row["median_s"] > 0 and row["max_abs_diff_vs_diffusers"] < 1e-3
    assert any(line.startswith("diffusers-compiled (default) batch 1") for line in logs)
    with pytest.raises(RuntimeError, match="exited 1"):
        fastpath.peer_subprocess(model="random:nonexistent", size=64, steps=2, batches=[1], device="cpu",
                                 dtype="float32", mode="default", repeat=1, timeout=300)


def test_interrogator_section(fake_cuda, tmp_path, capsys):
    import run
    rc = run.main(["--quick", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path), "--only", "interrogator"])
    out = capsys.readouterr().out
    record = json.loads(next(tmp_path.glob("gpu-fake-gpu-*.json")).read_text())
    assert rc == 0, record["errors"]
    it = record["sections"]["interrogator"]
    assert it["terms_per_s"] > 0 and it["same_captions"] is True and it["caption_s"] > 0
    assert "interrogator: list features" in out
