"""What a benchmark result records beside its numbers: the machine, the package versions, the
peak memory; and where results are written (``write_result``)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import threading
from pathlib import Path

import numpy as np
import torch

from .._version import __version__


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import subprocess
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def versions() -> dict:
    import importlib.metadata as md
    out = {"sdrt": __version__}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def results_dir() -> Path:
    """Where ``write_result`` writes: $SDRT_RESULTS, else ``benchmarks/results`` under the working
    directory (the repository's, where the benchmark scripts run)."""
    return Path(os.environ.get("SDRT_RESULTS", Path.cwd() / "benchmarks" / "results"))


def write_result(name: str, record: dict) -> Path:
    """``<results_dir()>/<name>-<date>.json`` with the machine and versions it ran on."""
    record.update(machine=machine(), versions=versions(), date=datetime.datetime.now().isoformat(timespec="seconds"))
    directory = results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(record, indent=2, default=float))
    print(f"wrote {out}")
    return out


def latency_summary(values) -> dict:
    """{n, mean, p50, p90, p99, max} of a list of seconds."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        return dict(n=0)
    return dict(n=int(v.size), mean=float(v.mean()), p50=float(np.percentile(v, 50)),
                p90=float(np.percentile(v, 90)), p99=float(np.percentile(v, 99)), max=float(v[-1]))
