"""Build compiled artifacts into an engine folder, keyed by what made them.

``engine_dir/manifest.json`` records, per network, the key (a hash of the weights, the export
spec, opset, precision, backend, optimisation and package versions), the profile, the files
with their sizes and hashes, and how long the build took. An artifact whose key differs from
the request, or whose files are missing, truncated or corrupted, is rebuilt with a message;
it is never silently used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .onnx_export import OPSET, export_onnx, files_of, save_onnx, smallest_inputs, to_float16
from .specs import FLOAT32_NETWORKS, PRECISIONS, Profile, default_networks, model_dims, network_specs, spec_fingerprint
from .winograd import describe as winograd_describe
from .winograd import rewrite_file

MANIFEST = "manifest.json"
FORMAT = 1
LOCK = ".lock"


def package_versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {}
    for pkg in ("sdrt", "torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


HASH = "sha256-full"               # how file digests are computed (recorded per file)
_DIGESTS: dict[tuple, str] = {}    # (path, size, mtime, inode) -> digest: each file is read once per process


def file_digest(path: Path) -> str:
    """sha256 of the size and every byte of the file (hashlib's fastest here: 1.2 GB/s on the
    2-core development machine). Computed once per process for a file that did not change."""
    st = os.stat(path)
    stamp = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _DIGESTS.get(stamp)
    if digest is None:
        h = hashlib.sha256(str(st.st_size).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = _DIGESTS[stamp] = h.hexdigest()
    return digest


def file_record(path: Path) -> dict:
    """What the manifest records of an artifact file."""
    return {"name": path.name, "size": path.stat().st_size, "sha256": file_digest(path), "hash": HASH}


@contextlib.contextmanager
def open_folder(engine_dir: Path, log):
    """An engine folder opened for building: created if missing (an existing one is never
    touched, it may be read-only), locked against other processes, its manifest read (a damaged
    one is reported; what it does not describe is rebuilt). Yields the manifest."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        engine_dir.mkdir(parents=True)
    with folder_lock(engine_dir):     # one build per folder at a time, across processes
        manifest = read_manifest(engine_dir)
        if manifest.pop("damaged", False):
            log(f"{engine_dir / MANIFEST} is damaged: rebuilding what it does not describe")
        yield manifest


@contextlib.contextmanager
def staging(engine_dir: Path, name: str):
    """A private folder inside ``engine_dir`` where an artifact is built; its files are renamed into
    place (same file system: atomic per file) once complete, so no reader ever sees a half-written
    file under an artifact's name. Removed afterwards, whatever happened."""
    work = Path(engine_dir) / f".staging-{name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(engine_dir: Path):
    """An exclusive lock (``flock`` on ``engine_dir/.lock``) while a process checks and builds an
    engine folder: two jobs sharing a folder build it once, one after the other, and the second
    finds the first's artifacts up to date. A folder where the lock file cannot be created (a
    read-only mount) is used without it: it can only be read there anyway."""
    try:
        import fcntl
        fd = os.open(Path(engine_dir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def artifact_key(model_hash: str, network: str, backend: str, precision: str, optimization: str,
                 target: str, opset: int = OPSET, sdxl: bool = False, spec=None) -> dict:
    """Everything that makes an artifact, as recorded in the manifest. ``spec``: the network's
    export spec when it is not a diffusion network (the interrogator's)."""
    spec = spec or network_specs(sdxl)[network]
    return {"model_hash": model_hash, "network": network, "spec": spec_fingerprint(spec),
            "backend": backend, "precision": precision, "target": target, "opset": opset,
            "optimization": optimization, "versions": package_versions(), "format": FORMAT}


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _entry_ok(entry) -> bool:
    """A manifest entry of the shape the loaders read (anything else is rebuilt, never trusted)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return False
    if not isinstance(entry.get("key"), dict) or not isinstance(entry.get("profile"), dict):
        return False
    files = entry.get("files")
    return isinstance(files, list) and bool(files) and all(
        isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("size"), int)
        and isinstance(f.get("sha256"), str) for f in files)


def read_manifest(engine_dir: Path) -> dict:
    """The engine folder's manifest. Unreadable JSON, or JSON of the wrong shape (a list, null,
    an entry that is not an artifact record), gives ``damaged: True`` and keeps only the entries
    that are well formed: the others are rebuilt, never used."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        return {"format": FORMAT, "networks": {}}
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError):
        return {"format": FORMAT, "networks": {}, "damaged": True}
    if not isinstance(data, dict) or not isinstance(data.get("networks"), dict):
        return {"format": FORMAT, "networks": {}, "damaged": True}
    good = {name: e for name, e in data["networks"].items() if _entry_ok(e)}
    bad_target = not isinstance(data.get("target", {}), dict)
    if len(good) == len(data["networks"]) and not bad_target:
        return data
    data = {k: v for k, v in data.items() if not (k == "target" and bad_target)}
    return dict(data, networks=good, damaged=True)


def write_manifest(engine_dir: Path, data: dict) -> None:
    """Write the manifest (to a temporary name, renamed into place), unless it already holds
    exactly ``data``: a folder that is up to date is never written, so it can be read-only."""
    path = Path(engine_dir) / MANIFEST
    text = json.dumps(data, indent=2, sort_keys=True)
    try:
        if path.is_file() and path.read_text() == text:
            return
    except OSError:
        pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Check:
    ok: bool
    reason: str = ""


def check_artifact(engine_dir: Path, entry: dict | None, key: dict) -> Check:
    """Is the recorded artifact usable for ``key``? If not, why."""
    if entry is None:
        return Check(False, "not built yet")
    if entry.get("key_digest") != key_digest(key):
        recorded = entry.get("key", {})
        changed = sorted(k for k in set(key) | set(recorded) if key.get(k) != recorded.get(k))
        return Check(False, "the manifest does not match the request (" + ", ".join(changed) + " differ)")
    for f in entry.get("files", []):
        p = Path(engine_dir) / f["name"]
        if not p.is_file():
            return Check(False, f"{f['name']} is missing")
        if p.stat().st_size != f["size"]:
            return Check(False, f"{f['name']} is truncated or damaged ({p.stat().st_size} bytes, "
                                f"expected {f['size']})")
        if f.get("hash") != HASH:
            return Check(False, f"{f['name']} was recorded with a sampled hash (sdrt 0.1): rebuilding to verify it "
                                "in full")
        if file_digest(p) != f["sha256"]:
            return Check(False, f"{f['name']} is corrupted (its hash differs from the manifest)")
    return Check(True)


def staged_onnx(engine_dir: Path, name: str, make: Callable, on_stage=None) -> tuple[Path, list, dict, object]:
    """Build the graph ``NAME.onnx`` (+ its data file) aside: ``make(path, stage)`` writes it at
    ``path`` in a staging folder, timing its steps with ``stage("export")`` etc.; the files are
    then renamed into ``engine_dir``. Returns (path, file records, seconds per stage, what
    ``make`` returned)."""
    stage = _Stages(name, on_stage)
    with staging(engine_dir, name) as work:
        path = work / f"{name}.onnx"
        made = make(path, stage)
        with stage("save"):
            for p in files_of(path):
                os.replace(p, Path(engine_dir) / p.name)
            path = Path(engine_dir) / path.name
            files = [file_record(p) for p in files_of(path)]
    return path, files, stage.seconds, made


def ort_offline_optimize(path: Path) -> str:
    """Apply ONNX Runtime's portable graph optimisations (constant folding, redundant-node
    elimination, operator fusions: level EXTENDED) and save them into the artifact, so a session
    only has the hardware-specific layout pass left at start."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    tmp = path.with_name(path.stem + ".opt.onnx")
    opts.optimized_model_filepath = str(tmp)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", tmp.name + ".data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp), load_external_data=True)
    save_onnx(model, path)
    for p in files_of(tmp):
        p.unlink()
    return "ort-extended"


TARGETS = ("cpu", "cuda")
CONVOLUTIONAL = ("unet", "vae_decoder", "vae_encoder")       # the networks the Winograd rewrite can touch
# onnxruntime.transformers' model types for each network
_FUSION_MODEL_TYPE = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}


def _num_heads_from_concat(get_num_heads):
    """ONNX Runtime's UNet attention fusion reads the head count of a PyTorch 2 graph with
    ``int()`` of a one-element array, which NumPy 2.5 refuses (TypeError: only 0-dimensional
    arrays...): on SD 1.5 the whole fusion pass failed and the graph stayed unfused. Read it
    with ``.item()`` instead; anything else goes to ONNX Runtime's own code."""
    import numpy as np

    def fixed(self, reshape_q, is_torch2: bool = False) -> int:
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1 and int(value.reshape(-1)[0]) > 0:
                    return int(value.reshape(-1)[0])
        return get_num_heads(self, reshape_q, is_torch2)
    fixed.sdrt_fixed = True
    return fixed


def _patch_ort_attention_fusion() -> None:
    import sys

    import onnxruntime.transformers.fusion_attention_unet as fau
    # ONNX Runtime's transformers package imports its modules by bare name too: patch both copies
    for module in {fau, sys.modules.get("fusion_attention_unet")} - {None}:
        cls = module.FusionAttentionUnet
        if not getattr(cls.get_num_heads, "sdrt_fixed", False):
            cls.get_num_heads = _num_heads_from_concat(cls.get_num_heads)


def diffusion_fusions(path: Path, network: str) -> dict:
    """ONNX Runtime's Stable Diffusion fusions (onnxruntime.transformers.optimizer: GroupNorm,
    SkipGroupNorm, BiasSplitGelu, NhwcConv, attention, SkipLayerNorm, ...). Their kernels are
    CUDA ones, so they are applied for the CUDA target only. Returns the fused-operator counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _patch_ort_attention_fusion()

    model_type = _FUSION_MODEL_TYPE[network]
    opts = FusionOptions(model_type)
    optimized = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                               use_gpu=True, optimization_options=opts)
    stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    save_onnx(optimized.model, path)
    return stats


Log = Callable[[str], None]
logger = logging.getLogger("sdrt.export")


def build_onnxruntime(components, engine_dir, precision: str = "float32", profile: Profile | None = None,
                      networks=None, force: bool = False, log: Log | None = None, target: str = "cpu",
                      on_stage: Callable[[str, str], None] | None = None, winograd: bool = True,
                      tiling: bool | None = None) -> dict:
    """Export, optimise and save each network into ``engine_dir``; skip the ones whose recorded
    artifact matches (and, when ``profile`` is given, was built for that profile; None accepts
    the recorded one and builds new artifacts for the model's default profile). ``winograd``:
    for the CPU target in float32, rewrite the 3x3 convolutions that run at least 8x8 at the
    profile's smallest request as Winograd GEMMs (``export/winograd.py``). ``tiling``: the UNet
    and the VAE exported with circular padding (seamless tiles; such a folder makes only tiling
    images); None keeps what the folder records. Returns the manifest."""
    log = log or logger.info
    from .specs import default_profile

    if target not in TARGETS:
        raise ValueError(f"target {target!r} is unknown; valid: {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; valid: {', '.join(PRECISIONS)}")
    specs = network_specs(components.is_sdxl)
    networks = networks or default_networks(components.is_sdxl)
    unknown = [n for n in networks if n not in specs]
    if unknown:
        raise ValueError(f"network(s) {', '.join(unknown)} unknown for this model; valid: {', '.join(specs)}")
    engine_dir = Path(engine_dir)
    with open_folder(engine_dir, log) as manifest:
        wanted = profile                       # None: any recorded profile will do
        profile = profile or default_profile(components.latent_factor, components.native_size)
        # CPU: ONNX Runtime's portable optimisations saved into the graph. CUDA: its SD fusions, on
        # the exported graph (after ORT's own fusions their attention patterns no longer match) and
        # nothing offline after them (a CPU session cannot load their CUDA-only operators); the
        # CUDA session applies its own optimisations when it starts.
        optimization = ("diffusion-fusions" if target == "cuda" else "ort-extended") + \
            ("+fp16" if precision == "float16" else "")
        tiling = bool(manifest.get("tiling", False)) if tiling is None else bool(tiling)
        manifest.update(format=FORMAT, model=components.name, model_hash=components.model_hash,
                        backend="onnxruntime", precision=precision, tiling=tiling)
        for name in networks:
            # the text encoder has no convolution: its key (and artifact) does not depend on the rewrite
            rewrite = winograd and target == "cpu" and precision == "float32" and name in CONVOLUTIONAL
            # SDXL's VAE overflows float16 (NaN images): its decoder stays float32, as the web UI
            # falls back to a float32 VAE
            half = precision == "float16" and not (components.is_sdxl and name in FLOAT32_NETWORKS)
            key = artifact_key(components.model_hash, name, "onnxruntime", precision,
                               optimization + (f"+{winograd_describe()}" if rewrite else "")
                               + ("" if half or precision == "float32" else "+vae-float32")
                               + ("+circular-padding" if tiling and name in CONVOLUTIONAL else ""), target,
                               sdxl=components.is_sdxl)
            entry = manifest["networks"].get(name)
            check = check_artifact(engine_dir, entry, key)
            if check.ok and not force and (wanted is None or Profile.from_json(entry["profile"]) == wanted):
                log(f"{name}: up to date")
                continue
            if entry is not None and not check.ok:
                log(f"{name}: rebuilding: {check.reason}")
            elif entry is not None and not force:
                log(f"{name}: rebuilding for the profile {profile.describe()}")
            def make(path, stage, name=name, rewrite=rewrite, half=half):   # built aside, renamed into place
                fused, rewritten = {}, {}
                with stage("export"), circular_padding(components, tiling and name in CONVOLUTIONAL):
                    export_onnx(components, name, path)
                with stage("optimise"):
                    if rewrite:
                        rewritten = rewrite_file(path, smallest_inputs(model_dims(components), name, profile))
                    if target == "cpu":
                        ort_offline_optimize(path)
                    else:
                        try:
                            fused = diffusion_fusions(path, name)
                        except Exception as e:  # noqa: BLE001 - the optimizer's own failures vary by version
                            log(f"{name}: diffusion fusions failed ({type(e).__name__}: {e}); keeping the unfused "
                                "graph")
                            fused = {"failed": str(e)}
                    if half:
                        to_float16(path, name)
                return fused, rewritten
            path, files, stages, (fused, rewritten) = staged_onnx(engine_dir, name, make, on_stage)
            manifest["networks"][name] = {
                "file": path.name, "files": files, "key": key, "key_digest": key_digest(key),
                "profile": profile.to_json(), "size_multiple": components.size_multiple, "build_seconds": stages,
                "fused_operators": fused, "winograd": rewritten,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            write_manifest(engine_dir, manifest)
            log(f"{name}: built in {sum(stages.values()):.1f} s ({sum(x['size'] for x in files) / 2**20:.1f} MiB)")
        write_manifest(engine_dir, manifest)
        return manifest


@contextlib.contextmanager
def circular_padding(components, enabled: bool = True):
    """While inside, every convolution of the UNet and the VAE pads circularly (tiling), as the
    torch backend's ``set_tiling`` does; their own modes come back afterwards."""
    import torch
    convs = [m for net in (components.unet, components.vae) for m in net.modules()
             if isinstance(m, torch.nn.Conv2d)] if enabled else []
    before = [m.padding_mode for m in convs]
    try:
        for m in convs:
            m.padding_mode = "circular"
        yield
    finally:
        for m, mode in zip(convs, before):
            m.padding_mode = mode


class _Stages:
    """Times the stages of one network's build and reports each start to ``on_stage``."""

    def __init__(self, name: str, on_stage):
        self.name, self.on_stage, self.seconds = name, on_stage, {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if self.on_stage:
            self.on_stage(self.name, stage)
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = time.perf_counter() - t0
