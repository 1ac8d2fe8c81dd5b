"""Review of bae33b8 (a protected bit goes out alone when the copy it stops
is durable: ``copy_durable``, ``Batch.stops_copies``, ``Committer.epoch``)
and b5c1261/a47e46e (unprotected restores on the fast path).

The bug found: the committer thread decides between a full commit and a
requests-only one in ``_full_due`` (under the maps lock), releases the
lock, and only then takes the open batch in ``_commit_requests``.  A host
write deciding in between (the window is wide while an admin transaction
holds ``commit_lock``) requests the protected bit of an extent whose copy
is not durable (``request(copy_durable=False)`` marks the open batch
``stops_copies``), and that batch is committed requests-only anyway: the
protected bit is durable beside the stale pending bit without the
fdatasync of the copy it stops (review8's power cut: the extent pending
and protected, holding pre-restore data, never copied again).
"""
from __future__ import annotations

import os
import threading
import time

from helpers import read_bitmap
from live import EXT, Async, Hold


def test_a_protected_request_after_full_due_does_not_go_out_alone(live, monkeypatch):
    """Held: the committer thread right after ``_full_due`` said
    "requests-only" (for a protected bit whose extent was never pending,
    so copy_durable).  Meanwhile a host write into extent i, which the job
    has just copied without write-back (its clear lazy, the source not
    fdatasync'ed), requests its protected bit (copy_durable False).  That
    bit must not be committed before the source's fdatasync."""
    live.pending_restore(paused=True)
    eng = live.engine
    fam = live.family("src")
    r = fam.restore
    src_fd = fam.source.fd
    synced = live.quiet_committer(monkeypatch)
    i = max(r.pending.iter_set())
    k = i + 8  # never pending: its protected bit may go alone
    assert k not in read_bitmap(live.state_dir, "src", "pending")
    live.job_copy(i, write_back=False)
    with fam.maps_lock:
        assert not fam.copy_durable(r, i) and fam.copy_durable(r, k)
    c = eng.committer
    real_full_due = c._full_due
    decided = threading.Event()
    go_on = threading.Event()
    checked = threading.Event()

    def full_due():
        if decided.is_set():
            checked.wait(10)  # no later commit until the state is read
            return real_full_due()
        full = real_full_due()
        if c._open.bits:
            decided.set()
            go_on.wait(10)  # (the maps lock is not held here)
        return full
    monkeypatch.setattr(c, "_full_due", full_due)
    first = Async(lambda: live.write("src", b"k" * 4096, k * EXT))
    assert decided.wait(10), "the committer never looked at the first request"
    second = Async(lambda: live.write("src", b"h" * 4096, i * EXT))
    key = (id(r.protected), i)
    deadline = time.monotonic() + 10
    while key not in c._requested and time.monotonic() < deadline:
        time.sleep(0.001)
    assert key in c._requested, "the second write never requested its protected bit"
    go_on.set()
    try:
        first.result(10)
        second.result(10)
        state = live.state_dir
        protected = read_bitmap(state, "src", "protected")
        pending = read_bitmap(state, "src", "pending")
    finally:
        checked.set()
    assert i in protected
    assert not (i in pending and src_fd not in synced), (
        f"extent {i}: protected and pending both durable and the source never "
        "fdatasync'ed since the job's copy: a power cut leaves pre-restore data there, "
        "never copied again")


# -- what the review found safe, kept as tests -------------------------------------

def test_a_copy_noted_while_a_full_commit_syncs_waits_for_the_next_one(live, monkeypatch):
    """Held: a full commit (epoch e) in its fdatasync of the source.  The
    job finishes a copy without write-back meanwhile: noted under epoch e,
    its fdatasync is the next commit's.  Once e is done (synced_epoch = e)
    the copy made before it counts as durable, this one does not, and a
    host write into it waits for the source's next fdatasync."""
    live.pending_restore(paused=True)
    fam = live.family("src")
    r = fam.restore
    src_fd = fam.source.fd
    synced = live.quiet_committer(monkeypatch)
    before, during = sorted(r.pending.iter_set())[-2:]
    live.job_copy(before, write_back=False)
    c = live.engine.committer
    hold = Hold(monkeypatch, os, "fdatasync", lambda fd: fd == src_fd)
    full = Async(live.commit)
    hold.wait_arrived()
    epoch = c.epoch
    live.job_copy(during, write_back=False)
    with fam.maps_lock:
        assert r.unsynced[during] == epoch and src_fd in c._sync_fds
    hold.release()
    full.result(10)
    assert c.synced_epoch == epoch
    with fam.maps_lock:
        assert fam.copy_durable(r, before)
        assert not fam.copy_durable(r, during), "a copy made during the fdatasync counted"
    del synced[:]
    live.write("src", b"h" * 4096, during * EXT)
    assert during in read_bitmap(live.state_dir, "src", "protected")
    assert src_fd in synced


def test_unprotected_fast_write_held_across_finish_and_another_restore_start(live, monkeypatch):
    """Held: a fast-path write of an unprotected restore (into a protected
    extent), after it wrote the source and before it writes the restoring
    clone c1.  The restore finishes under it (c1 synchronizing, its delta
    the protected map), then a restore from c2 starts, which fractures c1:
    the start waits for the held write (``switch_fast``'s generations), so
    c1 is fractured only once the write is in it, and its delta bit says
    it differs there."""
    from lunclone import policy
    from live import pattern
    from helpers import SMALL
    live.fractured_clone(data=pattern(b"C"))
    live.cmd("clone_create", source="src", name="c2")
    live.wait_clone("c2", "synchronized")
    live.cmd("clone_fracture", name="c2")
    live.write("src", pattern(b"S", 4 * EXT), 0)  # extents 0..3 differ from c1
    live.cmd("restore", source="src", clone_name="c1", protected=False, rate_limit="64K")
    live.cmd("restore_pause", source="src")
    fam = live.family("src")
    c1 = live.clone("c1")
    live.write("src", b"P" * 4096, 9 * EXT)  # protected, slow path
    assert fam.fast is not None and fam.fast[1] == [c1]
    c1_store = c1.volume.store
    real_pwrite = type(c1_store).pwrite
    arrived, release = threading.Event(), threading.Event()

    def held(self, buf, offset):
        if self is c1_store and bytes(buf[:4]) == b"HOLD":
            arrived.set()
            release.wait(60)
        return real_pwrite(self, buf, offset)
    monkeypatch.setattr(type(c1_store), "pwrite", held)
    w = Async(lambda: live.write("src", b"HOLD" * 1024, 9 * EXT))
    assert arrived.wait(10)
    live.cmd("restore_resume", source="src")
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: fam.restore is None, what="restore done")
    assert c1.state == policy.SYNCHRONIZING and c1.delta.test(9)
    start = live.cmd_in_thread("restore", source="src", clone_name="c2")
    time.sleep(0.5)
    try:
        assert not start.done(), "the restore start went on under a held fast write"
        assert c1.state != policy.FRACTURED
    finally:
        release.set()
    w.result(10)
    start.result(30)
    assert c1.state == policy.FRACTURED and c1.delta.test(9)
    assert live.file("c1")[9 * EXT:9 * EXT + 4096] == b"HOLD" * 1024
    assert len(live.file("c1")) == SMALL
