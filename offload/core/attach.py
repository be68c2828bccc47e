"""Module mode: run each forward of one module under a checkpointer, for loops the user does not
write (Hugging Face `Trainer`, Lightning). `HybridCheckpointer.attach` builds an `Attachment`.

The runtime is entered by a forward pre-hook (first of the module's pre-hooks) and left by a
forward hook registered with `always_call=True` (last of its hooks), which PyTorch also runs when
forward raises an Exception. A forward is left alone when autograd records nothing (`no_grad`,
`inference_mode`) and when the checkpointer is already active (`with hc:` around the call, or an
outer attached module): those calls run exactly as plain PyTorch.

Rule 9: a KeyboardInterrupt skips the always_call hooks, leaving the runtime entered; the next
call of the module (or `remove()`) finds that call's frame gone from the stack and closes it as
failed first. A call of the module from inside its own forward is part of the outer call.
"""
from __future__ import annotations

import sys
from types import FrameType
from typing import Callable

import torch
from torch import nn


class Attachment:
    """The hooks `hc.attach(module)` put on `module`; `remove()` (or leaving `with`) takes them off."""

    def __init__(self, module: nn.Module, enter: Callable[[tuple, dict], None],
                 exit: Callable[[type | None], None], active: Callable[[], bool]):
        """`enter(args, kwargs)` enters the runtime for a call with these inputs, `exit(exc_type)`
        leaves it (exc_type None: forward completed), `active()`: whether it is entered already."""
        self.module = module
        self._enter, self._exit, self._active = enter, exit, active
        self._frame: FrameType | None = None  # the frame that ran our pre-hook, while its call is open
        self.forwards = 0  # calls run under the runtime so far
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
                         module.register_forward_hook(self._post, always_call=True)]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        caller = sys._getframe(1)
        if self._frame is not None:
            if _on_stack(self._frame, caller):
                return  # the module called inside its own forward: part of the open call
            self._close_stale()
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled() or self._active():
            return
        self._enter(args, kwargs)
        self._frame = caller
        self.forwards += 1

    def _post(self, module: nn.Module, args: tuple, output) -> None:
        frame = self._frame
        if frame is None:
            return
        caller = sys._getframe(1)
        if caller is not frame and _on_stack(frame, caller):
            return  # the hook of a call made inside the open one
        self._frame = None
        self._exit(_failure(frame))

    def _close_stale(self) -> None:
        """Rule 9: the open call ended without its forward hook (a KeyboardInterrupt); close it."""
        self._frame = None
        self._exit(KeyboardInterrupt)

    @property
    def attached(self) -> bool:
        """Whether the hooks are still on the module."""
        return bool(self._handles)

    def remove(self) -> None:
        """Take the hooks off (idempotent); call it outside the module's forward."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._frame is not None and not _on_stack(self._frame, sys._getframe()):
            self._close_stale()

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._handles else "removed"
        return f"Attachment({type(self.module).__name__}, {state})"


def _on_stack(frame: FrameType, top: FrameType | None) -> bool:
    while top is not None:
        if top is frame:
            return True
        top = top.f_back
    return False


def _failure(frame: FrameType) -> type | None:
    """The type of the exception propagating out of the call `frame` ran in, if any: PyTorch runs
    always_call hooks from an `except` block, so it is the one being handled and its traceback
    passes through `frame` (an exception handled by the caller around the call does not)."""
    exc = sys.exc_info()[1]
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if tb.tb_frame is frame:
            return type(exc)
        tb = tb.tb_next
    return None
