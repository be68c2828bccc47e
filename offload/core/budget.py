"""The runtime's budgets: the parser is the scheduler's (one reading of "12GiB" everywhere), plus
the local rank count the default host budget is split by."""
from __future__ import annotations

import os

from scheduler.budget import Budget, parse_budget

__all__ = ["Budget", "parse_budget", "local_world_size"]


def local_world_size() -> int:
    """Ranks sharing this host (torchrun sets LOCAL_WORLD_SIZE); 1 outside a launcher."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1
