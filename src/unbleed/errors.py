"""The one error type users see: a single line that names the bad input and the fix."""

from __future__ import annotations


class UnbleedError(ValueError):
    """A user-facing error. The CLI prints ``error: <message>`` on one line and exits with status 2.

    ``field``: the library parameter the message names, spelled at the start of the message as the library calls
    it (``window 30:10: START must be ≤ END``). The command lines rewrite that leading name into their flag
    (``--window 30:10: …``) with :meth:`for_flags`; messages without a field are shown as they are.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def for_flags(self, flags: dict[str, str]) -> str:
        """The message with its leading field name replaced by the flag ``flags`` maps it to."""
        message = str(self)
        flag = flags.get(self.field or "")
        if flag and message.startswith(self.field):
            return flag + message[len(self.field):]
        return message
