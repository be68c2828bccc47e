"""Who decides: a fixed action, a user's callable, or the scheduler's plan (policy="auto").

A policy answers two questions during forward: what to do with a region call (KEEP, OFFLOAD
its tensors, RECOMPUTE it), and, outside recomputed regions, whether one saved tensor is kept or
offloaded. User strings are turned into these objects once, in `HybridCheckpointer.__init__`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from scheduler.plan import Action, SegmentPlan

if TYPE_CHECKING:
    from .selective import OpPolicy


@dataclass(frozen=True)
class RegionSite:
    """A region call, as a policy callable sees it."""

    name: str  # qualified module name, e.g. "transformer.h.3"
    index: int  # the region call's position in this forward (0 = first block called)
    module: nn.Module
    tail: bool  # one of the last region calls before the loss (kept resident by default)


@dataclass(frozen=True)
class TensorSite:
    """A saved tensor outside recomputed regions, as a policy callable sees it."""

    region: RegionSite | None  # None: saved outside every region
    index: int  # pack order in this forward
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # bytes of its storage (what moving it would free)


PolicyFn = Callable[[Union[RegionSite, TensorSite]], Union[Action, None]]


class Policy:
    """The decisions a forward asks for. Subclasses override what they decide."""

    per_tensor = False  # ask tensor() for tensors of KEEP segments too

    def region(self, site: RegionSite, segment: int) -> SegmentPlan:
        """The plan for one region call (`segment`: its index in this forward)."""
        raise NotImplementedError

    def gap(self, segment: int, tail: bool) -> SegmentPlan:
        """The plan for the stretch of forward between region calls (`tail`: after the last ones)."""
        raise NotImplementedError

    def tensor(self, site: TensorSite, segment: SegmentPlan) -> Action:
        """KEEP or OFFLOAD for one tensor of a segment that is not recomputed."""
        raise NotImplementedError

    def op_policy(self, site: RegionSite, segment: int, plan: SegmentPlan) -> "OpPolicy | None":
        """An `OpPolicy` (a `CheckpointPolicy` function, and whether the replay asks it again)
        for this recomputed region call (selective recompute), or None: the user's `op_policy`,
        if any, applies instead (it takes precedence)."""
        return None

    def op_probe(self, site: RegionSite, segment: int) -> TorchDispatchMode | None:
        """A dispatch mode this recomputed region call's forward runs under (auto's op profile),
        or None. Asked only where no op policy applies."""
        return None

    def lookahead(self) -> int:
        """Segments ahead of backward at which reloads are issued (0: on demand at unpack).
        A region call and the gap after it are two segments: 2 is one block ahead."""
        return 2

    def prediction(self) -> dict | None:
        """What the plan predicted for this step (policy="auto"), for the report."""
        return None

    def shapes(self) -> dict | None:
        """Profiling steps run and where the plan came from (policy="auto"), for the report."""
        return None

    def close(self) -> None:
        """The checkpointer closes: stop whatever the policy still runs."""

    def current_plan(self):
        """The scheduler's `Plan` the last forward ran (policy="auto"); None otherwise."""
        return None

    def device_limit(self) -> int | None:
        """The device bytes the current plan was made to stay under (policy="auto"; None: no plan)."""
        return None

    def model_inputs(self, args: tuple, kwargs: dict) -> None:
        """The model was called with these inputs (before any of its tensors were saved)."""

    def begin_forward(self, forward) -> None:
        """A `with hc:` forward starts."""

    def end_forward(self, forward, failed: bool) -> None:
        """A `with hc:` forward ended (`failed`: it raised)."""


class FixedPolicy(Policy):
    """Every region gets `action`. Under OFFLOAD the tail regions stay resident (Rule 6)."""

    def __init__(self, action: Action):
        self.action = action

    def region(self, site: RegionSite, segment: int) -> SegmentPlan:
        if self.action is Action.OFFLOAD and site.tail:
            return SegmentPlan(Action.KEEP)
        return SegmentPlan(self.action)

    def gap(self, segment: int, tail: bool) -> SegmentPlan:
        offload = self.action is Action.OFFLOAD and not tail
        return SegmentPlan(Action.OFFLOAD if offload else Action.KEEP)

    def tensor(self, site: TensorSite, segment: SegmentPlan) -> Action:
        return Action.OFFLOAD if segment.action is Action.OFFLOAD else Action.KEEP


class CallablePolicy(Policy):
    """A user function called with a RegionSite per region call and a TensorSite per tensor.

    For a region it may return KEEP, OFFLOAD (its tensors default to offloaded) or RECOMPUTE;
    for a tensor, KEEP or OFFLOAD. None means "the default": KEEP, or the region's action.
    """

    per_tensor = True

    def __init__(self, fn: PolicyFn):
        self.fn = fn

    def region(self, site: RegionSite, segment: int) -> SegmentPlan:
        return SegmentPlan(self._call(site, Action.KEEP, allowed=tuple(Action)))

    def gap(self, segment: int, tail: bool) -> SegmentPlan:
        return SegmentPlan(Action.KEEP)

    def tensor(self, site: TensorSite, segment: SegmentPlan) -> Action:
        default = segment.action if segment.action is not Action.RECOMPUTE else Action.KEEP
        return self._call(site, default, allowed=(Action.KEEP, Action.OFFLOAD))

    def _call(self, site, default: Action, allowed: tuple[Action, ...]) -> Action:
        out = self.fn(site)
        if out is None:
            return default
        if not isinstance(out, Action) or out not in allowed:
            what = "region" if isinstance(site, RegionSite) else "tensor"
            raise TypeError(f"HybridCheckpointer(policy=...): the policy callable returned {out!r} for a "
                            f"{what}; expected one of {[a.name for a in allowed]} as offload.Action, or None")
        return out


def resolve_policy(policy) -> Policy | None:
    """Turn the user's `policy=` into a Policy; None means "auto" (the scheduler decides)."""
    if isinstance(policy, Action):
        return FixedPolicy(policy)
    if isinstance(policy, str):
        if policy == "auto":
            return None
        try:
            return FixedPolicy(Action(policy))
        except ValueError:
            pass
        raise ValueError(f"HybridCheckpointer(policy={policy!r}): unknown policy; use 'auto', 'keep', "
                         f"'offload', 'recompute', an offload.Action, or a callable returning offload.Action")
    if callable(policy):
        return CallablePolicy(policy)
    raise ValueError(f"HybridCheckpointer(policy={policy!r}): expected 'auto', 'keep', 'offload', 'recompute', "
                     f"an offload.Action or a callable, got {type(policy).__name__}")
