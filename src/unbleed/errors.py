"""The one error type users see: a single line that names the bad input and the fix."""

from __future__ import annotations


class UnbleedError(ValueError):
    """A user-facing error. The CLI prints ``error: <message>`` on one line and exits with status 2."""
