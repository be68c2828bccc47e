"""Finding the regions (the repeated blocks) and hooking their forward while `with hc:` is active.

A region is a module whose forward is one unit of recompute: a transformer block. `"auto"` takes
the children of the largest `nn.ModuleList`/`nn.Sequential` whose children all have one type
(GPT-2's `transformer.h`, Llama's `model.layers`). Hooks are installed on `__enter__` and removed
on `__exit__`, so outside `with hc:` the model runs exactly as plain PyTorch.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Region:
    """One module the runtime may recompute, with its name in the model."""

    name: str
    module: nn.Module


def find_regions(model: nn.Module) -> list[Region]:
    """The children of the largest container of same-typed modules in `model` (by parameter count,
    then by length); [] when there is none."""
    best: tuple[int, int] | None = None
    found: list[Region] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        kids = list(mod)
        if len({type(k) for k in kids}) != 1:
            continue
        score = (sum(p.numel() for p in mod.parameters()), len(kids))
        if best is None or score > best:
            best = score
            prefix = f"{name}." if name else ""
            found = [Region(f"{prefix}{i}", k) for i, k in enumerate(kids)]
    return found


def resolve_regions(model: nn.Module | None, regions) -> list[Region]:
    """The user's `regions=` ("auto", a list of modules, or None) as a list of Region."""
    if regions is None:
        return []
    if isinstance(regions, str):
        if regions != "auto":
            raise ValueError(f"HybridCheckpointer(regions={regions!r}): use 'auto', a list of modules, or None")
        if model is None:
            log.info("regions='auto' without a model: no regions, per-tensor keep/offload only")
            return []
        found = find_regions(model)
        if not found:
            log.warning("regions='auto' found no repeated blocks in %s; recompute is off",
                        type(model).__name__)
        return found
    if isinstance(regions, nn.Module) or not isinstance(regions, Sequence):
        raise TypeError(f"HybridCheckpointer(regions=...): expected 'auto', a list of nn.Module, or None; "
                        f"got {type(regions).__name__}")
    names = {m: n for n, m in model.named_modules()} if model is not None else {}
    out = []
    for i, m in enumerate(regions):
        if not isinstance(m, nn.Module):
            raise TypeError(f"HybridCheckpointer(regions=...): item {i} is a {type(m).__name__}, not an nn.Module")
        out.append(Region(names.get(m, f"region{i}:{type(m).__name__}"), m))
    if len({id(r.module) for r in out}) != len(out):
        raise ValueError("HybridCheckpointer(regions=...): the same module is listed twice")
    return out


class RegionHooks:
    """Forward pre/post hooks on every region module, removed together.

    The pre-hook runs first, before the user's pre-hooks: a region call begins where the module
    is called, and the recompute frame records the arguments the module was called with (Rule 7:
    the replay calls the module with them, so the user's pre-hooks run again on the same input).
    The post-hook runs last. Both run eagerly even when the module is compiled in place
    (`module.compile()`): Dynamo must not trace the runtime's bookkeeping.
    """

    def __init__(self, regions: Sequence[Region], enter: Callable, exit: Callable):
        self._handles = []
        for r in regions:
            self._handles.append(r.module.register_forward_pre_hook(
                _eager(lambda mod, args, kwargs, _r=r: enter(_r, args, kwargs)), with_kwargs=True, prepend=True))
            self._handles.append(r.module.register_forward_hook(
                _eager(lambda mod, args, output, _r=r: exit(_r, output)), always_call=True))

    def add(self, handle) -> None:
        """Remove `handle` together with the region hooks."""
        self._handles.append(handle)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _eager(hook: Callable) -> Callable:
    """`hook`, hidden from Dynamo. Nothing is compiled unless Dynamo was imported, and importing
    it takes seconds, so it is not imported here."""
    dynamo = sys.modules.get("torch._dynamo")
    return hook if dynamo is None else dynamo.disable(hook)


def in_compiled_module(module: nn.Module | None = None) -> bool:
    """Whether a module compiled with torch.compile (an `OptimizedModule`) other than `module` is
    being called: its hooks, forward and graph breaks, and the modules inside it."""
    dynamo = sys.modules.get("torch._dynamo")
    frames = getattr(dynamo, "eval_frame", None)
    probe = getattr(frames, "_is_in_optimized_module", None)
    if probe is None or not probe():
        return False
    return not isinstance(module, frames.OptimizedModule)  # its own call sets the flag too


def compiled_model_error(what: str) -> str:
    """The message for recompute under a model compiled as a whole (`what` happened)."""
    return (f"HybridCheckpointer: {what}. Dynamo runs the runtime's region hooks of a model compiled as a "
            f"whole only at graph breaks, or not at all when the graph was compiled before they existed, "
            f"so its regions cannot be replayed. Compile the blocks instead of the model, and call the "
            f"model itself uncompiled: `model.layers[i] = torch.compile(block)` (or `block.compile()`) "
            f"for each block. Policies 'keep' and 'offload' never replay and work with a compiled model.")


def output_grad_fns(output) -> list:
    """The distinct grad_fns of the tensors in a module's output (any nesting)."""
    seen, out = set(), []
    for t in torch.utils._pytree.tree_leaves(output):
        if isinstance(t, torch.Tensor) and t.grad_fn is not None and id(t.grad_fn) not in seen:
            seen.add(id(t.grad_fn))
            out.append(t.grad_fn)
    return out
