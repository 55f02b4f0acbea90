"""The run's allocator settings (tasks/memory.py): image-sized buffers are reused from the
heap while dispatching, and what a burst left free goes back to the system when it ends."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from imagebatch.tasks import memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

BURST = """
import json, os
from imagebatch.tasks import memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

applied = memory.tune_for_run()
before = rss()
# Sixty answers at once, as a burst of 4 MB bodies would be; small objects made in between
# stay alive, so the freed buffers are holes the heap cannot simply cut off its top.
kept, burst = [], []
for i in range(60):
    buf = bytearray(4_200_000)
    buf[::4096] = b"x" * len(buf[::4096])
    burst.append(buf)
    kept.append(bytes(100 + i))
peak = rss()
del burst
held = rss()
memory.give_back()
print(json.dumps({"applied": applied, "before": before, "peak": peak, "held": held,
                  "after": rss()}))
"""


def _burst() -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", BURST], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@glibc
def test_a_burst_is_kept_for_reuse_and_given_back_when_dispatch_ends():
    r = _burst()
    assert r["applied"] is True
    assert r["peak"] - r["before"] >= 200  # the 250 MB burst was really there
    assert r["held"] - r["before"] >= 200  # kept on the heap, for the next answers
    assert r["after"] - r["before"] <= 50  # and given back by give_back


def test_elsewhere_both_are_harmless(monkeypatch):
    monkeypatch.setattr(memory, "_libc", None)
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", ""))
    assert memory.tune_for_run() is False
    assert memory.give_back() is False
