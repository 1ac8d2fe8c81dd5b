"""Mirrored writes on the fast path (``Family.refresh_fast``).

With a synchronized clone, a one-extent write whose write-intent bit is
committed takes no lock: it writes the source and the clone.  What makes
that safe is held here at the chosen points:

- the intent sweep clears a bit only after every fast-path write that may
  have read it set has ended (``Clones.sweep_intents`` quiesces them) or is
  in ``clone.hot`` (``Family.clear_intents`` clears first, reads ``hot``
  after);
- a clone leaving the synchronized state (a failed mirror write, a
  fracture) is not copied into or cleared while such a write is running.
"""
from __future__ import annotations

import asyncio
import errno
import threading

from lunclone import policy
from lunclone import volume as vf
from live import EXT, MiB, Async, Hold, pattern

SIZE = 16 * MiB  # 4 intent chunks of 64 extents
CHUNK = 1 << policy.INTENT_CHUNK_SHIFT


def synchronized(live, intents: tuple[int, ...] = (3, 7)) -> None:
    """src mirrored to c1, the intent bits of the chunks of ``intents`` committed and not
    hot (as a sweep round that found them being written leaves them), no
    sweeper running (the test sweeps when it chooses)."""
    live.on_loop(live.engine.clones.stop)
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a", SIZE), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    for i in intents:  # slow path: the intent bit is committed first
        live.write("src", b"b" * 4096, i * EXT)
    fam, clone = live.family("src"), live.clone("c1")
    assert set(clone.delta.iter_set()) == {j for i in intents
                                           for j in range(i // CHUNK * CHUNK, (i // CHUNK + 1) * CHUNK)}
    with fam.maps_lock:
        clone.hot = set()
    assert fam.fast is not None and fam.fast[1] == [clone]


def sweep(live) -> int:
    """One intent sweep of c1, as the daemon's sweeper runs it."""
    fam = live.family("src")
    return asyncio.run_coroutine_threadsafe(
        live.engine.clones.sweep_intents(fam, live.clone("c1")), live.engine.loop).result(30)


def held_write(monkeypatch, tag: bytes):
    """Hold the source write of a write whose data starts with ``tag``."""
    return Hold(monkeypatch, vf, "write_from", lambda fd, buf, off: bytes(buf[:4]) == tag)


def test_mirrored_write_with_its_intent_committed_takes_no_lock(live):
    synchronized(live)
    fam = live.family("src")
    with fam.maps_lock:
        Async(lambda: live.write("src", b"F" * 4096, 3 * EXT + 4096)).result(5.0)
        slow = Async(lambda: live.write("src", b"S" * 4096, 2 * CHUNK * EXT))  # not set
        slow.thread.join(0.3)
        assert not slow.done(), "a write whose intent bit is not committed took no lock"
    slow.result(5.0)
    assert live.file("c1") == live.file("src")
    assert live.file("src")[3 * EXT + 4096:3 * EXT + 8192] == b"F" * 4096


def test_sweep_waits_for_a_fast_write_from_before_its_last_round(live, monkeypatch):
    """A fast-path write that read its bit two sweeps ago is not in
    ``hot`` any more; the sweep must not clear its bit (and commit the
    clear) before the write reached both volumes."""
    synchronized(live, intents=(3,))
    hold = held_write(monkeypatch, b"HOLD")
    w = Async(lambda: live.write("src", b"HOLD" * 1024, 3 * EXT))
    hold.wait_arrived()
    assert sweep(live) == 0  # 3 is hot this round: nothing idle, nothing waited for
    second = Async(lambda: sweep(live))  # now 3 looks idle
    second.thread.join(0.5)
    try:
        assert not second.done(), "the sweep went on while a fast-path write was in flight"
        assert live.clone("c1").delta.test(3), "the intent of a write in flight was cleared"
    finally:
        hold.release()
    w.result(5.0)
    assert second.result(10.0) == CHUNK
    assert live.file("c1") == live.file("src")


def test_sweep_clears_before_it_reads_hot(live):
    """A fast-path write that adds its extent to ``hot`` just after the
    sweep read it must find its bit already clear (and take the slow path,
    which sets it again), never set and then cleared under it."""
    synchronized(live)
    fam, clone = live.family("src"), live.clone("c1")
    with fam.maps_lock:
        idle = fam.idle_intents(clone)
    assert idle == list(range(CHUNK))
    writer: list[Async] = []

    class WriteAfterLookup(set):
        def copy(self):
            seen = set(self)
            if not writer:  # the write comes just after the lookup
                writer.append(Async(lambda: live.write("src", b"R" * 4096, 3 * EXT)))
                writer[0].thread.join(0.3)
            return seen
    clone.hot = WriteAfterLookup()
    with fam.maps_lock:
        fam.clear_intents(clone, idle)
        assert not writer[0].done(), "a write went past a bit being cleared without the lock"
    writer[0].result(5.0)
    assert clone.delta.test(3), "a write landed with its intent bit cleared"
    assert live.file("c1") == live.file("src")


def test_failed_mirror_write_resyncs_only_after_fast_writes_end(live, monkeypatch):
    """A fast-path mirror write fails: the clone resynchronizes, but its
    sync job copies nothing while another fast-path write that began under
    the synchronized rules is still running (it would race the copy)."""
    synchronized(live)
    hold = held_write(monkeypatch, b"HOLD")
    w1 = Async(lambda: live.write("src", b"HOLD" * 1024, 3 * EXT))
    hold.wait_arrived()
    clone_store = live.clone("c1").volume.store
    real = clone_store.pwrite

    def failing(buf, offset):
        if offset == 7 * EXT:
            raise OSError(errno.EIO, "injected: mirror write failed")
        real(buf, offset)
    clone_store.pwrite = failing
    copies = []
    real_copy = policy.Family.copy_runs
    monkeypatch.setattr(policy.Family, "copy_runs",
                        lambda self, *a, **k: copies.append(a) or real_copy(self, *a, **k))
    live.write("src", b"M" * 4096, 7 * EXT)  # fast path; its mirror write fails
    assert live.clone("c1").state == "synchronizing"
    threading.Event().wait(0.5)
    try:
        assert not copies, "the sync copied while a fast-path write was in flight"
    finally:
        hold.release()
        clone_store.pwrite = real
    w1.result(5.0)
    live.wait_clone("c1", "synchronized")
    assert live.file("c1") == live.file("src")


def test_fracture_waits_for_a_fast_mirrored_write(live, monkeypatch):
    """The fracture commits an exact delta map: a fast-path write begun
    under the synchronized rules has reached both volumes first."""
    synchronized(live)
    hold = held_write(monkeypatch, b"HOLD")
    w = Async(lambda: live.write("src", b"HOLD" * 1024, 3 * EXT))
    hold.wait_arrived()
    frac = live.cmd_in_thread("clone_fracture", name="c1")
    frac.thread.join(0.3)
    assert not frac.done(), "the fracture went on while a mirrored write was in flight"
    hold.release()
    w.result(5.0)
    frac.result(10.0)
    assert live.clone("c1").delta.count() == 0
    assert live.file("c1") == live.file("src")


def test_intents_go_by_chunks(live):
    """The first write into a chunk commits the intent bits of the whole
    chunk (its neighbours then take the fast path); the sweep clears a
    chunk only when none of its extents was written that round."""
    synchronized(live, intents=(3, CHUNK + 5))
    fam, clone = live.family("src"), live.clone("c1")
    with fam.maps_lock:  # a neighbour in the chunk needs no commit, no lock
        Async(lambda: live.write("src", b"N" * 4096, (CHUNK + 40) * EXT)).result(5.0)
    assert sweep(live) == CHUNK  # chunk 0 idle; chunk 1 had a write this round
    assert set(clone.delta.iter_set()) == set(range(CHUNK, 2 * CHUNK))
    assert sweep(live) == CHUNK
    assert clone.delta.count() == 0
    assert live.file("c1") == live.file("src")


def test_unprotected_restore_mirrors_protected_extents_on_the_fast_path(live, monkeypatch):
    """During an unprotected restore, a write into an extent the host has
    written already (protected) goes to the source and the clone without
    the lock; a fast-path write still held when the restore ends is
    through before the clone's resync copies anything."""
    live.fractured_clone(size=SIZE, data=pattern(b"C", SIZE))
    live.write("src", pattern(b"S", 4 * EXT), 0)  # extents 0..3 differ
    live.cmd("restore", source="src", clone_name="c1", protected=False, rate_limit="64K")
    live.cmd("restore_pause", source="src")
    fam = live.family("src")
    live.write("src", b"P" * 4096, 9 * EXT)  # not pending: protected bit committed
    assert fam.fast is not None and fam.fast[1] == [live.clone("c1")]
    with fam.maps_lock:
        Async(lambda: live.write("src", b"Q" * 4096, 9 * EXT + 8192)).result(5.0)
    assert live.file("c1")[9 * EXT + 8192:9 * EXT + 12288] == b"Q" * 4096
    hold = held_write(monkeypatch, b"HOLD")
    w = Async(lambda: live.write("src", b"HOLD" * 1024, 9 * EXT))
    hold.wait_arrived()
    copies = []
    real_copy = policy.Family.copy_runs
    monkeypatch.setattr(policy.Family, "copy_runs",
                        lambda self, *a, **k: copies.append(a[2]) or real_copy(self, *a, **k))
    live.cmd("restore_resume", source="src")
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: fam.restore is None, what="restore done")
    n = len(copies)  # the restore's own copies
    threading.Event().wait(0.5)
    try:
        assert len(copies) == n, "the clone's resync copied while a fast write was in flight"
    finally:
        hold.release()
    w.result(5.0)
    live.wait_clone("c1", "synchronized")
    assert live.file("c1") == live.file("src")
    assert live.file("src")[9 * EXT:9 * EXT + 4096] == b"HOLD" * 1024
