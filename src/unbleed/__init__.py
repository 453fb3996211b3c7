"""unbleed: training-free fixes for concept bleeding in Stable Diffusion, on one guided sampler."""

__version__ = "0.1.0"

from .errors import UnbleedError
from .methods import METHODS, make_method
from .models import load_model
from .sampler import Result, generate
from .tokens import Entity, TokenGroup, token_groups

__all__ = ["load_model", "generate", "token_groups", "make_method", "METHODS", "Entity", "TokenGroup", "Result",
           "UnbleedError", "__version__"]
