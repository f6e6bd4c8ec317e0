"""The benchmark harness works on random:tiny (how fast is the harness's business, not the tests')."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdrt.bench import Settings, chart, format_table, run_benchmark, run_sweep

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    s = Settings(model="random:tiny", backends=("torch", "onnxruntime", "nope"), references=("diffusers", "openvino", "optimum"),
                 steps=3, height=64, width=64, batch=2, repeat=1, warmup=1,
                 engine_dir=str(tmp_path_factory.mktemp("eng")))
    return run_benchmark(s, log=lambda m: None)


def test_rows_and_ratios(record):
    rows = {r["name"]: r for r in record["rows"]}
    assert set(rows) == {"torch", "onnxruntime", "nope", "diffusers", "openvino", "optimum"}
    assert rows["nope"]["status"].startswith("skipped") and "torch" in rows["nope"]["status"]
    assert rows["optimum"]["status"].startswith("skipped")
    for name in ("torch", "onnxruntime", "diffusers", "openvino"):
        r = rows[name]
        assert r["status"] == "ok"
        st = r["stats"]
        assert st["total"]["min"] <= st["total"]["median"] <= st["total"]["max"]
        assert st["unet_all"]["median"] > 0 and r["unet_calls"] == 3
        assert r["images_per_s"] == pytest.approx(2 / st["total"]["median"])
        assert r["peak_rss_mb"] > 0
    assert rows["diffusers"]["speedup_vs_diffusers"] == pytest.approx(1.0)
    assert rows["torch"]["speedup_vs_diffusers"] == pytest.approx(
        rows["diffusers"]["stats"]["total"]["median"] / rows["torch"]["stats"]["total"]["median"])
    # quality next to speed: the torch backend is the reference itself; the others are close to it
    assert rows["torch"]["max_abs_diff"] == 0.0
    assert rows["onnxruntime"]["max_abs_diff"] < 1e-3 and rows["diffusers"]["max_abs_diff"] < 1e-4
    assert rows["openvino"]["max_abs_diff"] < 1e-3         # the peer runs the same networks (OpenVINO, float32)
    assert record["versions"]["openvino"]
    assert record["machine"]["cores"] >= 1 and "torch" in record["versions"]
    json.dumps(record, default=float)


def test_table_and_chart(record, tmp_path):
    table = format_table(record)
    assert "vs diffusers" in table and "onnxruntime" in table and "skipped" in table
    path = chart(record, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_backend_that_cannot_serve_the_size_fails_alone(tmp_path):
    from sdrt.export import Profile, build_onnxruntime
    from sdrt.models import build_random
    build_onnxruntime(build_random("tiny"), tmp_path, profile=Profile(height=(32, 64, 64), width=(32, 64, 64)),
                      log=lambda m: None)
    s = Settings(model="random:tiny", backends=("torch", "onnxruntime"), references=(), steps=2, height=96,
                 width=96, repeat=1, warmup=0, engine_dir=str(tmp_path))
    rows = {r["name"]: r for r in run_benchmark(s, log=lambda m: None)["rows"]}
    assert rows["onnxruntime"]["status"].startswith("failed") and "96" in rows["onnxruntime"]["status"]
    assert rows["torch"]["status"] == "ok"


def test_sweep_fits_a_per_step_cost():
    s = Settings(model="random:tiny", backends=("torch",), references=(), height=64, width=64, repeat=1, warmup=1)
    sweep = run_sweep(s, "steps", [2, 8], log=lambda m: None)
    fit = sweep["fits"]["torch"]
    assert fit["slope"] > 0 and len(sweep["points"]["torch"]) == 2
    with pytest.raises(ValueError, match="sweep axis"):
        run_sweep(s, "colour", [1], log=lambda m: None)


def test_cli_bench_suite(tmp_path):
    from sdrt.cli import main
    out = tmp_path / "r.json"
    rc = main(["bench", "--suite", "tiny", "--backends", "torch", "--repeat", "1", "--steps", "2",
               "--json", str(out), "--chart", str(tmp_path / "r.png")])
    assert rc == 0 and json.loads(out.read_text())["suite"] == "tiny" and (tmp_path / "r.png").is_file()
    assert main(["bench", "--suite", "no-such-suite"]) == 2


def test_gpu_suite_refuses_without_a_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run for minutes")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "run.py")], capture_output=True, text=True)
    assert p.returncode == 2 and "no CUDA GPU" in p.stderr


def test_serving_benchmark_reports_ratios_side_by_side(tiny):
    from sdrt.bench import format_serving, run_serving
    record = run_serving(tiny, clients=4, per_client=1, rounds=1, log=lambda m: None,
                         modes={"one-at-a-time": (1, 0.0, None), "dynamic": (4, 0.5, None)},
                         request=dict(steps=2, width=64, height=64, sampler="Euler"))
    one, dyn = record["modes"]["one-at-a-time"], record["modes"]["dynamic"]
    assert one["latency_s"]["n"] == dyn["latency_s"]["n"] == 4
    assert one["mean_batch_size"] == 1.0 and dyn["mean_batch_size"] > 1.0     # the clients were batched
    assert one["throughput_vs_one_at_a_time"] == 1.0
    assert dyn["throughput_vs_one_at_a_time"] == dyn["images_per_s"] / one["images_per_s"]
    assert record["single_request_latency_s"]["direct"] > 0
    assert "dynamic" in format_serving(record)


def test_fastpath_benchmark_runs_every_cpu_variant():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fastpath
    finally:
        sys.path.pop(0)
    rec = fastpath.end_to_end("random:tiny", size=64, steps=3, repeat=1, log=lambda m: None)
    assert set(rec["rows"]) == {"eager", "eager+kv", "static-ops", "static-ops+kv", "diffusers"}
    for name, row in rec["rows"].items():
        assert row["median_s"] > 0 and row["max_abs_diff_vs_eager"] <= 1e-4, name
    assert rec["kv_layers"] > 0
