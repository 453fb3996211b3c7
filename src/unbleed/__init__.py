"""unbleed: training-free fixes for concept bleeding in Stable Diffusion, on one guided sampler."""

__version__ = "0.1.0"

from .errors import UnbleedError
from .guidance.sampler import Result, generate
from .guidance.schedule import Schedule
from .guidance.spec import RunSpec
from .methods import METHODS, Method, StepContext, make_method, register
from .models import load_model
from .text.prompt import token_groups
from .text.tokens import Entity, TokenGroup

__all__ = ["load_model", "generate", "RunSpec", "Schedule", "token_groups", "make_method", "register", "Method",
           "StepContext", "METHODS", "Entity", "TokenGroup", "Result", "UnbleedError", "__version__"]
