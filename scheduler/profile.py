"""The measured step: what the planner and the simulator read.

A forward pass is cut into *segments* in forward order: every call of a region (a repeated
block such as a transformer layer) is one segment, and the stretches of forward between region
calls (the embedding before the first block, the head and loss after the last) are segments too.
Only region segments can be recomputed; every segment's tensors can be kept or offloaded.

Every distinct storage that autograd saved during the step is one `TensorRecord`, attributed to
the segment in which it was first saved. Units: bytes, seconds, bytes per second.

Fields added after the first runtime (all with defaults, so older callers keep working):

- `TensorRecord.save_offset_s`: seconds from the start of its segment's forward to its first
  save. None (not measured): the simulator spreads a segment's saves evenly over its forward,
  in id order (the k-th of m at k/m of the forward, k = 1..m).
- `SegmentRecord.backward_working_set_bytes`: the device bytes the segment's backward allocates
  on top of the saved activations while it runs (gradient buffers of its activations, kernel
  temporaries; the LM head's fp32 logits gradient), at their peak, in bytes; freed when that
  backward ends. 0 (not measured) means none is modelled: the caller then has to keep a reserve
  under the budget itself (`scheduler.backward_reserve`).
- `SegmentRecord.ops`: the segment's ops in forward order (`OpRecord`), measured on a profiling
  step; empty (not measured) for synthetic profiles and segments outside regions. What the
  op-level planner (`oplevel`) chooses selective recompute from.
- `SegmentRecord.replay_s` / `replay_bytes`: what a replay of the segment costs in seconds and
  re-materialises in device bytes; None means a full replay (`forward_s`, and the bytes it
  saved less those a later segment saves again). `held_bytes`: device bytes a RECOMPUTE of it
  holds from the start of its forward to the end of its backward besides its inputs (never
  offloaded). Set by `oplevel.apply` for selective recompute (the stored op outputs).
- `SegmentRecord.dispatched_ops` and `Profile.op_dispatch_s`: how many ops the segment's forward
  dispatches (every op a dispatch mode sees: views, in-place and random ops too; 0 = not
  measured, `len(ops)` stands in) and the seconds a selective segment's dispatch modes add per
  such op (the forward's SaveOps, the replay's mode: a few Python calls each, measured once per
  profile; 0.0 = not measured, none modelled). What `oplevel.apply` charges selective recompute
  on top of the ops' own times.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorRecord:
    """One distinct storage saved for backward during the profiled step.

    `id` is the pack-hook call index (0-based, counted over the whole forward) at which the
    storage was first saved; the runtime sees the same ids in every step with the same input
    shapes, so a plan can name tensors by it.
    """

    id: int
    segment: int  # index into Profile.segments of the segment that first saved it
    nbytes: int
    offloadable: bool  # passed the runtime's filters (not a parameter, on device, large enough)
    last_segment: int = -1  # segment of its last save; -1 means the same as `segment`
    save_offset_s: float | None = None  # seconds into its segment's forward; None: spread evenly

    @property
    def last(self) -> int:
        return self.segment if self.last_segment < 0 else self.last_segment


@dataclass(frozen=True)
class OpRecord:
    """One op of a region's forward, as selective recompute can name it.

    `index` is the op's position among the ops whose outputs may be stored (not views, not
    random: the ones `Plan` store sets refer to) in the region's forward, counted from 0; the
    same positions hold in every call with the same input shapes.
    """

    index: int
    name: str  # the op, e.g. "aten.addmm.default"
    nbytes: int  # bytes of its outputs' distinct storages (what storing them holds), bytes
    forward_s: float  # its share of the segment's forward time, seconds
    saved_bytes: int = 0  # bytes of those outputs that autograd saves anyway in the segment


@dataclass(frozen=True)
class SegmentRecord:
    """One segment of the forward pass, with its measured times and bytes."""

    index: int
    name: str
    forward_s: float  # forward compute time of this segment
    backward_s: float  # backward compute time of this segment (recompute excluded)
    recomputable: bool  # True for region calls, False for the stretches between them
    input_bytes: int = 0  # bytes a recompute must hold to replay it (its tensor inputs)
    # Peak device bytes its backward allocates beyond the saved activations (gradients,
    # temporaries), held while that backward runs; 0 = not measured (module docstring).
    backward_working_set_bytes: int = 0
    ops: tuple[OpRecord, ...] = ()  # its ops in forward order; () = not measured
    replay_s: float | None = None  # seconds a replay takes; None: forward_s (a full replay)
    replay_bytes: int | None = None  # bytes a replay re-materialises; None: all it dropped
    held_bytes: int = 0  # bytes a RECOMPUTE holds from forward to backward besides its inputs
    dispatched_ops: int = 0  # ops its forward dispatches, views included; 0 = not measured

    @property
    def op_count(self) -> int:
        """Ops a dispatch mode sees in one run of the segment: `dispatched_ops`, or `len(ops)`
        when that was not measured."""
        return self.dispatched_ops or len(self.ops)


@dataclass(frozen=True)
class Profile:
    """A measured (or synthesized) step: segments in forward order, their tensors, the link."""

    segments: tuple[SegmentRecord, ...]
    tensors: tuple[TensorRecord, ...]
    bw_d2h: float  # measured device-to-host bandwidth on our pinned pool, bytes/s
    bw_h2d: float  # measured host-to-device bandwidth, bytes/s
    transfer_latency_s: float = 10e-6  # fixed cost per copy, seconds
    signature: str = ""  # the input-shape signature this profile was measured under
    op_dispatch_s: float = 0.0  # seconds a selective segment's dispatch mode adds per op it sees
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def saved_bytes(self, segment: int) -> int:
        """Bytes first saved in `segment` (the memory it holds until its backward)."""
        return sum(t.nbytes for t in self.tensors if t.segment == segment)

    @property
    def total_saved_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def has_working_sets(self) -> bool:
        """True when some segment carries a measured backward working set (bytes > 0)."""
        return any(s.backward_working_set_bytes > 0 for s in self.segments)
