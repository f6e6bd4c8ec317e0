"""Benchmarks, by purpose:

- ``harness``: ``sdrt bench``, the same generation on every backend and on diffusers, side by
  side in one process (suites in ``suites.json``, package data);
- ``load``: a load generator for ``sdrt.Batcher`` (closed and open loop);
- ``record``: the machine, versions and peak memory a result records, and ``write_result``.

The names below are this package's public surface (the benchmark scripts use them).
"""
from .harness import (  # noqa: F401
                      _BETAS,  # noqa: F401 - the SD 1.x betas, used by benchmarks/fastpath.py
                      DIFFUSERS_SCHEDULERS,
                      REFERENCES,
                      Row,
                      Settings,
                      chart,
                      diffusers_pipeline,
                      format_table,
                      load_suite,
                      main_bench,
                      run_benchmark,
                      run_sweep,
)
from .load import format_serving, run_serving  # noqa: F401
from .record import PeakRSS, latency_summary, machine, results_dir, versions, write_result  # noqa: F401
