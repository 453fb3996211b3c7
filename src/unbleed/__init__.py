"""unbleed: training-free fixes for concept bleeding in Stable Diffusion, on one guided sampler."""

__version__ = "0.1.0"

from .errors import UnbleedError

# The public names load on first use (PEP 562), so that `import unbleed.cli` (`unbleed --help`, a bad flag) does
# not import torch and diffusers; `from unbleed import generate` works as before.
_LAZY = {"Result": "run.sampler", "generate": "run.sampler", "Schedule": "guidance.schedule",
         "RunSpec": "run.spec", "METHODS": "methods", "Method": "methods", "StepContext": "methods",
         "make_method": "methods", "register": "methods", "load_model": "models", "token_groups": "text.prompt",
         "Entity": "text.tokens", "TokenGroup": "text.tokens"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'unbleed' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["load_model", "generate", "RunSpec", "Schedule", "token_groups", "make_method", "register", "Method",
           "StepContext", "METHODS", "Entity", "TokenGroup", "Result", "UnbleedError", "__version__"]
