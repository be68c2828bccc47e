"""Turning one measured forward+backward into the scheduler's `Profile`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.profile import Profile, SegmentRecord

from ..transfer.linkprobe import Link
from ..observe.timeline import ResolvedTimeline

if TYPE_CHECKING:
    from ..core.hooks import ForwardPass


def build_profile(fp: "ForwardPass", tl: ResolvedTimeline | None, link: Link, signature: str = "",
                  worksets: dict[str, int] | None = None) -> Profile:
    """Segments with their measured forward and backward times (replays subtracted from the
    backward they ran in), the tensors the forward saved, and the measured link. Without a
    timeline (`tl` None: an ordinary step, never synchronized for its times) the times are 0:
    only the bytes are measured."""
    forward: dict[str, float] = {}
    backward: dict[str, float] = {}
    worksets = worksets or {}
    for span in tl.of("compute") if tl is not None else ():
        if span.kind == "forward":
            forward[span.label] = forward.get(span.label, 0.0) + span.end - span.start
        elif span.kind == "backward":
            backward[span.label] = backward.get(span.label, 0.0) + span.end - span.start
        elif span.kind == "recompute":
            backward[span.label] = backward.get(span.label, 0.0) - (span.end - span.start)
    segments = tuple(
        SegmentRecord(index=seg.index, name=seg.name, forward_s=forward.get(seg.name, 0.0),
                      backward_s=max(0.0, backward.get(seg.name, 0.0)), recomputable=seg.site is not None,
                      input_bytes=fp.input_bytes.get(seg.index, 0),
                      backward_working_set_bytes=worksets.get(seg.name, 0))
        for seg in fp.segments)
    return Profile(segments=segments, tensors=tuple(fp.records), bw_d2h=link.d2h_bytes_per_s,
                   bw_h2d=link.h2d_bytes_per_s, transfer_latency_s=link.latency_s, signature=signature)
