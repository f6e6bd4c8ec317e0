"""Image to prompt: the web UI's CLIP interrogator and clip-interrogator's modes (docs/interrogator.md)."""
from .core import MODES, InterrogateOptions, Interrogator, strip_prompt, top_k
from .models import RANDOM_INTERROGATORS, InterrogatorModels, load_models
from .terms import FeatureCache, TermList, read_folder

__all__ = ["MODES", "InterrogateOptions", "Interrogator", "InterrogatorModels", "RANDOM_INTERROGATORS",
           "FeatureCache", "TermList", "load_models", "read_folder", "strip_prompt", "top_k"]
