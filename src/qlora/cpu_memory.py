"""Memory the CPU has left, for refusing an adapter too large for it before it is allocated.

A CUDA allocation that does not fit raises an error the CLI reports. On the CPU, Linux grants
allocations it cannot back (overcommit) and its out-of-memory killer ends the process later,
with SIGKILL: no message, no exit status of ours. So sizes that cannot fit are checked first.
"""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")


def available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """What the kernel estimates can be allocated without swapping (``MemAvailable``), or None where that is not
    known (not Linux). A container's own memory limit may be lower: this is an upper bound."""
    try:
        for line in meminfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
