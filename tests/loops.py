"""A helper the workflow tests share: one generation on the eager loop and on the static loop."""
from __future__ import annotations


def eager_and_static(pipe, **args):
    """(eager pixels, static-loop pixels, loops built) for ``args``; the fast path is off after."""
    pipe.set_fast_path(False)
    eager = pipe(**args).pixels
    try:
        pipe.set_fast_path()
        static = pipe(**args).pixels
        built = len(pipe.loops)
    finally:
        pipe.set_fast_path(False)
    return eager, static, built
