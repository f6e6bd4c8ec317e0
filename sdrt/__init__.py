"""sdrt: a compiled inference runtime for Stable Diffusion.

    import sdrt
    pipe = sdrt.Pipeline.from_pretrained("random:tiny")
    result = pipe("a photo of a cat", steps=20, seed=1, width=64, height=64)
"""
__version__ = "0.1.0"

from .pipeline import GenerationResult, Pipeline  # noqa: E402
from .engine import Engine, EngineBusy, EngineClosed, Request  # noqa: E402

__all__ = ["Pipeline", "GenerationResult", "Engine", "Request", "EngineBusy", "EngineClosed", "__version__"]
