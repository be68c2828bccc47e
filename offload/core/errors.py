"""The one error type users see."""


class OffloadError(RuntimeError):
    """A user-facing failure of the offload runtime.

    Messages name the API or tensor involved, what was expected and observed, and the fix.
    Internal invariants that fail say "this is a bug in offload" instead.
    """
