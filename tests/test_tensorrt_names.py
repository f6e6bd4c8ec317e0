"""Every TensorRT name that sdrt's builder and the fake use exists in the real TensorRT 11.4
Python binding: its `tensorrt.so` (in the `tensorrt-cu13-bindings` wheel, which installs here
but cannot be imported without NVIDIA's libraries) holds every class, method and argument name
and the docstrings. scripts/setup.sh test downloads the wheel into .cache/wheels/."""
import inspect
import re
import zipfile
from pathlib import Path

import pytest
import tensorrt_fake as fake

WHEELS = Path(__file__).resolve().parent.parent / ".cache" / "wheels"


class _Names(set):
    """The binding's identifiers, plus any name stored as the tail of a longer string (the
    linker merges "INPUT" into "CONDITIONAL_INPUT": enum member names hide there; and
    "set_named_weights" into "unset_named_weights", where the method's docstring constant,
    ``RefitterDoc::set_named_weights``, still names it)."""

    def __init__(self, words, data: bytes):
        super().__init__(words)
        self.data = data

    def __contains__(self, name):
        return (set.__contains__(self, name) or f"_{name}\x00".encode() in self.data
                or re.search(rb"DocL\d+" + name.encode() + rb"E", self.data) is not None)

    def enum_member(self, name: str) -> bool:
        """pybind11 keeps enum member names as NUL-terminated strings of their own (or as the
        tail of a longer one); a word inside a docstring does not count."""
        n = name.encode()
        return b"\x00" + n + b"\x00" in self.data or re.search(rb"[A-Z0-9]_" + n + rb"\x00", self.data) is not None


@pytest.fixture(scope="module")
def binding_names() -> set[str]:
    wheels = sorted(WHEELS.glob("tensorrt_cu13_bindings-11.4*.whl"))
    if not wheels:
        pytest.fail(f"no tensorrt_cu13_bindings 11.4 wheel in {WHEELS}: run scripts/setup.sh test")
    with zipfile.ZipFile(wheels[-1]) as z:
        so = next(n for n in z.namelist() if n.endswith(".so") and "tensorrt" in Path(n).name)
        data = z.read(so)
    words = set()
    for text in re.findall(rb"[\x20-\x7e]{3,}", data):          # what `strings` prints
        words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text.decode()))
    assert {"execute_async_v3", "set_tensor_address", "build_serialized_network"} <= words
    return _Names(words, data)


def fake_names() -> set[str]:
    names = set()
    for cls in fake.FAKE_CLASSES:
        names.add(cls.__name__)
        for attr, value in vars(cls).items():
            if attr.startswith("_"):
                continue
            names.add(attr)
            fn = value.fget if isinstance(value, property) else value
            if callable(fn):
                names.update(p for p in inspect.signature(fn).parameters if p != "self")
    return names


def test_every_fake_name_exists_in_the_real_binding(binding_names):
    missing = sorted(n for n in fake_names() if n not in binding_names)
    assert not missing, f"names in the fake that TensorRT 11.4 does not have: {missing}"


def test_every_name_the_builder_touched_exists_in_the_real_binding(binding_names, tiny, tmp_path):
    from sdrt.export.specs import Profile
    from sdrt.export.tensorrt import BuildOptions, build_tensorrt
    fake.TOUCHED.clear()
    build_tensorrt(tiny.components, tmp_path, profile=Profile(batch=(1, 1, 1), height=(64, 64, 64),
                                                               width=(64, 64, 64), windows=(1, 1, 1)),
                   options=BuildOptions(precision="fp16", refit=True, timing_cache=str(tmp_path / "t.cache")),
                   networks=("vae_decoder",), trt=fake.module(), arch="sm_90", log=lambda m: None,
                   on_progress=lambda *a: None)
    assert {"Builder", "OnnxParser", "create_network", "set_shape", "build_serialized_network"} <= fake.TOUCHED
    missing = sorted(n for n in fake.TOUCHED if n not in binding_names and n != "__version__")
    assert not missing, f"names the builder used that TensorRT 11.4 does not have: {missing}"


def test_every_name_the_runtime_touched_exists_in_the_real_binding(binding_names, tiny, tmp_path):
    import torch

    from sdrt.backends.tensorrt_backend import TensorRTBackend
    from sdrt.export.specs import Profile
    from sdrt.export.tensorrt import BuildOptions, build_tensorrt
    c = tiny.components
    build_tensorrt(c, tmp_path, profile=Profile(batch=(1, 1, 1), height=(64, 64, 64), width=(64, 64, 64),
                                                windows=(1, 1, 1)),
                   options=BuildOptions(precision="fp32"), trt=fake.module(), arch="sm_90", log=lambda m: None)
    fake.TOUCHED.clear()
    be = TensorRTBackend(c, torch.device("cpu"), torch.float32, tmp_path, trt=fake.module(), arch="sm_90",
                         log=lambda m: None)
    saved = fake.EXECUTORS.get("unet")
    fake.EXECUTORS["unet"] = (lambda sample, timestep, encoder_hidden_states: {"out_sample": sample * 0},
                              lambda s: {"out_sample": s["sample"]})
    try:
        x = torch.randn(2, 4, 8, 8)
        out = be.unet(x, torch.full((2,), 10.0), torch.randn(2, 77, int(c.text_encoder.config.hidden_size)))
    finally:
        fake.EXECUTORS.pop("unet")
        if saved:
            fake.EXECUTORS["unet"] = saved
    assert torch.equal(out, torch.zeros_like(x))
    assert {"Runtime", "deserialize_cuda_engine", "create_execution_context", "set_device_memory",
            "set_input_shape", "set_tensor_address", "get_tensor_shape", "execute_async_v3",
            "ExecutionContextAllocationStrategy", "TensorIOMode", "DataType"} <= fake.TOUCHED
    missing = sorted(n for n in fake.TOUCHED if n not in binding_names and n != "__version__")
    assert not missing, f"names the runtime used that TensorRT 11.4 does not have: {missing}"
    for member in ("INPUT", "USER_MANAGED", "FLOAT", "HALF", "INT64"):   # enum members it reads
        assert member in binding_names


def test_every_enum_member_of_the_fake_is_an_enum_member_of_the_real_binding(binding_names):
    """TensorRT 11 removed BuilderFlag.FP16/BF16 (weak typing) though 'FP16' still appears in its
    docstrings: enum members are checked as such."""
    missing = sorted(f"{cls.__name__}.{name}" for cls in fake.FAKE_ENUMS for name in vars(cls)
                     if not name.startswith("_") and not binding_names.enum_member(name))
    assert not missing, f"enum members in the fake that TensorRT 11.4 does not have: {missing}"
    assert not binding_names.enum_member("FP16") and not binding_names.enum_member("EXPLICIT_BATCH")
