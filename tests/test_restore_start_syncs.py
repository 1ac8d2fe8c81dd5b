"""A restore start fractures the source's other synchronizing clones: from
then on each is a point-in-time copy, so a copy of its sync job still in
flight must land before the start, never after (found by the model test:
"fractured clone c2's file differs from its model").
"""
from __future__ import annotations

import os
import threading
import time

from lunclone import policy
from live import EXT, MiB, Async

SIZE = 8 * MiB


def test_restore_start_waits_for_the_copies_of_syncs_it_stops(live, monkeypatch):
    data = bytes(range(256)) * (SIZE // 256)
    live.fractured_clone(size=SIZE, data=data)
    live.write("src", b"D" * EXT, 0)  # c1 differs here: something to restore
    arrived, release = threading.Event(), threading.Event()
    real = policy.copy_range

    def held(src, dst, offset, length):
        # By name: the job's copies (two at once) may start before the
        # create returns.
        if os.path.basename(dst.path or "") == "c2.img":
            arrived.set()
            release.wait(30)
        return real(src, dst, offset, length)
    monkeypatch.setattr(policy, "copy_range", held)
    live.cmd("clone_create", source="src", name="c2")  # its sync copies, held
    assert arrived.wait(10), "the sync of c2 copied nothing"
    start = Async(lambda: live.cmd("restore", source="src", clone_name="c1",
                                   rate_limit="64K"))
    start.thread.join(0.5)
    started_early = start.done()
    release.set()
    start.result(30)
    assert live.clone("c2").state == "fractured"
    at_start = live.file("c2")
    time.sleep(0.5)  # a copy still in flight would land now
    assert live.file("c2") == at_start, "c2 changed after the restore start fractured it"
    assert not started_early, "the restore started while a copy into c2 was in flight"
