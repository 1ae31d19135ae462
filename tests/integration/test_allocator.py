"""The allocator tuning of a worker: chunk-sized buffers stop costing page faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Makes and frees the buffers of 200 RETR chunks (read, CRLF, stuffed, still queued) and
# reports the minor page faults that cost, before and after the tuning.
_PROBE = """
import collections, json, resource
from pop3d.protocol import limits
from pop3d.server.allocator import keep_chunk_buffers_in_heap

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sent = collections.deque(maxlen=3)  # what the transport still holds
    for i in range(200):
        read = bytes(limits.READ_CHUNK - i)
        crlf = read.replace(bytes(64), bytes(65))
        sent.append(b"." + crlf)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

untuned = faults()
tuned = keep_chunk_buffers_in_heap()
print(json.dumps({"untuned": untuned, "tuned": tuned, "after": faults()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
def test_chunk_buffers_are_reused_not_faulted_in() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    result = json.loads(out)
    assert result["tuned"] is True
    # Untuned, glibc maps and trims those buffers again and again: ~256 faults each.
    assert result["untuned"] > 20_000
    assert result["after"] < result["untuned"] // 10
