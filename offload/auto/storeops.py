"""The op policy policy="auto" gives a region call the plan recomputes selectively.

A selective `SegmentPlan` names the ops to store by position (`OpRecord.index`: the n-th op
selective recompute is asked about in the region's forward, as `opprofile` counted them). The
policy answers selective.py's dispatch mode in PyTorch's `CheckpointPolicy` terms: MUST_SAVE for
those positions (kept on the device, as the planner costed them), PREFER_RECOMPUTE for every
other op. A position whose op
is not the one profiled (the forward took another path) stores nothing: it is replayed, which
is always correct. One policy per region call; calls made during a replay (`ctx.is_recompute`)
are counted apart from the forward's.

Positions count only the ops whose outputs may be stored (selective.py's `_stored_ok`), as
`OpProbe` numbers them: SaveOps asks the policy about views and random ops too (as PyTorch
asks), and counting those shifted every later position off its op, so a block planned
selective stored nothing and replayed in full (measured: +40% step on the CPU bench).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch.utils.checkpoint import CheckpointPolicy

from ..core.selective import _stored_ok as storable


class StoreOps:
    """A `CheckpointPolicy` function storing the outputs of the ops at `names`' positions."""

    def __init__(self, names: Mapping[int, str]):
        self.names = dict(names)  # position -> the op profiled there, e.g. "aten.mm.default"
        self._calls = [0, 0]  # ops asked about in forward, in replays

    def __call__(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if not storable(func):  # not numbered: OpProbe skips it too
            return CheckpointPolicy.PREFER_RECOMPUTE
        replay = int(bool(getattr(ctx, "is_recompute", False)))
        k = self._calls[replay]
        self._calls[replay] += 1
        if self.names.get(k) == str(func):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
