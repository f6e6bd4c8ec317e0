import importlib.util
import sys
import types

import pytest


@pytest.fixture(scope="session")
def tiny():
    """The random:tiny pipeline on the torch backend (CPU, float32), shared by the session."""
    import sdrt
    return sdrt.Pipeline.from_pretrained("random:tiny")


@pytest.fixture(scope="session")
def ksampling():
    """``k_diffusion.sampling`` from the PyPI package k-diffusion, installed without its training
    dependencies: its package __init__ and utils import torchvision and more, so an empty package
    module is registered and utils gets a stand-in for torchvision's transforms."""
    import diffusers  # noqa: F401 - diffusers inspects torchvision's spec; import it first

    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.fail("k-diffusion is not installed: run scripts/setup.sh test")
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = pkg
    stand_ins = {}
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.__path__ = []
        tr = types.ModuleType("torchvision.transforms")
        tr.__path__ = []
        trf = types.ModuleType("torchvision.transforms.functional")
        tv.transforms, tr.functional = tr, trf
        stand_ins = {"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": trf}
        sys.modules.update(stand_ins)
    try:
        import k_diffusion.sampling as sampling
    finally:
        # k_diffusion.utils has bound the stand-in; remove it so that diffusers and transformers,
        # which look torchvision up lazily, still see it as absent
        for name in stand_ins:
            sys.modules.pop(name, None)
    return sampling


@pytest.fixture
def dynamo_only(monkeypatch):
    """torch.compile through dynamo without inductor (seconds, not minutes, on a CPU): the
    wiring is what these tests check; the compiled speed is the GPU suite's business."""
    import torch._dynamo

    from sdrt.backends import torch_backend
    calls = []
    real = torch.compile

    def compile_(module, mode=None, dynamic=None, **kw):
        calls.append(mode)
        return real(module, backend="eager", dynamic=dynamic)
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch_backend, "_COMPILED", __import__("weakref").WeakKeyDictionary())
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def torch_pipe():
    """A fresh random:tiny pipeline (torch backend) per module, for tests that change its state."""
    import sdrt
    return sdrt.Pipeline.from_pretrained("random:tiny")


@pytest.fixture(scope="module")
def trt_engines(tmp_path_factory, torch_pipe):
    """An engine folder built with the fake TensorRT (tests/tensorrt_fake.py) for its PROFILE,
    whose engines compute what torch_pipe's modules compute."""
    import tensorrt_fake as fake

    from sdrt.export.tensorrt import BuildOptions, build_tensorrt
    d = tmp_path_factory.mktemp("trt")
    build_tensorrt(torch_pipe.components, d, profile=fake.PROFILE, options=BuildOptions(precision="fp32"),
                   trt=fake.module(), arch="sm_90", log=lambda m: None)
    fake.compute_with(torch_pipe.components, torch_pipe.backend)
    return d
