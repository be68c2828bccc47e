"""Finding the regions (the repeated blocks) and hooking their forward while `with hc:` is active.

A region is a module whose forward is one unit of recompute: a transformer block. `"auto"` takes
the children of every repeated stack: each `nn.ModuleList`/`nn.Sequential` whose children all have
one type and that is not dwarfed by the largest (GPT-2's `transformer.h`, Llama's `model.layers`,
T5's `encoder.block` and `decoder.block`). Users may also name a stack, give a block class, or
list the modules (`resolve_regions`). Hooks are installed on `__enter__` and removed
on `__exit__`, so outside `with hc:` the model runs exactly as plain PyTorch.
"""
from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn

from .errors import warn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Region:
    """One module the runtime may recompute, with its name in the model."""

    name: str
    module: nn.Module


RegionsArg = Union[str, type, Iterable[nn.Module], Iterable[type], None]  # what `regions=` accepts
STACK_SHARE = 0.25  # a further stack counts when it holds this share of the largest one's parameters
_CONTAINERS = (nn.ModuleList, nn.Sequential)


def _children(prefix: str, container: nn.Module) -> list[Region]:
    dot = f"{prefix}." if prefix else ""
    return [Region(f"{dot}{name}", kid) for name, kid in container.named_children()]


def _stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ModuleList/Sequential of two or more modules of one type, in model order."""
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, _CONTAINERS) and len(mod) >= 2 and len({type(k) for k in mod}) == 1]


def find_regions(model: nn.Module) -> list[Region]:
    """The children of every repeated stack in `model` (containers of same-typed modules), in
    model order: the largest (by parameter count, then length), and every other holding at least
    STACK_SHARE of its parameters that is neither inside nor around one already taken (so a T5's
    or BART's encoder and decoder blocks both); [] when there is none."""
    scored = sorted(((sum(p.numel() for p in mod.parameters()), len(mod), -i, name, mod)
                     for i, (name, mod) in enumerate(_stacks(model))), reverse=True)
    taken: list[tuple[int, str, nn.Module]] = []
    for params, _, neg_order, name, mod in scored:
        if taken and params < max(STACK_SHARE * scored[0][0], 1):
            break
        if any(_nested(name, other) for _, other, _ in taken):
            continue
        taken.append((-neg_order, name, mod))
    return [r for _, name, mod in sorted(taken, key=lambda t: t[0]) for r in _children(name, mod)]


def _nested(a: str, b: str) -> bool:
    """Whether module path `a` is inside `b` or `b` inside `a` ("" is the root)."""
    return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")


def resolve_regions(model: nn.Module | None, regions) -> list[Region]:
    """The user's `regions=` as a list of Region.

    "auto": every repeated stack of `model` (`find_regions`); a module list's name in `model`
    ("model.layers"): its children; a block class, or a tuple/set of them (as FSDP's and
    accelerate's wrap policies take): every outermost module of that class in `model`; a module
    list, a ModuleDict, or any iterable of modules: those modules; None: no regions.
    Regions must be submodules of `model` when it is given."""
    if regions is None:
        return []
    if isinstance(regions, str):
        return _auto(model) if regions == "auto" else _named(model, regions)
    if isinstance(regions, type):
        return _by_class(model, (regions,))
    if isinstance(regions, _CONTAINERS):
        items = list(regions)
    elif isinstance(regions, nn.ModuleDict):
        items = list(regions.values())
    elif isinstance(regions, nn.Module):
        raise TypeError(f"HybridCheckpointer(regions=...): got one {type(regions).__name__}; pass a list of "
                        f"modules (regions=[module]), a module list, its name, or a block class")
    else:
        try:
            items = list(regions)
        except TypeError:
            raise TypeError(f"HybridCheckpointer(regions=...): expected 'auto', a list of modules, a module "
                            f"list's name, a block class, or None; got {type(regions).__name__}") from None
        if items and all(isinstance(c, type) for c in items):
            return _by_class(model, tuple(items))
    return _given(model, items)


def _auto(model: nn.Module | None) -> list[Region]:
    if model is None:
        log.info("regions='auto' without a model: no regions, per-tensor keep/offload only")
        return []
    found = find_regions(model)
    if not found:
        warn(f"HybridCheckpointer(regions='auto'): found no repeated blocks in {type(model).__name__}, so "
             f"nothing can be recomputed (keep/offload per tensor only); pass regions=[...] (modules, "
             f"a module list's name, or a block class) to recompute")
    return found


def _need_model(model: nn.Module | None, regions) -> nn.Module:
    if model is None:
        raise ValueError(f"HybridCheckpointer(regions={regions!r}): a name or a class is looked up in the "
                         f"model; pass model=, or the modules themselves")
    return model


def _named(model: nn.Module | None, name: str) -> list[Region]:
    model = _need_model(model, name)
    lists = ", ".join(repr(n) for n, _ in _stacks(model)) or "none"
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"HybridCheckpointer(regions={name!r}): {type(model).__name__} has no submodule "
                         f"{name!r}; its module lists of repeated blocks: {lists}") from None
    if not isinstance(mod, _CONTAINERS) or len(mod) == 0:
        raise ValueError(f"HybridCheckpointer(regions={name!r}): that is a {type(mod).__name__}, not a module "
                         f"list; name a ModuleList or Sequential (here: {lists}), or pass "
                         f"regions=[model.get_submodule({name!r})] for this one module")
    return _children(name, mod)


def _by_class(model: nn.Module | None, classes: tuple) -> list[Region]:
    shown = classes[0].__name__ if len(classes) == 1 else "(" + ", ".join(c.__name__ for c in classes) + ")"
    for c in classes:
        if not issubclass(c, nn.Module):
            raise TypeError(f"HybridCheckpointer(regions={shown}): {c.__name__} is not an nn.Module class")
    model = _need_model(model, shown)
    found: list[Region] = []
    inside: str | None = None  # the path prefix of the last match: its descendants belong to it
    for name, mod in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(mod, classes):
            found.append(Region(name or "(model)", mod))
            inside = f"{name}." if name else ""
    if not found:
        blocks = sorted({type(k).__name__ for _, stack in _stacks(model) for k in stack}) or ["none"]
        raise ValueError(f"HybridCheckpointer(regions={shown}): no {shown} in {type(model).__name__}; its "
                         f"repeated block classes: {', '.join(blocks)}")
    return found


def _given(model: nn.Module | None, items: list) -> list[Region]:
    names = {m: n for n, m in model.named_modules()} if model is not None else {}
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, nn.Module):
            raise TypeError(f"HybridCheckpointer(regions=...): item {i} is a {type(m).__name__}, not an nn.Module")
        if model is not None and m not in names:
            raise ValueError(f"HybridCheckpointer(regions=...): item {i} ({type(m).__name__}) is not a submodule "
                             f"of the model ({type(model).__name__}), so its forward never runs under the "
                             f"checkpointer; pass modules of that model (e.g. its block list), or build the "
                             f"checkpointer for the model they belong to")
        out.append(Region(names.get(m) or ("(model)" if m is model else f"region{i}:{type(m).__name__}"), m))
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

    Rule 8: module hooks belong to the module, not to one forward, so they act only on the thread
    that entered `with hc:`. A call of the same module on another thread meanwhile runs plain.
    """

    def __init__(self, regions: Sequence[Region], enter: Callable, exit: Callable):
        self._owner = threading.get_ident()
        self._handles = []
        for r in regions:
            self._handles.append(r.module.register_forward_pre_hook(
                _eager(lambda mod, args, kwargs, _r=r: enter(_r, args, kwargs) if self._mine() else None),
                with_kwargs=True, prepend=True))
            self._handles.append(r.module.register_forward_hook(
                _eager(lambda mod, args, output, _r=r: exit(_r, output) if self._mine() else None), always_call=True))

    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def add_pre_hook(self, module: nn.Module, fn: Callable[[tuple, dict], None]) -> None:
        """Call `fn(args, kwargs)` before each call of `module` on this thread, until `remove()`."""
        self._handles.append(module.register_forward_pre_hook(
            # kwargs may be missing: PyTorch iterates a snapshot of the pre-hooks, so a hook removed
            # meanwhile is still called once, as one registered without kwargs.
            lambda mod, args, kwargs=None: fn(args, kwargs or {}) if self._mine() else None, with_kwargs=True))

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
