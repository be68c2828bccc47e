"""What users see when something needs their attention: one error type and one warning category."""
from __future__ import annotations

import os
import sys
import warnings

# Frames in these folders are ours or torch's machinery between the user's code and our hooks.
_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,)


class OffloadError(RuntimeError):
    """A user-facing failure of the offload runtime.

    Messages name the API or tensor involved, what was expected and observed, and the fix.
    Internal invariants that fail say "this is a bug in offload" instead.
    """


class OffloadWarning(UserWarning):
    """Something the user should act on (a plan that does not fit, a full host pool, a setting
    that defeats the policy). Filter it like any warning category:
    `warnings.filterwarnings("ignore", category=offload.OffloadWarning)`."""


def warn(message: str) -> None:
    """Issue an `OffloadWarning`, attributed to the first caller outside offload and torch: the
    user's line, or the model code whose module call ran our hooks."""
    internal = _INTERNAL
    torch = sys.modules.get("torch")
    if torch is not None:
        internal += (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,)
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        level += 1
        frame = frame.f_back
    warnings.warn(message, OffloadWarning, stacklevel=level)
