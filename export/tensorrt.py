"""TensorRT engine builder: the exporters' ONNX graphs -> serialized engines for a deployment
target (GPU architecture + TensorRT version), with shape profiles from the export specs.

Written against the Python API that TensorRT 10 and 11 share (``tensorrt.Builder``,
``OnnxParser``, ``IBuilderConfig``, ``IOptimizationProfile``, ``IProgressMonitor``); nothing here
has run on real TensorRT (it cannot be installed on the machines this was written on): the
tests drive it through a fake of that API, and check every name it uses against the real
TensorRT 11.4 binding's name table.

Precision follows TensorRT 11, which removed weak typing (``BuilderFlag.FP16``/``BF16``): an fp16
engine is built from a float16 graph (float32 inputs and outputs, the VAE's normalisations in
float32) parsed as a strongly typed network, which TensorRT 10 builds the same way.

    trt = require_tensorrt()
    plan = build_engine(trt, "unet.onnx", "unet", profile, BuildOptions(precision="fp16"), dims)
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from .specs import Profile, model_dims, profile_shapes

INSTALL_HINT = ('pip install tensorrt  (the wheels come from NVIDIA\'s index, pypi.nvidia.com, and need an NVIDIA '
                'GPU with its driver; add --extra-index-url https://pypi.nvidia.com if pip cannot find them)')
ARCHITECTURES = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_110", "sm_120")


class Precision(str, Enum):
    """Typed precision choice (not a row of booleans): the builder flag each one sets."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass(frozen=True)
class BuildOptions:
    precision: Precision = Precision.FP16
    optimization_level: int = 3           # builder_optimization_level, 0..5
    workspace_bytes: int = 4 << 30        # MemoryPoolType.WORKSPACE limit
    refit: bool = False                   # refittable weights (LoRA later)
    timing_cache: str | None = None       # file read before and written after the build
    tiling: bool = False                  # circular padding in the UNet and VAE (seamless tiles only)

    def __post_init__(self):
        object.__setattr__(self, "precision", Precision(self.precision))
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level must be in 0..5, got {self.optimization_level}")
        if self.workspace_bytes < 1 << 20:
            raise ValueError(f"workspace_bytes must be at least 1 MiB, got {self.workspace_bytes}")


def require_tensorrt():
    """``import tensorrt`` or a RuntimeError naming the package and how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeError(f"TensorRT is not installed (Python package 'tensorrt'): {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder"):       # the PyPI stub without its NVIDIA wheels
        raise RuntimeError(f"the 'tensorrt' package here is a stub without the TensorRT libraries: {INSTALL_HINT}")
    return trt


def check_arch(target: str, native: str | None) -> str:
    """The architecture an engine is built for. TensorRT builds for the GPU it runs on, so a
    named target must be this machine's; ``native`` takes it."""
    if target != "native" and target not in ARCHITECTURES:
        raise ValueError(f"target {target!r} is unknown; valid: native, {', '.join(ARCHITECTURES)}")
    if native is None:
        raise RuntimeError("no CUDA GPU is visible: TensorRT builds engines on the GPU they are for")
    if target not in ("native", native):
        raise ValueError(f"this machine's GPU is {native}; TensorRT builds for the GPU it runs on, so build the "
                         f"{target} engines on a {target} machine (or use --target native)")
    return native


def is_static(shapes: dict) -> bool:
    return all(lo == opt == hi for lo, opt, hi in shapes.values())


def _progress_monitor(trt, on_progress: Callable[[str, int, int], None] | None):
    """An ``IProgressMonitor`` that forwards (phase, step, steps). An exception in ``on_progress``
    never crosses into TensorRT: the monitor keeps it (``error``) and cancels the build (a
    ``step_complete`` returning False), and ``build_engine`` raises it afterwards."""
    if on_progress is None:
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps, self.error = {}, None

        def _report(self, phase_name, step, steps) -> bool:
            if self.error is None:
                try:
                    on_progress(phase_name, step, steps)
                except Exception as e:  # noqa: BLE001 - raised by build_engine once TensorRT has stopped
                    self.error = e
            return self.error is None

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            self._report(phase_name, 0, num_steps)

        def step_complete(self, phase_name, step):
            return self._report(phase_name, step + 1, self.steps.get(phase_name, 0))   # False cancels

        def phase_finish(self, phase_name):
            self._report(phase_name, self.steps.get(phase_name, 0), self.steps.get(phase_name, 0))
    return Monitor()


def strongly_typed_flag(trt) -> int:
    """``create_network`` flags for a strongly typed network: the graph's own types decide each
    layer's precision. Required for typed graphs on TensorRT 10 (>= 9.2 has the flag); TensorRT 11
    types every network strongly and accepts the flag."""
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    member = getattr(flags, "STRONGLY_TYPED", None)
    return 0 if member is None else 1 << int(member)


def check_precision(trt, precision: Precision) -> None:
    """Refuse what this TensorRT cannot build. fp16 engines come from a float16 graph (strong
    typing, both 10 and 11); bf16 needs TensorRT 10's BuilderFlag.BF16, which TensorRT 11 removed
    with all weak typing, and sdrt's exporter writes no bfloat16 graph yet."""
    if precision is Precision.BF16 and not hasattr(trt.BuilderFlag, "BF16"):
        raise ValueError(f"bf16 engines need a bfloat16 ONNX graph on TensorRT {trt.__version__} (TensorRT 11 "
                         "removed BuilderFlag.BF16 with weak typing) and sdrt's exporter writes float32/float16 "
                         "graphs only: build fp16 (--dtype float16) or fp32, or use TensorRT 10")


def build_engine(trt, onnx_path: str | Path, network_name: str, shapes: dict, options: BuildOptions,
                 on_progress: Callable[[str, int, int], None] | None = None) -> bytes:
    """Parse ``onnx_path`` (external data next to it; already in the engine's precision for fp32
    and fp16, see ``build_tensorrt``) as a strongly typed network, set one optimization profile
    from ``shapes`` ({input: (min, opt, max)}), workspace limit, optimisation level, refit and
    timing cache, and return the serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak = options.precision is Precision.BF16     # fp32/fp16 are typed in the graph (build_tensorrt)
    if weak:
        check_precision(trt, options.precision)
    network = builder.create_network(0 if weak else strongly_typed_flag(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):   # reads the external data file next to it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors))
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(shapes):
        raise ValueError(f"{network_name}: the ONNX inputs {sorted(names)} differ from the export spec's "
                         f"{sorted(shapes)}; re-export the graph")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    if weak:
        config.set_flag(trt.BuilderFlag.BF16)      # TensorRT 10 only (check_precision)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)    # kept alive until the build is done
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # made on another GPU or TensorRT version: TensorRT refuses it; start a fresh one
        logging.getLogger("sdrt.export").warning(
            "%s: the timing cache %s was made on another GPU or TensorRT version; starting a fresh one",
            network_name, cache_path)
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise RuntimeError(f"{network_name}: TensorRT refused a fresh timing cache")
    monitor = _progress_monitor(trt, on_progress)
    if monitor is not None:
        config.progress_monitor = monitor
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if monitor is not None and monitor.error is not None:
        raise RuntimeError(f"the {network_name} build was cancelled: the progress callback raised "
                           f"{type(monitor.error).__name__}: {monitor.error}") from monitor.error
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build the {network_name} engine (see the log above)")
    if cache_path is not None:
        used = config.get_timing_cache()
        if used is None:           # TensorRT's way of saying there is none: keep the plan, skip the cache
            logging.getLogger("sdrt.export").warning("%s: no timing cache to save after the build", network_name)
        else:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(used.serialize()))
    return bytes(plan)


def device_name() -> str | None:
    """The name of the GPU engines are built on (None without one)."""
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def engine_target(trt, arch: str) -> dict:
    """What an engine is tied to; recorded in the manifest and checked by the loader. The
    device's name too: TensorRT warns that a plan moved between boards of one architecture
    (another memory size or clock) may choose slower kernels or misbehave."""
    return {"arch": arch, "tensorrt": str(trt.__version__), "device": device_name()}


def device_warning(recorded: dict, engine_dir) -> str | None:
    """A warning when the engines were built on another board of this architecture."""
    built, here = recorded.get("device"), device_name()
    if built and here and built != here:
        return (f"the engines in {engine_dir} were built on a {built}, this GPU is a {here} (same architecture): "
                "TensorRT chose their kernels for that board; rebuild them here for its best kernels")
    return None


def check_engine_target(recorded: dict, arch: str, trt_version: str, engine_dir) -> str | None:
    """Why an engine built for ``recorded`` cannot run here (None when it can)."""
    rebuild = f"rebuild with `sdrt build MODEL --backend tensorrt --out {engine_dir} --target native` on this machine"
    if recorded.get("arch") != arch:
        return f"the engines in {engine_dir} were built for {recorded.get('arch')}, this GPU is {arch}: {rebuild}"
    if recorded.get("tensorrt") != trt_version:
        return (f"the engines in {engine_dir} were built with TensorRT {recorded.get('tensorrt')}, this is "
                f"TensorRT {trt_version} (a serialized engine only loads in the version that built it): {rebuild}")
    return None


def arch_of(capability: tuple[int, int]) -> str:
    """(major, minor) compute capability -> "sm_XY"."""
    return f"sm_{capability[0]}{capability[1]}"


def native_arch() -> str | None:
    """This machine's GPU architecture, or None without a CUDA GPU."""
    import torch
    if not torch.cuda.is_available():
        return None
    return arch_of(torch.cuda.get_device_capability())


def build_tensorrt(components, engine_dir, profile: Profile | None = None, options: BuildOptions | None = None,
                   networks=None, target: str = "native", force: bool = False,
                   trt=None, arch: str | None = None, log: Callable[[str], None] | None = None,
                   on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Export each network to ONNX (``engine_dir/onnx/``) and build ``NAME.plan`` for this GPU,
    recording in the manifest the key (weights hash, spec, precision, options), the profile and
    the target (architecture, TensorRT version). Up-to-date engines are kept."""
    log = log or logging.getLogger("sdrt.export").info
    from .build import (
        CONVOLUTIONAL,
        artifact_key,
        check_artifact,
        circular_padding,
        file_record,
        key_digest,
        open_folder,
        write_manifest,
    )
    from .onnx_export import export_onnx, to_float16
    from .specs import FLOAT32_NETWORKS, default_networks, default_profile, network_specs

    networks = networks or default_networks(components.is_sdxl)
    specs = network_specs(components.is_sdxl)
    unknown = [n for n in networks if n not in specs]
    if unknown:
        raise ValueError(f"network(s) {', '.join(unknown)} unknown for this model; valid: {', '.join(specs)}")
    trt = trt or require_tensorrt()
    options = options or BuildOptions()
    check_precision(trt, options.precision)             # before any export
    arch = check_arch(target, arch if arch is not None else native_arch())
    engine_dir = Path(engine_dir)
    with open_folder(engine_dir, log) as manifest:
        profile = profile or default_profile(components.latent_factor, components.native_size)
        dims = model_dims(components)
        where = engine_target(trt, arch)
        optimization = (f"trt-{options.precision.value}-O{options.optimization_level}"
                        + ("-refit" if options.refit else ""))
        manifest.update(model=components.name, model_hash=components.model_hash, backend="tensorrt",
                        precision=options.precision.value, target=where, tiling=bool(options.tiling))
        for name in networks:
            # SDXL's VAE overflows float16 (NaN images): it is built float32 in an fp16 folder
            half = options.precision is Precision.FP16 and not (components.is_sdxl and name in FLOAT32_NETWORKS)
            key = artifact_key(components.model_hash, name, "tensorrt", options.precision.value,
                               optimization + ("-vae-fp32" if options.precision is Precision.FP16 and not half else "")
                               + ("-circular-padding" if options.tiling and name in CONVOLUTIONAL else ""),
                               f"{arch}/trt-{where['tensorrt']}", sdxl=components.is_sdxl)
            entry = manifest["networks"].get(name)
            check = check_artifact(engine_dir, entry, key)
            if check.ok and not force and Profile.from_json(entry["profile"]) == profile:
                log(f"{name}: up to date")
                continue
            if entry is not None and not check.ok:
                log(f"{name}: rebuilding: {check.reason}")
            onnx_path = engine_dir / "onnx" / f"{name}.onnx"
            t0 = time.perf_counter()
            with circular_padding(components, options.tiling and name in CONVOLUTIONAL):
                export_onnx(components, name, onnx_path)
            if half:      # strong typing: the graph carries the precision
                to_float16(onnx_path, name)
            t1 = time.perf_counter()
            shapes = profile_shapes(name, profile, dims)
            plan_path = engine_dir / f"{name}.plan"
            plan = build_engine(trt, onnx_path, name, shapes, options, on_progress)
            partial = plan_path.with_name(f".{plan_path.name}.{os.getpid()}")
            partial.write_bytes(plan)
            os.replace(partial, plan_path)               # never a half-written plan under its name
            stages = {"export": t1 - t0, "build": time.perf_counter() - t1}
            files = [file_record(plan_path)]
            manifest["networks"][name] = {
                "file": plan_path.name, "files": files, "key": key, "key_digest": key_digest(key),
                "profile": profile.to_json(), "shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
                "static": is_static(shapes), "target": where, "size_multiple": components.size_multiple,
                "build_seconds": stages, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_manifest(engine_dir, manifest)
            log(f"{name}: built {plan_path.name} ({files[0]['size'] / 2**20:.1f} MiB, "
                f"{'static' if is_static(shapes) else 'dynamic'} profile)")
        write_manifest(engine_dir, manifest)
        return manifest
