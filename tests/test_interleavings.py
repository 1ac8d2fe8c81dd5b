"""Requests held at a chosen point while jobs and admin commands move.

Each test reproduces one way the engine could lose data, modify a clone,
report zeroes or hang, against the real engine in this process (real
files, SQLite, committer and jobs; ``live.LiveEngine``), and checks what
must hold instead.  ``live.Hold`` holds a real call (a write, a copy) at
the point the test chooses; ``faults`` fails a real call.
"""
from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time

import pytest

from lunclone import faults, jobs, policy
from lunclone import volume as vf
from lunclone.errors import LuncloneError
from helpers import read_bitmap
from live import EXT, MiB, Async, Hold

SIZE = 4 * MiB
NEXT = SIZE // EXT


def pattern(tag: bytes, n: int = SIZE) -> bytes:
    return (tag * (n // len(tag) + 1))[:n]


def delta_in_db(live, clone: str) -> set[int]:
    live.commit()
    return read_bitmap(live.state_dir, clone, "delta")


def test_fracture_leaves_no_stale_intent_bits(live):
    """A write just before a fracture leaves a write-intent bit; the
    fracture clears it (both copies equal), so the delta map is exact."""
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a"), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    live.write("src", b"x" * 4096, 3 * EXT)  # mirrored, intent bit 3 set
    live.cmd("clone_fracture", name="c1")
    assert live.clone("c1").delta.count() == 0
    assert delta_in_db(live, "c1") == set()
    live.write("src", b"y" * 4096, 5 * EXT)  # after the fracture: a real difference
    assert set(live.clone("c1").delta.iter_set()) == {5}


def test_fast_path_write_in_flight_across_clone_sync(live, monkeypatch):
    """A write that passed the fractured fast path is still running when
    'clone sync' switches the rules: the sync must not copy (and clear)
    that extent before the write has landed."""
    live.fractured_clone(data=pattern(b"a"))
    live.write("src", b"b" * EXT, 0)  # delta bit 0 committed: the fast path is on
    assert live.family("src").fast is not None
    hold = Hold(monkeypatch, vf, "write_from", lambda fd, buf, off: bytes(buf[:4]) == b"HOLD")
    w1 = Async(lambda: live.write("src", b"HOLD" * (EXT // 4), 0))
    hold.wait_arrived()
    sync = live.cmd_in_thread("clone_sync", name="c1")
    import time
    time.sleep(0.1)
    live.write("src", b"c" * 4096, 9 * EXT)  # a write that begins and ends meanwhile
    time.sleep(0.5)
    synced_early = live.clone("c1").state == "synchronized"
    hold.release()
    w1.result()
    sync.result()
    live.wait_clone("c1", "synchronized")
    assert not synced_early, "the clone was synchronized while a source write was in flight"
    assert live.file("c1") == live.file("src")


def test_new_clone_bit_set_before_its_map_is_registered_is_saved(live, monkeypatch):
    """A host write between 'the new clone is in the family' and the create
    transaction: its delta bit must reach the database."""
    live.cmd("create", name="src", size=SIZE)  # all holes: the initial delta is empty
    real = live.engine.clones._initial_delta

    def initial_delta_then_write(fam, store):
        differ = real(fam, store)
        live.write("src", b"w" * 4096, 7 * EXT)  # committed by the group commit
        return differ
    monkeypatch.setattr(live.engine.clones, "_initial_delta", initial_delta_then_write)
    hold = Hold(monkeypatch, policy, "copy_range", lambda src, dst, off, n: True)
    live.cmd("clone_create", source="src", name="c1")
    hold.wait_arrived()  # the sync job has not copied anything yet
    try:
        assert 7 in delta_in_db(live, "c1"), "the new clone's delta bit was never saved"
    finally:
        hold.release()
    live.wait_clone("c1", "synchronized")


def test_clone_sync_of_another_clone_refused_during_restore(live):
    live.restoring_beside_c2()
    with pytest.raises(LuncloneError, match="restore"):
        live.cmd("clone_sync", name="c2")
    assert live.clone("c2").state == "fractured"


def test_unprotected_restore_survives_a_mirror_failure(live):
    """A mirror write to the restoring clone fails: the restore goes on
    protected, the clone is never written with the source's old data, and
    the source ends with the clone's data plus the host's writes."""
    clone_data = pattern(b"clone-")
    live.fractured_clone(data=clone_data)
    live.write("src", pattern(b"old-", 32 * EXT), 0)  # 32 extents to restore
    live.cmd("restore", source="src", clone_name="c1", protected=False, rate_limit="64K")
    store = live.clone("c1").volume.store
    real_pwrite = store.pwrite

    def failing(buf, offset):
        raise OSError(errno.EIO, "injected mirror failure")
    store.pwrite = failing
    live.write("src", b"h" * EXT, 40 * EXT)  # not pending: protected and mirrored
    store.pwrite = real_pwrite
    model = bytearray(clone_data)
    model[40 * EXT:41 * EXT] = b"h" * EXT
    import time
    time.sleep(0.3)
    assert live.file("c1")[:32 * EXT] == clone_data[:32 * EXT], \
        "the clone's data was overwritten by the source's pre-restore data"
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: live.family("src").restore is None, what="restore done")
    assert live.whole("src") == bytes(model)
    live.wait_clone("c1", "synchronized")
    assert live.file("c1") == bytes(model)


def test_cancelled_copies_release_their_extents(live, monkeypatch):
    """Copies in flight when their job stops (here: a restore from another
    clone fractures the synchronizing one while two runs are in flight; the
    start waits for them) release their extents: host requests on them go
    on and the restore finishes."""
    monkeypatch.setattr(jobs.CopyJob, "window", lambda self: 8)  # as to a remote clone
    monkeypatch.setattr(jobs, "RUN_EXTENTS", 4)
    live.fractured_clone(clone="c2", data=pattern(b"a"))
    live.write("src", pattern(b"b", 16 * EXT), 0)
    c1_path = live.engine.volumes.path("c1")

    def copy_to_c1_at(offset):
        return lambda src, dst, off, n: getattr(dst, "path", None) == c1_path and off == offset
    first = Hold(monkeypatch, policy, "copy_range", copy_to_c1_at(0))
    second = Hold(monkeypatch, policy, "copy_range", copy_to_c1_at(4 * EXT))
    live.cmd("clone_create", source="src", name="c1")
    first.wait_arrived()
    second.wait_arrived()
    # c1 becomes fractured: the start stops its job and waits for its copies.
    rs = live.cmd_in_thread("restore", source="src", clone_name="c2")
    second.release()
    import time
    time.sleep(0.2)
    first.release()
    rs.result()
    reader = Async(lambda: live.read("src", 0, SIZE))
    assert reader.result(10) == pattern(b"a")
    live.wait(lambda: live.family("src").restore is None, 20, "restore done")
    assert not live.family("src").guard.inflight


def test_admin_drain_does_not_block_the_copy_it_waits_for(live, monkeypatch):
    """A host write waits for an extent in flight; an admin command waits
    for that write.  The copy's end runs on the loop: the command must not
    block the loop while it waits."""
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a"), 0)
    hold = Hold(monkeypatch, policy, "copy_range", lambda src, dst, off, n: off == 0)
    live.cmd("clone_create", source="src", name="c1")
    hold.wait_arrived()  # extents from 0 are in flight
    writer = Async(lambda: live.write("src", b"w" * 4096, 100))
    import time
    time.sleep(0.2)
    creating = live.cmd_in_thread("clone_create", source="src", name="c2")
    time.sleep(0.2)
    hold.release()
    creating.result(15)
    writer.result(5)
    live.wait_clone("c1", "synchronized")
    live.wait_clone("c2", "synchronized")
    assert live.file("c1") == live.file("src") == live.file("c2")


def test_failed_delete_commit_changes_nothing(live):
    live.fractured_clone(data=pattern(b"a"))
    live.write("src", b"b" * EXT, 2 * EXT)

    def full():
        raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)
    with pytest.raises(LuncloneError):
        live.cmd("clone_delete", name="c1")
    faults.disarm()
    assert "c1" in live.family("src").clones and "c1" in live.engine.volumes.served
    assert live.clone("c1").delta.test(2)
    live.restart()
    assert "c1" in live.family("src").clones and live.clone("c1").delta.test(2)
    live.cmd("clone_delete", name="c1")
    assert "c1" not in live.engine.volumes.records


def test_failed_restore_finish_commit_changes_nothing(live):
    live.fractured_clone(data=pattern(b"a"))
    live.write("src", b"b" * EXT, 2 * EXT)
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
    armed = []

    def full():
        import traceback
        if any(f.name == "finish" and f.filename.endswith("restores.py") for f in traceback.extract_stack()):
            armed.append(1)
            raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: armed, what="a finish attempt")
    faults.disarm()
    import time
    time.sleep(0.2)
    fam = live.family("src")
    if fam.restore is None:  # it finished on a later attempt: memory must match the DB
        assert live.engine.md.jobs()[0].state == "done"
    else:
        assert live.clone("c1").state == "restoring"
    live.wait(lambda: live.family("src").restore is None
              or live.family("src").restore.state == "paused", what="finish or pause")
    if live.family("src").restore is not None:
        live.cmd("restore_resume", source="src")
    live.wait(lambda: live.family("src").restore is None, what="restore done")
    assert live.whole("src") == pattern(b"a")
    assert live.engine.md.jobs()[0].state == "done"


def test_block_status_answers_for_what_a_read_returns(live):
    """A pending extent that is a hole on the source but data on the clone
    is not reported as a hole (backup tools would copy zeroes)."""
    live.fractured_clone(data=pattern(b"a"))
    vol = live.volume("src")
    vol.trim(8 * EXT, 0, False)  # holes on the source, data on the clone
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
    for off, n, hole in vol.extents(SIZE, 0, False):
        if hole:
            assert live.read("src", off, n) == bytes(n), f"hole reported at {off}+{n} reads data"


def test_restore_waits_for_its_missing_clone(live):
    """A restore whose clone is missing at start-up: the source is not
    served (pre-restore data would show in pending extents), the others
    are; once the clone is back, 'restore resume' goes on."""
    live.fractured_clone(data=pattern(b"a"))
    live.cmd("create", name="other", size=SIZE)
    live.write("src", pattern(b"b", 8 * EXT), 0)
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
    put_back = live.restart_without("c1")
    assert "src" not in live.engine.volumes.served and "other" in live.engine.volumes.served
    err = live.cmd("status", name="src")["error"]
    assert "c1" in err and "restore resume" in err
    with pytest.raises(LuncloneError, match="c1"):
        live.engine.open_export("src", False)
    with pytest.raises(LuncloneError, match="c1"):
        live.cmd("restore_resume", source="src")
    put_back()
    live.cmd("restore_resume", source="src")
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: live.family("src").restore is None, what="restore done")
    assert live.whole("src") == pattern(b"a")


def test_zero_without_may_trim_stays_allocated(live):
    live.cmd("create", name="v", size=SIZE)
    live.write("v", pattern(b"d", 2 * EXT), 0)
    vol = live.volume("v")
    vol.zero(2 * EXT, 0, False, may_trim=False)
    assert live.read("v", 0, 2 * EXT) == bytes(2 * EXT)
    assert vol.extents(2 * EXT, 0, False) == [(0, 2 * EXT, False)], "zero punched a hole"
    vol.zero(2 * EXT, 0, False, may_trim=True)
    assert vol.extents(2 * EXT, 0, False) == [(0, 2 * EXT, True)]


def test_fast_zero_refuses_a_copy_on_demand(live):
    live.fractured_clone(data=pattern(b"a"))
    live.write("src", pattern(b"b", 8 * EXT), 0)
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
    vol = live.volume("src")
    with pytest.raises(OSError) as e:
        vol.zero(4096, 7 * EXT + 4096, False, may_trim=True, fast=True)  # partial pending extent
    assert e.value.errno == errno.ENOTSUP
    vol.zero(EXT, 6 * EXT, False, may_trim=True, fast=True)  # whole extent: no copy needed
    assert live.read("src", 6 * EXT, EXT) == bytes(EXT)
    assert live.read("src", 7 * EXT, EXT) == pattern(b"a")[7 * EXT:8 * EXT]


# Found by review of the first fixes (each failed on that code).
def test_fast_path_write_during_fracture_loses_delta_bit(live, monkeypatch):
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a"), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    live.write("src", b"x" * 4096, 3 * EXT)  # mirrored: intent bit 3 set
    assert live.clone("c1").delta.test(3)
    hold = Hold(monkeypatch, vf, "write_from", lambda fd, buf, off: bytes(buf[:4]) == b"HOLD")
    w1 = Async(lambda: live.write("src", b"HOLD" * 1024, 9 * EXT))  # old-gen mirrored write
    hold.wait_arrived()
    frac = live.cmd_in_thread("clone_fracture", name="c1")
    live.wait(lambda: live.clone("c1").state == "fractured", what="switch")
    live.write("src", b"z" * 4096, 3 * EXT)  # bit 3 set already: the fast path, if it were on
    hold.release()
    w1.result()
    frac.result()
    src, c1 = live.file("src"), live.file("c1")
    differs = src[3 * EXT:4 * EXT] != c1[3 * EXT:4 * EXT]
    assert not (differs and not live.clone("c1").delta.test(3)), \
        "extent 3 differs but its delta bit was cleared"


def test_clone_export_write_during_fracture_loses_delta_bit(live, monkeypatch):
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a"), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    hold = Hold(monkeypatch, vf, "write_from", lambda fd, buf, off: bytes(buf[:4]) == b"HOLD")
    w1 = Async(lambda: live.write("src", b"HOLD" * 1024, 9 * EXT))  # old-gen mirrored write
    hold.wait_arrived()
    frac = live.cmd_in_thread("clone_fracture", name="c1")
    live.wait(lambda: live.clone("c1").state == "fractured", what="switch")
    live.write("c1", b"q" * 4096, 5 * EXT)  # the clone's own export, bit 5 committed
    assert live.clone("c1").delta.test(5)
    hold.release()
    w1.result()
    frac.result()
    src, c1 = live.file("src"), live.file("c1")
    assert src[5 * EXT:6 * EXT] != c1[5 * EXT:6 * EXT]
    assert live.clone("c1").delta.test(5), "clone export write lost its delta bit"
    assert 5 in delta_in_db(live, "c1")


def test_source_flush_during_clone_delete(live, monkeypatch):
    """A host flush that reaches a synchronized clone's file is waited for
    by that clone's delete: no fdatasync of a closed (or reused) fd."""
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a"), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    cfd = live.volume("c1").fd
    hold = Hold(monkeypatch, os, "fdatasync",
                lambda fd: fd == cfd and threading.current_thread().name == "flusher")
    box = {}

    def flusher():
        try:
            live.volume("src").flush()
        except BaseException as e:
            box["e"] = e
    t = threading.Thread(target=flusher, name="flusher")
    t.start()
    hold.wait_arrived()
    deleting = live.cmd_in_thread("delete", name="c1")
    time.sleep(0.3)
    assert not deleting.done(), "the delete closed the clone under a flush of its mirror"
    hold.release()
    t.join(10)
    deleting.result()
    assert "e" not in box, f"host flush failed: {box.get('e')!r}"


def test_failed_restore_start_clobbers_other_clone_state(live, monkeypatch):
    import traceback
    live.fractured_clone(data=pattern(b"a"))
    live.write("src", b"b" * EXT, 0)
    copy_hold = Hold(monkeypatch, policy, "copy_range", lambda *a: True)
    live.cmd("clone_create", source="src", name="c2")
    copy_hold.wait_arrived()
    wr_hold = Hold(monkeypatch, vf, "write_from", lambda fd, buf, off: bytes(buf[:4]) == b"HOLD")
    w = Async(lambda: live.write("c1", b"HOLD" * 1024, 3 * EXT))
    wr_hold.wait_arrived()
    rs = live.cmd_in_thread("restore", source="src", clone_name="c1")
    # The start stops c2's sync first and waits for its copy in flight.
    live.wait(lambda: live.engine.jobs.get(jobs.JobKey("sync", "c2")) is None,
              what="c2's sync stopped by the start")
    copy_hold.release()
    live.wait(lambda: live.clone("c1").state == "restoring", what="gate")

    def full():
        if any("_commit_start" in f.name for f in traceback.extract_stack()):
            raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)
    wr_hold.release()
    w.result()
    with pytest.raises(LuncloneError):
        rs.result()
    faults.disarm()
    st = live.clone("c2").state
    running = live.engine.jobs.get(jobs.JobKey("sync", "c2"))
    assert st == "synchronized" or jobs.is_running(running), \
        f"c2 is {st} in memory with no sync job"
    live.wait_clone("c2", "synchronized")


def test_failed_source_write_does_not_let_the_sweep_clear_its_intent(live):
    """A source write that fails part-way (ENOSPC, EIO) skips its mirrors:
    the clone may differ there, so it resynchronizes instead of having the
    intent bit swept as if both copies were equal."""
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a"), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    store = live.volume("src").store
    real = store.pwrite

    def half_then_fail(buf, offset):
        real(memoryview(buf)[:len(buf) // 2], offset)
        raise OSError(errno.ENOSPC, "injected: no space after half the write")
    store.pwrite = half_then_fail
    with pytest.raises(OSError):
        live.write("src", b"n" * EXT, 4 * EXT)
    store.pwrite = real
    assert live.clone("c1").state == "synchronizing"
    live.wait_clone("c1", "synchronized")
    assert live.file("c1") == live.file("src")



def open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def test_clone_delete_closes_its_file(live):
    live.fractured_clone(data=pattern(b"a"))
    path = live.engine.volumes.path("c1")
    live.cmd("clone_delete", name="c1")
    assert not [p for p in open_files() if p.startswith(path)], "the deleted clone's file is open"


def test_failed_fracture_waits_for_writes_to_the_clone_before_resyncing(live, monkeypatch):
    """A fracture whose commit fails sends the clone back to synchronizing;
    a write to its own export accepted in the window lands before the sync
    copies that extent."""
    import traceback
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a"), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    src_hold = Hold(monkeypatch, vf, "write_from", lambda fd, buf, off: bytes(buf[:4]) == b"HOLD")
    clone_hold = Hold(monkeypatch, vf, "write_from", lambda fd, buf, off: bytes(buf[:4]) == b"CLON")
    w1 = Async(lambda: live.write("src", b"HOLD" * 1024, 9 * EXT))  # mirrored, old rules
    src_hold.wait_arrived()
    frac = live.cmd_in_thread("clone_fracture", name="c1")
    live.wait(lambda: live.clone("c1").state == "fractured", what="switch")
    w2 = Async(lambda: live.write("c1", b"CLON" * 1024, 5 * EXT))  # the clone's own export
    clone_hold.wait_arrived()

    def full():
        if any(f.name == "fracture" for f in traceback.extract_stack()):
            raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)
    src_hold.release()
    w1.result()
    time.sleep(0.3)  # the fracture failed; a resync now would copy under the held write
    faults.disarm()
    clone_hold.release()
    w2.result()
    with pytest.raises(LuncloneError):
        frac.result()
    live.wait_clone("c1", "synchronized")
    assert live.file("c1") == live.file("src")


def test_fault_points_pause_and_fail_where_named(live):
    """The named points are reached where their names say (a test may pause
    or fail there); one injected copy failure leaves its bits set and the
    sync finishes on a later pass."""
    reached = []
    for point in ("write.bits_committed", "copy.data_written", "commit.before_fdatasync",
                  "commit.after_fdatasync", "restore.gated", "restore.finish",
                  "clone.delete_committed"):
        faults.arm(point, lambda p=point: reached.append(p))
    live.fractured_clone(data=pattern(b"a"))
    live.write("src", b"b" * 4096, 0)
    live.cmd("restore", source="src", clone_name="c1")
    live.wait(lambda: live.family("src").restore is None, what="restore done")
    live.commit()
    live.cmd("clone_create", source="src", name="c2")
    live.wait_clone("c2", "synchronized")
    live.cmd("clone_delete", name="c2")
    assert set(reached) >= {"write.bits_committed", "copy.data_written",
                            "commit.before_fdatasync", "commit.after_fdatasync",
                            "restore.gated", "restore.finish", "clone.delete_committed"}
    faults.disarm()
    failed = []

    def fail_once():
        if not failed:
            failed.append(1)
            raise OSError(errno.EIO, "injected copy failure")
    faults.arm("copy.data_written", fail_once)
    live.cmd("clone_create", source="src", name="c3")
    live.wait_clone("c3", "synchronized")
    assert failed and live.file("c3") == live.file("src")


def test_first_clone_create_does_not_block_the_loop_behind_a_plain_write(live, monkeypatch):
    """A source with no clone writes on the plain path.  'clone create'
    makes its family the source's policy and must wait for plain writes in
    progress, but on the loop without blocking it: other admin commands
    and status are answered meanwhile."""
    import os
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a"), 0)
    src_fd = live.volume("src").fd
    hold = Hold(monkeypatch, os, "fdatasync", lambda fd: fd == src_fd)
    w = Async(lambda: live.write("src", b"w" * 4096, 3 * EXT, fua=True))  # plain path, FUA
    hold.wait_arrived()
    create = live.cmd_in_thread("clone_create", source="src", name="c1")
    try:
        st = live.cmd("status", _timeout=5, name="src")  # the loop must answer
        assert st["name"] == "src"
    finally:
        hold.release()
    w.result()
    create.result()
    live.wait_clone("c1", "synchronized")
    assert live.file("c1") == live.file("src")


def test_a_read_does_not_wait_for_a_neighbours_capture(live, monkeypatch):
    """A host write's capture takes the pending extents of its block along
    (``Family.capture``); held at the undo image's fdatasync, those
    neighbours are in flight for the capture only: nothing is copied into
    the source there, so a read of one takes the clone's data at once
    (without the lock, then across two extents under it) instead of
    waiting for someone else's fdatasync."""
    clone_data = live.pending_restore(keep_undo=True)
    fam = live.family("src")
    image_fd = fam.restore.undo_store.fd
    written = policy.CAPTURE_BLOCK * 2 - 1  # the job (64K/s) starts at 0
    neighbour = written - 5
    hold = Hold(monkeypatch, os, "fdatasync",  # the writer's capture, not the job's
                lambda fd: fd == image_fd and neighbour in fam.guard.inflight)
    locked_reads = []
    real_prepare = policy.Family._prepare_read

    def prepare_read(self, offset, length):
        locked_reads.append(offset)
        return real_prepare(self, offset, length)
    monkeypatch.setattr(policy.Family, "_prepare_read", prepare_read)
    writer = Async(lambda: live.write("src", b"w" * 4096, written * EXT + 512))
    hold.wait_arrived()
    try:
        for offset, length, locked in ((neighbour * EXT, 4096, []),
                                       ((neighbour - 1) * EXT, 2 * EXT, [(neighbour - 1) * EXT])):
            reader = Async(lambda o=offset, n=length: live.read("src", o, n))
            assert reader.result(2) == clone_data[offset:offset + length]
            assert locked_reads == locked
            locked_reads.clear()
    finally:
        hold.release()
    writer.result(10)
    assert live.read("src", written * EXT, EXT)[512:4608] == b"w" * 4096
