"""How much memory the machine has free, how much a worker holds, and OOM kills (Linux).

Many workers each loading a large input can exhaust memory, and the
kernel's OOM killer then picks a victim, perhaps the caller. Two Pool
options keep a call on the right side of that line:

- ``memory_floor``: no new batch starts while the available memory is below
  it; dispatch resumes as memory is freed (checked every ``POLL_SECONDS``).
- ``max_worker_memory``: a process worker whose resident memory passes it
  after a batch retires, and a fresh one takes its place (as
  ``max_tasks_per_worker`` does) — what a leaking library holds goes with it.

"Available" is the smaller of the system's ``MemAvailable`` (what can be
had without swapping, page cache included) and what the process's cgroup
still allows (a container's limit minus its usage), as a container's OOM
killer acts on the latter.
"""

from __future__ import annotations

import os

# How often dispatch held by ``memory_floor`` looks at the memory again: a
# tenth of a second is short next to a batch that needs that much memory,
# and a read of /proc/meminfo costs ~20 us.
POLL_SECONDS = 0.1

_CGROUP = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None


def _meminfo_available() -> int | None:
    text = _read("/proc/meminfo")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_dir() -> str | None:
    """This process's cgroup v2 directory, if the unified hierarchy is mounted."""
    text = _read("/proc/self/cgroup")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return os.path.join(_CGROUP, line[3:].lstrip("/"))
    return None


def _cgroup_room() -> int | None:
    """Bytes this cgroup may still allocate, None without a limit."""
    directory = _cgroup_dir()
    if directory is None:
        return None
    limit, usage = (
        _read(os.path.join(directory, "memory.max")),
        _read(os.path.join(directory, "memory.current")),
    )
    if limit is None or usage is None or limit.strip() == "max":
        return None
    return max(0, int(limit) - int(usage))


def available_bytes() -> int | None:
    """Memory that can still be had, in bytes; None where it cannot be read."""
    figures = [f for f in (_meminfo_available(), _cgroup_room()) if f is not None]
    return min(figures) if figures else None


def below_floor(floor: int | None) -> bool:
    """True when ``floor`` is set and the available memory is under it."""
    if floor is None:
        return False
    available = available_bytes()
    return available is not None and available < floor


def rss_bytes() -> int:
    """This process's resident memory, in bytes."""
    text = _read("/proc/self/statm")
    if text is None:
        return 0
    return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")


def oom_kills() -> int:
    """How many processes the OOM killer has killed so far (system and cgroup)."""
    total = 0
    vmstat = _read("/proc/vmstat")
    for line in (vmstat or "").splitlines():
        if line.startswith("oom_kill "):
            total += int(line.split()[1])
    directory = _cgroup_dir()
    events = _read(os.path.join(directory, "memory.events")) if directory else None
    for line in (events or "").splitlines():
        if line.startswith("oom_kill "):
            total += int(line.split()[1])
    return total


__all__ = ["POLL_SECONDS", "available_bytes", "below_floor", "oom_kills", "rss_bytes"]
