"""Host-side memory readings: process RSS, system available memory, and the cgroup limit.

``available_host_bytes()`` is what the runtime sizes its default host budget from: inside a
container the kernel's "available" figure is the whole machine's, while the cgroup limit is what
gets the process OOM-killed, so the smaller of the two headrooms counts.

Cgroup lookup: /proc/self/cgroup names this process's cgroup per hierarchy. A v1 line whose
controller list holds ``memory`` means the memory controller lives on v1 (hybrid hosts have a
``0::`` line as well); otherwise the ``0::`` line names the v2 cgroup. A limit set on an ancestor
binds as well (systemd slices, Kubernetes pod vs container), so every level from the process's
cgroup up to the mount root is read and the tightest headroom wins. Limit values of "max" or at
least ``UNLIMITED_BYTES`` (v1 writes 2**63 rounded down to a page for "none") mean no limit.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PROC_CGROUP = Path("/proc/self/cgroup")
#: A limit at or above this (1 EiB) is treated as "no limit".
UNLIMITED_BYTES = 1 << 60

_FILES = {1: ("memory.limit_in_bytes", "memory.usage_in_bytes"), 2: ("memory.max", "memory.current")}
#: memory.stat key of reclaimable page cache, subtracted from usage (the "working set" of
#: cAdvisor/kubectl): otherwise a data loader's file cache would look like a full cgroup.
_INACTIVE_FILE = {1: "total_inactive_file", 2: "inactive_file"}


@dataclass(frozen=True)
class CgroupMemory:
    """The memory cgroup of this process, as far as it limits it."""

    version: int  #: 1 or 2
    path: Path  #: the process's cgroup directory that was read
    limit_bytes: int | None  #: the limit of the binding level; None when no level is limited
    usage_bytes: int | None  #: usage at the binding level, less reclaimable file cache
    headroom_bytes: int | None  #: min over limited levels of (limit - usage), at least 0


def process_rss_bytes() -> int:
    """Resident set size of this process in bytes."""
    return int(psutil.Process().memory_info().rss)


def system_available_bytes() -> int:
    """Memory the kernel says can be given to processes without swapping (MemAvailable)."""
    return int(psutil.virtual_memory().available)


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup file; None for "max", absurd values, or an unreadable file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        logger.debug("unexpected content in %s: %r", path, text)
        return None
    return None if value >= UNLIMITED_BYTES else value


def _working_set(level: Path, version: int) -> int | None:
    """Usage of one cgroup level less its inactive file cache, or None when unreadable."""
    usage = _read_int(level / _FILES[version][1])
    if usage is None:
        return None
    try:
        for line in (level / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == _INACTIVE_FILE[version]:
                return max(usage - int(value), 0)
    except (OSError, ValueError):
        pass
    return usage


def _locate(root: Path, proc_cgroup: Path) -> tuple[int, Path, Path] | None:
    """(version, mount dir, cgroup dir) of the memory controller, or None if none is found."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    v2_rel = None
    for line in lines:
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, rel = parts
        if hier == "0" and controllers == "":
            v2_rel = rel
        elif "memory" in controllers.split(","):
            return 1, root / "memory", _join(root / "memory", rel)
    if v2_rel is None:
        return None
    mount = root if (root / "cgroup.controllers").exists() else root / "unified"
    return 2, mount, _join(mount, v2_rel)


def _join(mount: Path, rel: str) -> Path:
    """The cgroup directory for ``rel`` under ``mount``. Inside a container without a cgroup
    namespace ``rel`` is the host's path, which is not mounted: the mount is our own cgroup."""
    path = mount / rel.lstrip("/")
    return path if path.is_dir() else mount


def read_cgroup_memory(root: str | os.PathLike[str] = DEFAULT_CGROUP_ROOT,
                       proc_cgroup: str | os.PathLike[str] = DEFAULT_PROC_CGROUP) -> CgroupMemory | None:
    """This process's memory cgroup, or None when there is no cgroup memory controller.

    ``root`` (the cgroup mount) and ``proc_cgroup`` (the /proc/self/cgroup file) are injectable
    so tests can point them at a fake tree.
    """
    found = _locate(Path(root), Path(proc_cgroup))
    if found is None:
        return None
    version, mount, leaf = found
    limit_name = _FILES[version][0]
    best: tuple[int, int, int] | None = None  # (headroom, limit, usage)
    level = leaf
    while True:
        limit = _read_int(level / limit_name)
        if limit is not None:
            usage = _working_set(level, version) or 0
            headroom = max(limit - usage, 0)
            if best is None or headroom < best[0]:
                best = (headroom, limit, usage)
        if level == mount or mount not in level.parents:
            break
        level = level.parent
    if best is None:
        return CgroupMemory(version, leaf, None, _working_set(leaf, version), None)
    return CgroupMemory(version, leaf, best[1], best[2], best[0])


def cgroup_limit_bytes(root: str | os.PathLike[str] = DEFAULT_CGROUP_ROOT,
                       proc_cgroup: str | os.PathLike[str] = DEFAULT_PROC_CGROUP) -> int | None:
    """The binding cgroup memory limit in bytes, or None when there is none."""
    cg = read_cgroup_memory(root, proc_cgroup)
    return None if cg is None else cg.limit_bytes


def available_host_bytes(root: str | os.PathLike[str] = DEFAULT_CGROUP_ROOT,
                         proc_cgroup: str | os.PathLike[str] = DEFAULT_PROC_CGROUP) -> int:
    """Host bytes this process can still take: min(system available, cgroup limit - usage),
    with the cgroup usage counted without reclaimable file cache.

    The runtime sizes its default host budget from this figure.
    """
    available = system_available_bytes()
    cg = read_cgroup_memory(root, proc_cgroup)
    if cg is not None and cg.headroom_bytes is not None:
        available = min(available, cg.headroom_bytes)
    return available
