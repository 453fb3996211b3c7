"""The one loader error path for Hugging Face Hub ids (models and tokenizers): fast, offline-aware, one line.

Before diffusers or transformers are asked for a hub id, :func:`resolve` decides in about a second (one metadata
request, bounded by ``HF_HUB_ETAG_TIMEOUT``, default 10 s, and never retried) whether the files can be had:

* in the local cache and the Hub unreachable (or ``HF_HUB_OFFLINE=1``) → load from the cache only
  (``local_files_only=True``: no retries, no waiting on the network);
* the Hub reachable and the repository there → load normally (download or cache);
* otherwise one :class:`~unbleed.errors.UnbleedError` that says which — no such repository, gated, no network,
  or offline mode — and what to do (a local folder, ``HF_HUB_OFFLINE=1`` with a filled cache, logging in).

Without it a wrong or unreachable id costs minutes of "Retrying in Ns" lines (issue #25) and may still end in a
traceback. Imports neither torch nor diffusers.
"""

from __future__ import annotations

import os

from .errors import UnbleedError

_TRUE = {"1", "true", "yes", "on"}


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached(repo_id: str, filename: str) -> bool:
    """Whether ``filename`` of ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an id the cache cannot even name (HFValidationError)
        return False


def resolve(repo_id: str, filename: str = "model_index.json", flag: str = "--model",
            what: str = "a local diffusers folder") -> bool:
    """Whether ``repo_id`` must load from the cache only (``local_files_only``); raises one line when it cannot
    load at all. ``filename``: a file every such repository has (its presence in the cache counts as cached);
    ``flag`` and ``what`` word the message (``--model``, and what to pass instead)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, HfHubHTTPError, RepositoryNotFoundError

    have = cached(repo_id, filename)
    if offline():
        if have:
            return True
        raise UnbleedError(f"{flag} {repo_id}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                           f"downloading it: unset HF_HUB_OFFLINE where there is network (it is then cached), or "
                           f"pass {what}")
    try:
        HfApi().model_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        if have:
            return True
        raise UnbleedError(f"{flag} {repo_id}: a gated repository: accept its terms on huggingface.co/{repo_id} and "
                           f"log in (hf auth login), or pass {what}") from None
    except (RepositoryNotFoundError, HFValidationError):
        if have:
            return True
        raise UnbleedError(f"{flag} {repo_id}: no such repository on the Hugging Face Hub (check the spelling; a "
                           f"private one needs hf auth login), and not in the local cache: pass a hub id that exists "
                           f"or {what}") from None
    except Exception as err:  # no network: connection refused, DNS, timeout, proxy, the Hub's own 5xx
        if have:
            return True
        reason = (f"the Hub answered {err.response.status_code}" if isinstance(err, HfHubHTTPError)
                  and getattr(err, "response", None) is not None else f"no network: {type(err).__name__}")
        raise UnbleedError(f"{flag} {repo_id}: the Hugging Face Hub cannot be reached ({reason}) and it is not in "
                           f"the local cache: pass {what}, or download it once where there is network (it goes to "
                           f"the cache, HF_HOME) and run with HF_HUB_OFFLINE=1") from None
    return False


__all__ = ["offline", "cached", "resolve"]
