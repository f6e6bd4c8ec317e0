"""The package's shape: no import cycles, one declaration of the generation arguments that the
CLI, the batcher's request and the HTTP model follow, package data shipped, and ``sdrt.export``
importable from a plain source tree."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import import_graph  # noqa: E402


def test_the_import_graph_has_no_cycles():
    mods = import_graph.modules()
    assert "sdrt.pipeline" in mods and "sdrt.export.build" in mods
    graph = import_graph.edges(mods)
    assert "sdrt.params" in graph["sdrt.pipeline"]          # the parser sees relative imports
    assert import_graph.cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_never_reads_the_repository():
    """No module of the package locates files through the repository root."""
    offenders = []
    for path in list((ROOT / "sdrt").rglob("*.py")) + list((ROOT / "export").rglob("*.py")):
        text = path.read_text()
        if "parent.parent" in text and path.name != "_tree.py":
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_a_new_field_reaches_the_cli_the_request_and_the_http_model(monkeypatch):
    """Adding a generation argument is one field: the flags, sdrt.Request and the web UI's
    request model are derived from GenerationParams."""
    import argparse

    from sdrt import params
    from sdrt.batcher import Request
    from sdrt.serving import app

    fields = {f.name for f in params.GenerationParams.fields()}
    assert fields <= {f.name for f in dataclasses.fields(Request)}
    parser = argparse.ArgumentParser()
    params.add_arguments(parser)
    text = parser.format_help()
    for f in params.GenerationParams.fields():
        if f.metadata["cli"]:
            flag = (f.metadata["flags"] or ("--" + f.name.replace("_", "-"),))[-1]
            assert flag in text, f.name
    webui = {f.metadata["webui"] for f in params.GenerationParams.fields() if f.metadata["webui"]}
    assert webui <= set(app.Txt2Img.model_fields)
    assert app.Txt2Img.model_fields["steps"].default == 50             # the web UI's default, not sdrt's
    # a parsed command line becomes the same arguments as the Python call
    args = parser.parse_args(["a cat", "--steps", "7", "--seed-resize-from", "320x256", "--emphasis", "No norm"])
    got = params.from_arguments(args, width=64)
    assert got == params.GenerationParams("a cat", steps=7, seed_resize_from=(320, 256), emphasis="No norm",
                                          width=64)


def test_bad_cli_values_are_refused_by_argparse(capsys):
    import argparse

    from sdrt import params
    parser = argparse.ArgumentParser()
    params.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["x", "--seed-resize-from", "512"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_export_imports_from_a_plain_source_tree(tmp_path):
    """Without an install (PYTHONPATH only, installed mappings removed), sdrt.export resolves
    to the top-level export/ folder: no link needed."""
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()\n"
            "                    and 'editable' not in getattr(f, '__name__', '').lower()]\n"
            "import sdrt, sdrt.export.specs\n"
            "print(sdrt.__file__); print(sdrt.export.specs.__file__)\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    sdrt_file, specs_file = proc.stdout.split()
    assert Path(specs_file) == ROOT / "export" / "specs.py" and Path(sdrt_file).parent == ROOT / "sdrt"


@pytest.mark.slow
def test_the_wheel_carries_the_package_data(tmp_path):
    """A built wheel holds sdrt.export, the CUDA sources and the benchmark suites."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("sdrt-*.whl"))).namelist()
    for needed in ("sdrt/export/build.py", "sdrt/kernels/fused_step.cu", "sdrt/kernels/sdrt_kernels.cu",
                   "sdrt/bench/suites.json", "sdrt/serving/app.py", "sdrt/_version.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "benchmarks/", "export/")) for n in names)


def test_the_command_line_builds_without_the_serving_extras():
    """`sdrt generate` must work after the plain setup (no fastapi, no Ray): building the parser,
    serve's flags included, imports neither."""
    code = ("import sys\n"
            "for name in ('fastapi', 'ray', 'uvicorn', 'pydantic'):\n"
            "    sys.modules[name] = None\n"
            "from sdrt.cli import build_parser\n"
            "args = build_parser().parse_args(['serve', '--max-batch-size', '4', '--replicas', '2'])\n"
            "print(args.max_batch_size, args.replicas)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", "2"]


def test_serve_flags_build_the_server_config():
    from sdrt.cli import build_parser
    from sdrt.options import from_arguments
    from sdrt.serving.config import ServerConfig
    from sdrt.serving.deploy import Scaling
    args = build_parser().parse_args(["serve", "--model", "m", "--fast-path", "--timeout", "5", "--min-replicas", "1",
                                      "--max-replicas", "3"])
    config = from_arguments(ServerConfig, args)
    assert (config.model, config.fast_path, config.timeout, config.max_queue) == ("m", True, 5.0, 256)
    assert from_arguments(Scaling, args) == Scaling(min_replicas=1, max_replicas=3)
