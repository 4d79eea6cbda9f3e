"""The service's malloc policy: what a long-running server frees goes back to the system."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

# Frees 3 MB uploads interleaved with small objects that stay alive (so the heap cannot simply be
# trimmed from its top), after one 4 MB block was freed (which raises glibc's default mmap
# threshold past 3 MB); prints the resident MB held after the frees (``trimmed``: after half a second
# of a :class:`PeriodicTrim` every 50 ms).
_HELD_AFTER_FREES = """
import os, sys, time
from catsdogs.malloc import PeriodicTrim, bound_freed_memory

def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

applied = bound_freed_memory() if sys.argv[1] == "bounded" else {}
first = bytearray(4 * 2**20)
first[::4096] = b"x" * len(first[::4096])
del first
base = rss_mb()
uploads, pinned = [], []
for _ in range(30):
    upload = bytearray(3 * 2**20)
    upload[::4096] = b"x" * len(upload[::4096])  # touched, like a received body
    uploads.append(upload)
    pinned.append(bytearray(2000))
del uploads
if sys.argv[1] == "trimmed":
    trim = PeriodicTrim(interval_s=0.05)
    assert trim.start()
    time.sleep(0.5)
    trim.stop()
print(round(rss_mb() - base, 1), sorted(applied))
"""


def _held_mb(mode: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    out = subprocess.run(
        [sys.executable, "-c", _HELD_AFTER_FREES, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    held, applied = out.stdout.split(maxsplit=1)
    return float(held), applied.strip()


def test_bounded_malloc_hands_freed_uploads_back_where_the_default_keeps_them() -> None:
    default_held, _ = _held_mb("default")
    bounded_held, applied = _held_mb("bounded")
    assert default_held > 60  # 90 MB of uploads freed, most of it still resident
    assert bounded_held < 10  # mapped on their own, unmapped when freed
    assert applied == "['MALLOC_ARENA_MAX', 'MALLOC_MMAP_THRESHOLD_']"


def test_the_operators_malloc_environment_wins() -> None:
    held, applied = _held_mb("bounded", {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)})
    assert applied == "['MALLOC_ARENA_MAX']"  # the threshold was left to the environment's 64 MB
    assert held > 60


def test_periodic_trim_hands_back_the_holes_between_live_blocks() -> None:
    held, _ = _held_mb("trimmed")  # the default policy, which kept them (first test)
    assert held < 10
