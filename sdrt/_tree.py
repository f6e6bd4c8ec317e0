"""``sdrt.export`` when sdrt is imported straight from a source tree.

The exporters live in the repository's top-level ``export/`` folder and are installed as
``sdrt.export`` (pyproject.toml's ``package-dir``); installed packages, editable or not, map
it themselves. Imported from an uninstalled tree (``PYTHONPATH=.``, as on a machine where
the editable install cannot run), sdrt finds it beside the package with this finder, which is
consulted last, after every installed mapping.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_EXPORT = Path(__file__).resolve().parent.parent / "export"


class _TreeExport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "sdrt.export":
            return None
        return importlib.util.spec_from_file_location(name, _EXPORT / "__init__.py",
                                                      submodule_search_locations=[str(_EXPORT)])


def find_export_in_source_tree() -> None:
    if (_EXPORT / "__init__.py").is_file() and not any(isinstance(f, _TreeExport) for f in sys.meta_path):
        sys.meta_path.append(_TreeExport())
