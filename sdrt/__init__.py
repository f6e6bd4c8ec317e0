"""sdrt: a compiled inference runtime for Stable Diffusion.

    import sdrt
    pipe = sdrt.Pipeline.from_pretrained("random:tiny")
    result = pipe("a photo of a cat", steps=20, seed=1, width=64, height=64)
"""
from ._version import __version__
from .batcher import Batcher, BatcherBusy, BatcherClosed, Request
from .params import GenerationParams
from .pipeline import Pipeline
from .result import GenerationResult

# deprecated names of the first release (the request batcher was called Engine)
from .batcher import Engine, EngineBusy, EngineClosed  # noqa: E402, I001

__all__ = ["Pipeline", "GenerationParams", "GenerationResult", "Batcher", "Request", "BatcherBusy",
           "BatcherClosed", "Engine", "EngineBusy", "EngineClosed", "__version__"]
