"""The plan: the only thing the scheduler hands to the runtime."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Action(enum.Enum):
    """What happens to a saved activation (or to a whole segment's activations)."""

    KEEP = "keep"  # stays on the device
    OFFLOAD = "offload"  # copied to pinned host memory, reloaded before backward needs it
    RECOMPUTE = "recompute"  # dropped; the segment's forward is replayed in backward


@dataclass(frozen=True)
class SegmentPlan:
    """The decision for one segment.

    - KEEP: every tensor stays on the device.
    - OFFLOAD: the tensors whose ids are in `Plan.offload_ids` move to the host, the rest stay.
    - RECOMPUTE: the segment's saved tensors are dropped and replayed; its inputs are offloaded
      when `offload_inputs` is True, kept otherwise. Only recomputable segments may get it.
      With `store_ops` it is selective recompute: the outputs of those ops (`OpRecord.index`
      positions in the segment's profile) are stored on the device in forward and handed back
      in the replay, which runs only the other ops.
    """

    action: Action
    offload_inputs: bool = False
    store_ops: tuple[int, ...] = ()  # RECOMPUTE only: op positions whose outputs are stored

    @property
    def selective(self) -> bool:
        """True for selective recompute (a RECOMPUTE that stores some ops' outputs)."""
        return self.action is Action.RECOMPUTE and bool(self.store_ops)


@dataclass(frozen=True)
class Plan:
    """Per-segment actions, per-tensor offload choices, the prefetch lookahead, and predictions."""

    segments: tuple[SegmentPlan, ...]
    offload_ids: frozenset[int] = frozenset()  # TensorRecord ids to offload (OFFLOAD segments)
    lookahead: int = 1  # reloads are issued this many segments ahead of backward
    predicted_step_s: float = 0.0
    predicted_peak_bytes: int = 0  # saved-activation bytes on the device at the worst moment
    predicted_host_bytes: int = 0  # pinned host bytes held at the worst moment
    signature: str = ""
    notes: tuple[str, ...] = field(default=(), compare=False)

    def action(self, segment: int) -> Action:
        return self.segments[segment].action
