"""Review 5: interleavings of a restore start that stops the sync jobs of
the clones it fractures (``Restores._end_syncs``) with the rest of the
engine.  Each test holds a real copy (``copy_range``) at a chosen point;
both failed on the first version of ``_end_syncs`` (review5-*-before.txt).
"""
from __future__ import annotations

import errno
import threading


from lunclone import policy
from lunclone.jobs import JobKey
from live import EXT, MiB, Async, Hold

SIZE = 8 * MiB


def pattern(n: int = SIZE) -> bytes:
    return bytes(range(256)) * (n // 256)


def test_no_sync_copy_in_flight_after_the_start_when_a_mirror_fails_during_it(live, monkeypatch):
    live.fractured_clone(size=SIZE, data=pattern())  # c1: restored
    live.write("src", b"D" * EXT, 0)  # c1 differs: something to restore
    live.cmd("clone_create", source="src", name="c2")
    live.wait_clone("c2", "synchronized")
    monkeypatch.setattr(policy.Family, "idle_intents", lambda self, clone: [])  # keep intents
    live.write("src", b"I" * EXT, 100 * EXT)  # mirrored to c2: its write-intent bit 100,
    # outside the run of c3's first copy (extents 0-63), held below
    paths = {n: live.engine.volumes.path(n) for n in ("c2", "c3")}
    arrived = {n: threading.Event() for n in paths}
    release = {n: threading.Event() for n in paths}
    real = policy.copy_range

    def held(src, dst, offset, length):
        for n, path in paths.items():
            if getattr(dst, "path", None) == path:
                arrived[n].set()
                release[n].wait(30)
        return real(src, dst, offset, length)
    monkeypatch.setattr(policy, "copy_range", held)
    live.cmd("clone_create", source="src", name="c3")  # synchronizing, its copy held
    assert arrived["c3"].wait(10)
    start = Async(lambda: live.cmd("restore", source="src", clone_name="c1", rate_limit="64K"))
    # The start has stopped c3's job and awaits its held copy (gate closed).
    live.wait(lambda: live.engine.jobs.get(JobKey("sync", "c3")) is None, 10, "c3's job stopped")
    c2 = live.clone("c2")
    store = c2.volume.store

    def failing_flush():
        raise OSError(errno.EIO, "injected mirror flush failure")
    store.flush = failing_flush
    try:
        live.volume("src").flush()  # a host flush: not gated; c2 goes back to synchronizing
    finally:
        del store.flush
    c2_copying = arrived["c2"].wait(5)  # its new sync job copies extent 100
    release["c3"].set()
    try:
        start.thread.join(0.5)
        in_flight = c2_copying and start.done()  # started with c2's copy held
        release["c2"].set()
        start.result(30)
        assert c2.state == "fractured"
        live.write("c2", b"C" * 4096, 100 * EXT)  # a client writes to the fractured clone
    finally:
        release["c2"].set()
    live.wait(lambda: not live.engine.jobs.running(JobKey("sync", "c2")), 10, "c2's job ended")
    assert live.read("c2", 100 * EXT, 4096) == b"C" * 4096, \
        "a sync copy that landed after the start overwrote a client's write to c2"
    assert not in_flight, "a sync copy into c2 was in flight when the start fractured it"
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: live.family("src").restore is None, 20, "restore done")


def test_host_reads_do_not_wait_for_a_sync_copy_at_restore_start(live, monkeypatch):
    live.fractured_clone(size=SIZE, data=pattern())
    live.write("src", b"D" * EXT, 0)
    c2_path = live.engine.volumes.path("c2")
    hold = Hold(monkeypatch, policy, "copy_range",
                lambda src, dst, off, n: getattr(dst, "path", None) == c2_path)
    live.cmd("clone_create", source="src", name="c2")
    hold.wait_arrived()
    start = Async(lambda: live.cmd("restore", source="src", clone_name="c1", rate_limit="64K"))
    live.wait(lambda: live.engine.jobs.get(JobKey("sync", "c2")) is None, 10, "c2's job stopped")
    reader = Async(lambda: live.read("src", 40 * EXT, 4096))  # an extent nobody copies
    reader.thread.join(1.0)
    waited = not reader.done()
    hold.release()
    start.result(30)
    assert reader.result(10) == pattern()[40 * EXT:40 * EXT + 4096]
    assert not waited, "a host read of the source waited 1 s for a sync copy into c2"
