"""sdrt: a compiled inference runtime for Stable Diffusion.

    import sdrt
    pipe = sdrt.Pipeline.from_pretrained("random:tiny")
    result = pipe("a photo of a cat", steps=20, seed=1, width=64, height=64)
"""
from ._tree import find_export_in_source_tree
from ._version import __version__

# Engine, EngineBusy, EngineClosed: the batcher's first-release names (deprecated)
from .batcher import Batcher, BatcherBusy, BatcherClosed, Engine, EngineBusy, EngineClosed, Interrupted, Request
from .interrogator import Interrogator
from .params import GenerationParams
from .pipeline import Pipeline
from .result import GenerationResult

find_export_in_source_tree()     # sdrt.export from an uninstalled source tree (see sdrt._tree)

__all__ = ["Pipeline", "GenerationParams", "GenerationResult", "Batcher", "Request", "BatcherBusy",
           "BatcherClosed", "Engine", "EngineBusy", "EngineClosed", "Interrupted", "Interrogator", "__version__"]
