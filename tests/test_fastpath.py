"""The static loop (sdrt.fastpath) and cross-attention K/V caching (sdrt.attention): the same
images as the eager loop for the same seed, on a CPU (eager execution of the static body) and,
where a GPU is present, as a captured CUDA graph."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import sdrt
from sdrt import samplers
from sdrt.backends.torch_backend import UNTUNED
from sdrt.fastpath import step_table, unsupported_reason

SIGMAS = {
    "uniform": np.array([14.61, 9.7, 6.2, 3.9, 2.2, 1.1, 0.45, 0.13, 0.0]),
    "short": np.array([3.0, 0.5, 0.0]),
    "no-zero": np.array([10.0, 4.0, 1.5, 0.3]),
}


@pytest.fixture(scope="module")
def pipe():
    p = sdrt.Pipeline.from_pretrained("random:tiny")
    yield p
    p.backend.enable_kv_cache(False)


def _model(x, sigma):
    """A deterministic nonlinear stand-in for the denoiser (float64)."""
    return torch.tanh(x) * 0.8 + 0.05 * math.log1p(sigma) * torch.sin(3 * x)


@pytest.mark.parametrize("sigmas", list(SIGMAS))
@pytest.mark.parametrize("sampler,eta,solver", [
    ("Euler", None, None), ("Euler a", None, None), ("Euler a", 0.5, None), ("DDIM", 0.0, None), ("DDIM", 0.8, None),
    ("DPM++ 2M", None, None), ("DPM++ 2M SDE", None, None), ("DPM++ 2M SDE", 0.0, None),
    ("DPM++ 2M SDE", 0.7, "heun"), ("LCM", None, None)])
def test_step_table_reproduces_the_eager_sampler(sampler, eta, solver, sigmas):
    """x' = a x + b D + e D_prev + n noise, run with the table, equals sdrt.samplers' own loop
    (float64, the same stand-in model and noise)."""
    sig = SIGMAS[sigmas]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    noises = [torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64) for _ in range(len(sig))]
    spec = samplers.SAMPLERS[sampler]
    drawn = []

    def noise(s, s2):
        drawn.append(s)
        return noises[len(drawn) - 1]
    kwargs = {"eta": eta if eta is not None else spec.eta_default} if spec.eta_default is not None else {}
    extra = {"solver_type": solver} if solver else {}
    want = spec.fn(_model, x0.clone(), sig, noise=noise, **kwargs, **extra)

    table, draws = step_table(sampler, sig, eta=kwargs.get("eta"), **extra)
    it = iter(noises)
    x, d_prev = x0.clone(), None
    for i, (c_skip, c_out, a, b, e, n, _, _) in enumerate(table):
        assert (c_skip, c_out) == (1.0, -sig[i])
        d = _model(x, sig[i])
        noise = next(it) if draws[i] else None
        x = a * x + b * d + (e * d_prev if e else 0) + (n * noise if n else 0)
        d_prev = d
    assert torch.allclose(x, want, rtol=1e-10, atol=1e-10)
    assert sum(draws) == len(drawn)          # the same number of draws, so later ones line up


def test_step_table_noise_draws_and_input_scaling():
    sig = SIGMAS["uniform"]
    assert not any(step_table("Euler a", sig, eta=0.0)[1])          # eta 0: Euler, no noise drawn
    assert step_table("Euler a", sig)[1] == [True] * (len(sig) - 2) + [False]
    assert not any(step_table("DDIM", sig)[1])                      # DDIM's default eta is 0
    table, _ = step_table("Euler", sig)
    assert np.allclose(table[:, 6], 1 / np.sqrt(sig[1:] ** 2 + 1))
    v, _ = step_table("Euler", sig, v_prediction=True)
    assert np.allclose(v[:, 0], 1 / (sig[:-1] ** 2 + 1)) and np.allclose(v[:, 1], -sig[:-1] / np.sqrt(sig[:-1] ** 2 + 1))


def test_step_table_refuses_other_samplers_and_bad_sigmas():
    with pytest.raises(ValueError, match="no fused step"):
        step_table("Heun", SIGMAS["uniform"])
    with pytest.raises(ValueError, match="decreasing"):
        step_table("Euler", [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="solver_type"):
        step_table("DPM++ 2M SDE", SIGMAS["uniform"], solver_type="euler")


def _compare(pipe, **kw):
    args = dict(prompt="a cat", steps=6, width=64, height=64, seed=7)
    args.update(kw)
    pipe.set_fast_path(False)
    eager = pipe(**args)
    pipe.set_fast_path()
    static = pipe(**args)
    return eager, static


@pytest.mark.parametrize("kw", [
    dict(sampler="Euler a"),
    dict(sampler="DPM++ 2M", schedule="Karras"),
    dict(sampler="DDIM", eta=0.7, rng="cpu"),
    dict(sampler="LCM"),
    dict(sampler="DPM++ 2M SDE", schedule="Karras", batch_size=2, seed=[4, 9]),
    dict(sampler="Euler", prompt="a [cat:dog:0.4] photo", negative_prompt="[blurry::2]", batch_size=2,
         cfg_scale=[5.0, 9.0], seed=[3, 11]),
    dict(sampler="Euler a", rng="nv", eta_noise_seed_delta=31337, subseed=5, subseed_strength=0.3),
])
def test_static_loop_equals_the_eager_loop(pipe, kw):
    eager, static = _compare(pipe, **kw)
    assert len(pipe.loops) == 1
    assert np.abs(eager.pixels - static.pixels).max() <= 1e-4
    assert eager.infotexts == static.infotexts and eager.seeds == static.seeds
    for a, b in zip(eager.images, static.images):             # uint8 truncation may flip by one
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_static_loop_with_v_prediction(pipe):
    schedule = pipe.components.schedule
    pipe.components.schedule = dataclasses.replace(schedule, prediction_type="v_prediction")
    try:
        eager, static = _compare(pipe, sampler="DPM++ 2M")
    finally:
        pipe.components.schedule = schedule
    assert np.abs(eager.pixels - static.pixels).max() <= 1e-4


def test_a_cached_loop_replays_new_inputs(pipe):
    """The second generation on the same loop reads its own seeds, prompts and scales from the
    static buffers (nothing of the first call is baked in)."""
    pipe.set_fast_path()
    pipe(prompt="first", steps=5, width=64, height=64, seed=1, sampler="Euler a", cfg_scale=3.0)
    loop = next(iter(pipe.loops.values()))
    static = pipe(prompt="second", steps=5, width=64, height=64, seed=2, sampler="Euler a", cfg_scale=8.0)
    assert next(iter(pipe.loops.values())) is loop and len(pipe.loops) == 1
    pipe.set_fast_path(False)
    eager = pipe(prompt="second", steps=5, width=64, height=64, seed=2, sampler="Euler a", cfg_scale=8.0)
    assert np.abs(eager.pixels - static.pixels).max() <= 1e-4


def test_unsupported_requests_run_eagerly(pipe):
    pipe.set_fast_path()
    r = pipe(prompt="a cat AND a dog :0.5", steps=3, width=64, height=64, seed=1, sampler="Euler")
    pipe(prompt="a cat", steps=3, width=64, height=64, seed=1, sampler="Heun")
    assert len(pipe.loops) == 0 and len(r.images) == 1
    job = pipe.validate(sdrt.GenerationParams("a AND b", steps=2, sampler="Euler", seed=1, width=64, height=64))
    assert "AND" in unsupported_reason(job, pipe.encode(job))


def test_static_loop_reports_nan_and_steps(pipe):
    pipe.set_fast_path()
    steps = []
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        pipe(prompt="a cat", steps=4, width=64, height=64, seed=1, sampler="Euler", cfg_scale=1e38)
    pipe(prompt="a cat", steps=4, width=64, height=64, seed=1, sampler="Euler",
         callback=lambda i, n: steps.append((i, n)))
    assert steps == [(i, 4) for i in range(1, 5)]


def test_loop_cache_evicts_least_recent(pipe):
    pipe.set_fast_path(cache_size=2)
    for size in (64, 72, 80):
        pipe(prompt="a cat", steps=2, width=size, height=64, seed=1, sampler="Euler")
    assert len(pipe.loops) == 2
    assert sorted(k[1][2] for k in pipe.loops.keys()) == [9, 10]


def test_kv_cache_same_image_and_once_per_conditioning(pipe):
    args = dict(prompt="a [cat:dog:0.5] photo", negative_prompt="ugly", steps=6, width=64, height=64, seed=4,
                sampler="Euler a", batch_size=2)
    pipe.set_fast_path(False)
    pipe.backend.enable_kv_cache(False)
    plain = pipe(**args)
    pipe.backend.enable_kv_cache(True)
    kv = pipe.backend.kv
    try:
        hits = kv.hits
        cached = pipe(**args)
        assert kv.hits - hits == 6 * len(kv.layers) and kv.misses == 0     # every step, every layer
        assert all(not p.table for _, p in kv.layers)                      # nothing left behind
        assert np.abs(plain.pixels - cached.pixels).max() <= 1e-5
        pipe.set_fast_path(cache_size=1)
        static = pipe(**args)
        assert np.abs(plain.pixels - static.pixels).max() <= 1e-4
        assert all(len(p.table) == 2 for _, p in kv.layers)                # the loop's two contexts
        pipe(**dict(args, width=72))                                       # evicts and releases it
        assert all(len(p.table) == 2 for _, p in kv.layers)
        pipe.set_fast_path()                                               # a new cache releases the old
        assert all(len(p.table) == 0 for _, p in kv.layers)
    finally:
        pipe.backend.enable_kv_cache(False)
    assert not any(hasattr(m, "processor") and type(m.processor).__name__ == "CachedKVProcessor"
                   for m in pipe.backend.unet_module.modules())


def test_a_new_backend_on_the_same_modules_starts_without_cached_kv(pipe):
    from sdrt.backends.torch_backend import TorchBackend
    pipe.backend.enable_kv_cache(True)
    try:
        fresh = TorchBackend(pipe.components, torch.device("cpu"), torch.float32)
        assert fresh.kv is None
        assert not any(type(getattr(m, "processor", None)).__name__ == "CachedKVProcessor"
                       for m in fresh.unet_module.modules())
        assert not pipe.backend.kv.installed()
        pipe.backend.enable_kv_cache(True)              # reinstalls rather than trusting a stale cache
        assert pipe.backend.kv.installed()
    finally:
        pipe.backend.enable_kv_cache(False)


def test_kv_processor_falls_back_for_unknown_contexts(pipe):
    be = pipe.backend
    be.enable_kv_cache(True)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.full((2,), 400.0)
        ctx = torch.randn(2, 77, pipe.components.text_encoder.config.hidden_size, generator=g)
        uncached = be.unet(x, t, ctx)
        assert be.kv.misses == len(be.kv.layers)
        with be.kv.scope([ctx]):
            cached = be.unet(x, t, ctx)
            hits = be.kv.hits
            other = ctx.clone()                  # same values, another tensor
            other_out = be.unet(x, t, other)
            assert be.kv.hits == hits            # never served keys and values it was not given
            be.unet(x, t, ctx.view(ctx.shape))   # a view of the same memory: served
            assert be.kv.hits == hits + len(be.kv.layers)
            key = next(iter(be.kv.layers[0][1].table))
            k, v, _ = be.kv.layers[0][1].table[key]
            be.kv.layers[0][1].table[key] = (k, v, lambda: None)     # its tensor died: the address may be reused
            be.unet(x, t, ctx)
            assert be.kv.hits == hits + 2 * len(be.kv.layers) - 1
        assert torch.allclose(uncached, cached, atol=1e-6) and torch.allclose(uncached, other_out, atol=1e-6)
    finally:
        be.enable_kv_cache(False)


def test_engine_batches_on_the_static_loop():
    p = sdrt.Pipeline.from_pretrained("random:tiny", fast_path=True)
    with sdrt.Engine(p, max_batch_size=2, max_wait=0.5) as engine:
        futures = [engine.submit(prompt=f"a cat {i}", steps=4, width=64, height=64, seed=i, sampler="Euler a")
                   for i in range(2)]
        batched = [f.result(timeout=60) for f in futures]
    assert len(p.loops) >= 1
    p.set_fast_path(False)
    for i, r in enumerate(batched):
        solo = p(prompt=f"a cat {i}", steps=4, width=64, height=64, seed=i, sampler="Euler a")
        assert np.abs(solo.pixels - r.pixels).max() <= 1e-4


# ---------------------------------------------------------------- GPU: the captured graph

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_graph_replay_equals_eager(dtype, monkeypatch):
    # float32 compared at 1e-4 needs full float32 arithmetic: with cuDNN's default TF32
    # convolutions the eager and replayed images differed by up to 1.0e-3 on an H200
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    p = sdrt.Pipeline.from_pretrained("random:tiny", device="cuda", dtype=dtype)
    args = dict(prompt="a [cat:dog:0.5]", steps=8, width=64, height=64, seed=3, sampler="Euler a", batch_size=2)
    eager = p(**args)
    p.set_fast_path()
    first = p(**args)                      # the capture's warm-up run
    second = p(**dict(args, seed=4))        # a replay
    loop = next(iter(p.loops.values()))
    assert loop.capture and loop.replays == 1
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert np.abs(eager.pixels - first.pixels).max() <= tol
    p.set_fast_path(False)
    assert np.abs(p(**dict(args, seed=4)).pixels - second.pixels).max() <= tol


# ---------------------------------------------------------------- capture and replay, on a CPU

def test_capture_order_and_replay_with_a_fake_graph_api():
    """The loop warms up on a side stream (that run gives the first generation's images) and
    captures once; every later generation is inputs -> replay -> one synchronisation; replays of a graph recorded op by op (tests/cuda_graph_fake.py)
    give the eager images for new seeds, prompts and scales, so nothing per-generation is baked in
    and nothing in the body synchronises with the host."""
    from cuda_graph_fake import FakeCuda
    p = sdrt.Pipeline.from_pretrained("random:tiny")
    p.backend.enable_kv_cache(True)
    calls = []
    unet = p.backend.unet
    p.backend.unet = lambda *a: calls.append(1) or unet(*a)
    fake = FakeCuda()
    p.set_fast_path(capture=True, cuda=fake)
    runs = [dict(prompt="a [cat:dog:0.5]", seed=3, cfg_scale=5.0),
            dict(prompt="a [red:blue:0.5] cube", seed=8, cfg_scale=[9.0, 2.0]),
            dict(prompt="a [cat:dog:0.5]", seed=11, cfg_scale=7.0)]
    got = [p(steps=6, width=64, height=64, sampler="Euler a", batch_size=2, **r) for r in runs]
    assert fake.events == ["side waits for current", "enter side stream", "leave side stream",
                           "current waits for side", "capture begin (thread_local)", "capture end",
                           "current synchronize", "replay", "current synchronize", "replay", "current synchronize"]
    assert len(calls) == 12                         # the body ran twice (warm-up, capture), replays run none
    loop = next(iter(p.loops.values()))
    assert loop.replays == 2 and len(fake.graphs) == 1
    p.set_fast_path(False)
    for r, g in zip(runs, got):
        want = p(steps=6, width=64, height=64, sampler="Euler a", batch_size=2, **r)
        assert np.abs(want.pixels - g.pixels).max() <= 1e-4
    p.backend.enable_kv_cache(False)


def test_fake_graph_refuses_a_host_synchronisation():
    from cuda_graph_fake import FakeCuda
    fake = FakeCuda()
    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="synchronises with the host"):
        with fake.graph(fake.CUDAGraph()):
            (x * 2).sum().item()


def test_cross_attention_kernel_path_gives_the_same_image(pipe):
    """enable_kv_cache(custom_kernel=True) routes cross-attention through sdrt.kernels'
    cross_attention (its torch reference on a CPU, the CUDA kernel on a GPU)."""
    args = dict(prompt="a [cat:dog:0.5] photo", steps=4, width=64, height=64, seed=6, sampler="Euler a")
    pipe.set_fast_path(False)
    pipe.backend.enable_kv_cache(False)
    plain = pipe(**args)
    try:
        pipe.backend.enable_kv_cache(True, custom_kernel=True)
        assert all(p.custom_kernel for _, p in pipe.backend.kv.layers)
        custom = pipe(**args)
        pipe.set_fast_path()
        static = pipe(**args)
    finally:
        pipe.backend.enable_kv_cache(False)
        pipe.set_fast_path(False)
    assert np.abs(plain.pixels - custom.pixels).max() <= 1e-5
    assert np.abs(plain.pixels - static.pixels).max() <= 1e-4


# ---------------------------------------------------------------- speed options (Pipeline.tune)

def test_tune_options_keep_the_image_and_drop_invalidated_graphs(pipe):
    """channels_last replaces the weight tensors (graphs captured before would read freed
    memory), so Pipeline.tune drops the cached loops when it does; the SDPA order and cuDNN
    autotuning leave the image alone."""
    args = dict(prompt="a [cat:dog:0.5] photo", steps=4, width=64, height=64, seed=6, sampler="Euler a")
    pipe.set_fast_path(False)
    plain = pipe(**args)
    pipe.set_fast_path()
    pipe(**args)
    assert len(pipe.loops) == 1
    be = pipe.backend
    try:
        pipe.tune(sdpa_order=("cudnn", "flash", "efficient", "math"), cudnn_benchmark=True)
        assert len(pipe.loops) == 1                                # no weights moved: graphs stay
        pipe.tune(channels_last=True)
        assert len(pipe.loops) == 0
        assert be.options == dict(channels_last=True, cudnn_benchmark=True,
                                  sdpa_order=("cudnn", "flash", "efficient", "math"), compile=None, quantize=None)
        w = be.unet_module.conv_in.weight
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        tuned = pipe(**args)
        pipe.set_fast_path(False)
        tuned_eager = pipe(**args)
    finally:
        pipe.tune(**UNTUNED)
        pipe.set_fast_path(False)
    assert be.options == dict(channels_last=False, cudnn_benchmark=False, sdpa_order=None, compile=None,
                              quantize=None)
    assert be.unet_module.conv_in.weight.is_contiguous() and not torch.backends.cudnn.benchmark
    assert np.abs(plain.pixels - tuned.pixels).max() <= 1e-4
    assert np.abs(plain.pixels - tuned_eager.pixels).max() <= 1e-4


@pytest.mark.parametrize("order", [("fastest",), (), "flash"])
def test_tune_refuses_a_bad_sdpa_order_before_changing_anything(pipe, order):
    with pytest.raises(ValueError, match="sdpa_order"):
        pipe.tune(channels_last=True, sdpa_order=order)
    assert pipe.backend.options["channels_last"] is False


def test_tune_belongs_to_the_torch_backend(tmp_path, capsys):
    from sdrt.cli import main
    from sdrt.server import ServerConfig, ServerState
    assert main(["generate", "a cat", "--backend", "onnxruntime", "--channels-last", "-o",
                 str(tmp_path / "x.png")]) != 0
    assert "channels_last: speed options of backend 'torch'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="channels_last: speed options of backend 'torch'"):
        ServerState(ServerConfig(backend="onnxruntime", channels_last=True))
    assert main(["generate", "a cat", "--backend", "onnxruntime", "--compile", "default", "-o",
                 str(tmp_path / "x.png")]) != 0
    assert "compile: speed options of backend 'torch'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="compile: speed options of backend 'torch'"):
        ServerState(ServerConfig(backend="onnxruntime", compile="default"))


def test_cli_channels_last_gives_the_same_image(tmp_path):
    from PIL import Image

    from sdrt.cli import main
    common = ["--model", "random:tiny", "--steps", "3", "--seed", "4", "--quiet"]
    assert main(["generate", "a lighthouse", *common, "-o", str(tmp_path / "a.png")]) == 0
    assert main(["generate", "a lighthouse", *common, "--channels-last", "-o", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=int) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_tune_compile_runs_the_compiled_unet_in_both_loops(pipe, dynamo_only):
    args = dict(prompt="a [cat:dog:0.5] photo", steps=3, width=64, height=64, seed=2, sampler="DPM++ 2M")
    be = pipe.backend
    pipe.set_fast_path(False)
    plain = pipe(**args)
    with pytest.raises(ValueError, match="K/V cache"):
        be.enable_kv_cache(True)
        be.tune(compile="default")
    be.enable_kv_cache(False)
    try:
        pipe.tune(compile="default")
        assert be.unet_module is not be._eager_unet and dynamo_only == ["default"]   # wrapped on first use
        assert be.options["compile"] == "default"
        with pytest.raises(ValueError, match="torch.compile"):
            be.enable_kv_cache(True)
        eager = pipe(**args)
        pipe.set_fast_path()
        static = pipe(**args)
        from sdrt.backends import create_backend
        other = create_backend("torch", pipe.components, "cpu", "float32")
        other.tune(compile="default")
        assert other.unet_module is be.unet_module and dynamo_only == ["default"]   # one wrapper per module
    finally:
        pipe.tune(compile=False)
        pipe.set_fast_path(False)
    assert be.unet_module is be._eager_unet and be.options["compile"] is None
    assert np.abs(plain.pixels - eager.pixels).max() <= 1e-5
    assert np.abs(plain.pixels - static.pixels).max() <= 1e-4


@pytest.mark.parametrize("bad", [True, 3])
def test_tune_compile_takes_a_mode(pipe, bad):
    with pytest.raises(ValueError, match="torch.compile mode"):
        pipe.tune(compile=bad)


@pytest.mark.slow
def test_cli_compile_gives_the_same_image(tmp_path, dynamo_only):
    from PIL import Image

    from sdrt.cli import main
    common = ["--model", "random:tiny", "--steps", "3", "--seed", "4", "--quiet", "--fast-path"]
    assert main(["generate", "a lighthouse", *common, "-o", str(tmp_path / "a.png")]) == 0
    assert main(["generate", "a lighthouse", *common, "--compile", "default", "--channels-last",
                 "-o", str(tmp_path / "b.png")]) == 0
    assert dynamo_only == ["default"]
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=int) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1
