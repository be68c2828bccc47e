"""The cost model: seconds a move costs and how much of it the streams can hide.

Every formula here is in seconds and bytes and is the one the simulator and the planner use
(DESIGN.md §5 states them in words). One copy of x bytes costs the link's fixed latency plus
x over the bandwidth of its direction; a copy is hidden when it fits in the compute time that
runs next to it on the other streams.
"""
from __future__ import annotations

import math

from .hardware import Hardware
from .profile import Profile


def link(profile: Profile, hardware: Hardware | None) -> Hardware:
    """The hardware to cost copies with: `hardware`, or the link measured in `profile`."""
    return Hardware.from_profile(profile) if hardware is None else hardware


def d2h_seconds(nbytes: int, hw: Hardware) -> float:
    """Seconds one device-to-host copy of `nbytes` occupies the D2H stream.

    t = transfer_latency_s + nbytes / bw_d2h  (s = s + B / (B/s)); the usual latency-bandwidth
    (alpha-beta) model of a DMA copy, with both terms measured by the runtime's profiler.
    """
    return hw.transfer_latency_s + nbytes / hw.bw_d2h


def h2d_seconds(nbytes: int, hw: Hardware) -> float:
    """Seconds one host-to-device copy of `nbytes` occupies the H2D stream.

    t = transfer_latency_s + nbytes / bw_h2d, as `d2h_seconds` with the other direction's
    bandwidth (the two differ: on GH200 H2D is ~2.4x D2H, DESIGN.md §5).
    """
    return hw.transfer_latency_s + nbytes / hw.bw_h2d


def d2h_window_s(profile: Profile, segment: int) -> float:
    """Forward compute seconds still ahead once `segment`'s forward ends.

    W = sum(F_i for i > segment). A D2H copy queued after `segment` is free while the bytes
    queued ahead of it and its own fit in bw_d2h * W (DESIGN.md §5, first bullet); what
    spills past the forward delays the reloads that wait for it.
    """
    return sum(s.forward_s for s in profile.segments[segment + 1:])


def h2d_window_s(profile: Profile, segment: int, lookahead: int) -> float:
    """Backward compute seconds between a reload's issue and the moment `segment` needs it.

    A reload issued `lookahead` segments ahead arrives in time when its copy time is at most
    W = sum(B_j for segment < j <= segment + lookahead), the backward of the segments run in
    between (DESIGN.md §5). Segments past the last one add nothing: the earliest issue point
    is the start of backward.
    """
    last = min(len(profile.segments) - 1, segment + lookahead)
    return sum(s.backward_s for s in profile.segments[segment + 1:last + 1])


def recompute_seconds(profile: Profile, segment: int) -> float:
    """Seconds a RECOMPUTE of `segment` adds to backward: its forward again, F_segment (or its
    `replay_s`: a selective replay runs only the ops whose outputs were not stored).

    The replay runs on the compute stream right before the segment's backward, so none of it
    is hidden (DESIGN.md §5, second bullet; the ~+33% of full checkpointing in §7 is this sum).
    """
    seg = profile.segments[segment]
    return seg.forward_s if seg.replay_s is None else seg.replay_s


def freed_per_exposed_second(bytes_freed: float, exposed_s: float) -> float:
    """The planner's score of a move: device bytes freed per second added to the step (B/s).

    A move that frees memory at no exposed time scores infinity, one that frees nothing scores
    zero (DESIGN.md §5, "Score: memory freed per exposed second").
    """
    if bytes_freed <= 0:
        return 0.0
    if exposed_s <= 0:
        return math.inf
    return bytes_freed / exposed_s
