"""Review 10 (helper review of 8e1457a, mirrored writes on the fast path).

The bug: the intent sweep now switches ``fam.fast_writes`` too
(``switch_fast``), and while it waits for a fast-path write, that
write sits in a generation that is no longer current.  Everything else that
takes a clone out of the fast path still waits for ``switch_fast()``'s one
returned generation only (the current one): the sync command's and the
restore start's ``install``, ``SyncJob.run`` after a mirror failure,
``_fracture_failed``.  A fast-path write held up (a slow source or mirror)
while a sweep waits for it is then not waited for: the sync job copies its
extent before the write lands and clears the bit, the restore copies under
it.  The first three tests fail on 8e1457a and on bce9ad4 (intent chunks);
the last one holds an interleaving that is fine (it passes).  Extents A and
B lie in different intent chunks, so the tests mean the same with intents
per extent (8e1457a) and per chunk of 64 extents (bce9ad4).
"""
from __future__ import annotations

import asyncio
import errno
import threading
import time

from lunclone import policy
from lunclone import volume as vf
from lunclone.jobs import JobKey
from live import EXT, MiB, Async, Hold, pattern

SIZE = 16 * MiB
A, B = 3, 2 * 64 + 7  # two extents in different intent chunks (of 64 extents, bce9ad4)


def two_clones(live) -> None:
    """src with c1 fractured and c2 synchronized; extents A and B written
    after the fracture (c1's delta bits, c2's committed intent bits, not
    hot); no sweeper running.  A write into extent A takes the fast path,
    mirrored to c2."""
    live.on_loop(live.engine.clones.stop)
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a", SIZE), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    live.cmd("clone_fracture", name="c1")
    live.cmd("clone_create", source="src", name="c2")
    live.wait_clone("c2", "synchronized")
    for i in (A, B):
        live.write("src", b"b" * 4096, i * EXT)
    fam, c1, c2 = live.family("src"), live.clone("c1"), live.clone("c2")
    assert set(c1.delta.iter_set()) == {A, B} and c2.delta.test(A) and c2.delta.test(B)
    with fam.maps_lock:
        c2.hot = set()
    assert fam.fast is not None and fam.fast[1] == [c2]


def one_clone(live) -> None:
    """src mirrored to c1, intent bits of A and B committed and not hot."""
    live.on_loop(live.engine.clones.stop)
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a", SIZE), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    for i in (A, B):
        live.write("src", b"b" * 4096, i * EXT)
    fam, clone = live.family("src"), live.clone("c1")
    assert clone.delta.test(A) and clone.delta.test(B)
    with fam.maps_lock:
        clone.hot = set()
    assert fam.fast is not None and fam.fast[1] == [clone]


def sweep_in_thread(live, name: str) -> Async:
    """One intent sweep of clone ``name`` (as the sweeper runs it), in the
    background; returns once it has swapped ``hot`` and switched the
    fast-path generation (it then waits for the writes of the old one)."""
    fam, clone = live.family("src"), live.clone(name)
    with fam.maps_lock:
        before = clone.hot
    s = Async(lambda: asyncio.run_coroutine_threadsafe(
        live.engine.clones.sweep_intents(fam, clone), live.engine.loop).result(60))
    live.wait(lambda: clone.hot is not before, 5.0, "the sweep's first half")
    return s


def settle(pred, timeout: float) -> None:
    """Wait until ``pred()`` or ``timeout`` seconds, whichever comes first."""
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)


def held_write(monkeypatch, tag: bytes) -> Hold:
    """Hold the source write of a fast-path write whose data starts with ``tag``."""
    return Hold(monkeypatch, vf, "write_from", lambda fd, buf, off: bytes(buf[:4]) == tag)


def test_sync_command_waits_for_a_fast_write_a_sweep_waits_for(live, monkeypatch):
    """Held: a fast-path write into extent A (c1 fractured, its delta bit
    set; c2 synchronized, mirrored) before its source write.  The sweep of
    c2 (idle: B's chunk) has switched the fast-path generation and waits for it.
    Then 'clone sync c1': its install waits for ``switch_fast()``'s new,
    empty generation only, so c1's sync copies extent A (old data) and
    clears its bit before the write lands; the write is not mirrored to c1
    (it read the old rules): c1 ends synchronized, differing, bit clear."""
    two_clones(live)
    hold = held_write(monkeypatch, b"HOLD")
    w = Async(lambda: live.write("src", b"HOLD" * 1024, A * EXT))
    hold.wait_arrived()
    s = sweep_in_thread(live, "c2")
    sync = live.cmd_in_thread("clone_sync", name="c1")
    c1 = live.clone("c1")
    settle(lambda: c1.state == "synchronized", 1.0)  # 8e1457a: the sync runs meanwhile
    synced_early = c1.state == "synchronized"
    hold.release()
    w.result(5.0)
    sync.result(60.0)
    live.wait_clone("c1", "synchronized")
    s.result(30.0)
    src, c1_data = live.file("src"), live.file("c1")
    assert c1_data == src, (
        f"c1 synchronized (before the held write ended: {synced_early}) but differs from "
        f"src in extent A: {c1_data[A * EXT:A * EXT + 4]!r} != {src[A * EXT:A * EXT + 4]!r}; "
        f"its delta bit is {c1.delta.test(A)}")


def test_resync_after_a_mirror_failure_waits_for_a_fast_write_a_sweep_waits_for(
        live, monkeypatch):
    """Held: a fast-path write W1 into extent A before its source write; the
    sweep of c1 (idle: B's chunk) has switched the generation and waits for W1.  A
    fast-path write into B fails its mirror write: c1 resynchronizes, and
    ``SyncJob.run`` quiesces only the new generation, so the job copies
    extent A (old data) and clears its bit while W1 is in flight; c1 is
    synchronized again.  W1's mirror write then fails too: c1 resyncs with
    no bit set and ends synchronized, extent A differing from src.
    (Without the failure of W1's mirror write the same state is left by a
    crash between W1's source and mirror writes.)"""
    one_clone(live)
    hold = held_write(monkeypatch, b"HOLD")
    w1 = Async(lambda: live.write("src", b"HOLD" * 1024, A * EXT))
    hold.wait_arrived()
    s = sweep_in_thread(live, "c1")
    clone = live.clone("c1")
    store = clone.volume.store
    real = store.pwrite

    def failing(buf, offset):
        if offset in (A * EXT, B * EXT):
            raise OSError(errno.EIO, "injected: mirror write failed")
        real(buf, offset)
    store.pwrite = failing
    copies: list = []
    real_copy = policy.Family.copy_runs
    monkeypatch.setattr(policy.Family, "copy_runs",
                        lambda self, *a, **k: copies.append(a[2]) or real_copy(self, *a, **k))
    try:
        live.write("src", b"M" * 4096, B * EXT)  # fast path; its mirror write fails
        assert clone.state == "synchronizing"
        threading.Event().wait(0.5)
        copied_while_held = list(copies)
    finally:
        hold.release()
    w1.result(5.0)  # its mirror write fails: mirror_broken
    store.pwrite = real
    s.result(30.0)
    jobs = live.engine.jobs
    live.wait(lambda: clone.mirror_failures == 2 and clone.state == "synchronized"
              and not jobs.running(JobKey("sync", "c1")), 30.0, "c1 synchronized again")
    src, c1_data = live.file("src"), live.file("c1")
    assert c1_data == src, (
        f"c1 synchronized but differs from src in extent A: {c1_data[A * EXT:A * EXT + 4]!r}"
        f" != {src[A * EXT:A * EXT + 4]!r} (runs copied while the write was held: "
        f"{copied_while_held})")


def test_restore_start_waits_for_a_fast_write_a_sweep_waits_for(live, monkeypatch):
    """Held: a fast-path write into extent A (c1 fractured, c2 synchronized)
    before its source write; the sweep of c2 waits for it in a switched-out
    generation.  A protected restore of src from c1 starts: its install
    waits for ``switch_fast()``'s new generation only, so it commits its
    start (pending = c1's delta, A and B) with the write still in flight,
    copies extent A and may finish before the write lands.  The write then
    lands on src unprotected: c1's delta map after the restore (= the
    protected map) says extent A is the same while it differs (or, had the
    write landed before the copy, the copy would undo an acknowledged
    write)."""
    two_clones(live)
    hold = held_write(monkeypatch, b"HOLD")
    w = Async(lambda: live.write("src", b"HOLD" * 1024, A * EXT))
    hold.wait_arrived()
    s = sweep_in_thread(live, "c2")
    start = live.cmd_in_thread("restore", source="src", clone_name="c1")
    fam = live.family("src")
    settle(lambda: start.done() and fam.restore is None, 1.0)  # 8e1457a: it runs meanwhile
    started_early = start.done()
    hold.release()
    w.result(5.0)
    start.result(60.0)
    s.result(30.0)
    live.wait(lambda: fam.restore is None, 30.0, "the restore done")
    c1 = live.clone("c1")
    src, c1_data = live.file("src"), live.file("c1")
    assert c1.delta.test(A) or src[A * EXT:(A + 1) * EXT] == c1_data[A * EXT:(A + 1) * EXT], (
        f"after the restore (started before the held write ended: {started_early}) extent A "
        f"differs between src ({src[A * EXT:A * EXT + 4]!r}) and c1 "
        f"({c1_data[A * EXT:A * EXT + 4]!r}) with c1's delta bit clear")


def test_sweep_waits_for_a_write_that_added_to_the_swapped_out_hot(live, monkeypatch):
    """Fine on 8e1457a (passes): a fast-path writer that read ``clone.hot``
    just before the sweep swapped it adds its extent to the old set, so the
    sweep finds extent A idle.  Held: the writer between reading ``hot`` and
    adding to it (as a thread switch there would), until the sweep has
    swapped; then held before its source write.  The sweep's generation
    switch comes after the writer entered the barrier, so the sweep waits
    for it before clearing bit A (which it then may: both volumes hold the
    data)."""
    one_clone(live)
    fam, clone = live.family("src"), live.clone("c1")
    n = clone.delta.count()  # all idle: the sweep clears them all
    swapped, reached = threading.Event(), threading.Event()

    class LateAdd(set):
        def add(self, i):
            if i == A and threading.current_thread() is not threading.main_thread():
                reached.set()
                swapped.wait(10)
            set.add(self, i)
    with fam.maps_lock:
        clone.hot = LateAdd()
    hold = held_write(monkeypatch, b"HOLD")
    w = Async(lambda: live.write("src", b"HOLD" * 1024, A * EXT))
    assert reached.wait(5)
    s = sweep_in_thread(live, "c1")  # idle: both (A is not in hot yet)
    swapped.set()
    hold.wait_arrived()
    s.thread.join(0.5)
    try:
        assert not s.done(), "the sweep went on while a fast-path write was in flight"
        assert clone.delta.test(A), "the intent of a write in flight was cleared"
    finally:
        hold.release()
    w.result(5.0)
    assert s.result(30.0) == n
    live.commit()
    assert live.file("c1") == live.file("src")
