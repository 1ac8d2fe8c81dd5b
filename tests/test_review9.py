"""Review of 11a734b: two local copies in flight, one event per batch,
take_runs in one scan, start_writeback after each run."""
from __future__ import annotations

import os
import time

from lunclone import jobs, policy
from lunclone import volume as vf
from live import EXT, SMALL, Async, Hold, pattern

SIZE = SMALL  # (``live.fractured_clone``'s size)
NEXT = SIZE // EXT


def test_write_spanning_two_batches_in_flight_waits_for_both(live, monkeypatch):
    """Unthrottled local restore: two copies in flight (extents 0-3 and
    4-7).  A partial write on extents 3..4 must wait for both, reads of
    the second batch wait for it alone; then data is right."""
    monkeypatch.setattr(jobs, "RUN_EXTENTS", 4)
    clone_data = pattern(b"clone-")
    live.fractured_clone(data=clone_data)
    live.write("src", pattern(b"old-", 16 * EXT), 0)
    src_path = live.engine.volumes.path("src")

    def copy_to_src_at(offset):
        return lambda s, d, off, n: getattr(d, "path", None) == src_path and off == offset
    first = Hold(monkeypatch, policy, "copy_range", copy_to_src_at(0))
    second = Hold(monkeypatch, policy, "copy_range", copy_to_src_at(4 * EXT))
    live.cmd("restore", source="src", clone_name="c1")
    first.wait_arrived()
    second.wait_arrived()
    g = live.family("src").guard
    assert g.inflight.get(0) is g.inflight.get(3) and g.inflight.get(4) is g.inflight.get(7)
    assert g.inflight.get(3) is not g.inflight.get(4)
    w = Async(lambda: live.write("src", b"W" * EXT, 3 * EXT + EXT // 2))
    r = Async(lambda: live.read("src", 5 * EXT, 4096))
    time.sleep(0.2)
    assert not w.done() and not r.done()
    second.release()
    assert r.result(10) == clone_data[5 * EXT:5 * EXT + 4096]
    time.sleep(0.2)
    assert not w.done(), "the write passed extent 3 still in flight"
    first.release()
    w.result(10)
    live.wait(lambda: live.family("src").restore is None, 20, "restore done")
    expect = bytearray(clone_data)
    expect[3 * EXT + EXT // 2:4 * EXT + EXT // 2] = b"W" * EXT
    assert live.whole("src") == bytes(expect)
    assert not g.inflight


def test_clone_delete_waits_for_both_copies_before_closing(live, monkeypatch):
    """Sync job, two local copies in flight into c1; clone delete must not
    close c1's fd (its number may be reused) before both copies, and their
    sync_file_range, returned."""
    monkeypatch.setattr(jobs, "RUN_EXTENTS", 4)
    live.cmd("create", name="src", size=SIZE)
    live.write("src", pattern(b"a"), 0)
    c1_path = os.path.join(os.path.dirname(live.engine.volumes.path("src")), "c1")
    seen: list[tuple[int, str]] = []
    real_wb = vf.start_writeback

    def spy(fd, off, n):
        try:
            seen.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError as e:
            seen.append((fd, f"error {e}"))
        return real_wb(fd, off, n)
    monkeypatch.setattr(vf, "start_writeback", spy)

    src_path = live.engine.volumes.path("src")

    def to_c1_at(offset):
        return lambda s, d, off, n: getattr(s, "path", None) == src_path and off == offset
    first = Hold(monkeypatch, policy, "copy_range", to_c1_at(0), before=False)
    second = Hold(monkeypatch, policy, "copy_range", to_c1_at(4 * EXT), before=False)
    live.cmd("clone_create", source="src", name="c1")
    first.wait_arrived()
    second.wait_arrived()
    g = live.family("src").guard
    c1_path = live.engine.volumes.path("c1")
    d = live.cmd_in_thread("clone_delete", name="c1")
    time.sleep(0.3)
    assert not d.done(), "the delete ended under copies in flight"
    second.release()
    time.sleep(0.1)
    first.release()
    d.result(20)
    wb = [p for fd, p in seen]
    assert wb, "no write-back started"
    assert all(p == os.path.realpath(c1_path) for p in wb), wb
    assert not g.inflight


def test_failed_run_in_a_batch_clears_nothing_and_releases_all(live, monkeypatch):
    """Scattered pending extents 0,2,4,6 go in one copy; the copy of run 4
    fails: no bit of the batch is cleared (not even 0 and 2, copied), all
    are released (a read on 0 goes on), and the retry finishes the restore."""
    import threading
    clone_data = pattern(b"clone-")
    live.fractured_clone(data=clone_data)
    for i in (0, 2, 4, 6):
        live.write("src", b"o" * EXT, i * EXT)
    src_path = live.engine.volumes.path("src")
    real = policy.copy_range
    arrived, go = threading.Event(), threading.Event()
    state = {"armed": True}

    def failing(s, d, off, n):
        if state["armed"] and getattr(d, "path", None) == src_path and off == 4 * EXT:
            state["armed"] = False
            arrived.set()
            go.wait(30)
            raise OSError(5, "injected copy failure")
        return real(s, d, off, n)
    monkeypatch.setattr(policy, "copy_range", failing)
    live.cmd("restore", source="src", clone_name="c1")
    assert arrived.wait(10)
    fam = live.family("src")
    g, r = fam.guard, fam.restore
    assert g.inflight.get(0) is g.inflight.get(6) is not None
    rd = Async(lambda: live.read("src", 0, 4096))
    time.sleep(0.2)
    assert not rd.done()
    go.set()
    assert rd.result(10) == clone_data[:4096]
    with fam.maps_lock:
        left = set(r.pending.iter_set())
        inflight = dict(g.inflight)
    assert {0, 2, 4, 6} <= left, left  # within the backoff: nothing cleared
    assert not inflight
    live.wait(lambda: live.family("src").restore is None, 20, "restore done")
    assert live.whole("src") == clone_data


def test_copy_on_demand_beside_two_batches_in_flight(live, monkeypatch):
    """Two job batches in flight (0-3, 4-7): a partial write on extent 12
    copies on demand at once; a partial write over 7..8 waits for the
    second batch, then copies 8 (or waits for the job's next batch); the
    restore finishes with the right data and nothing in flight."""
    monkeypatch.setattr(jobs, "RUN_EXTENTS", 4)
    clone_data = pattern(b"clone-")
    live.fractured_clone(data=clone_data)
    live.write("src", pattern(b"old-", 16 * EXT), 0)
    src_path = live.engine.volumes.path("src")
    c1_path = live.engine.volumes.path("c1")

    def job_copy_at(offset):
        return lambda s, d, off, n: (getattr(d, "path", None) == src_path and off == offset
                                     and n > EXT)
    first = Hold(monkeypatch, policy, "copy_range", job_copy_at(0))
    second = Hold(monkeypatch, policy, "copy_range", job_copy_at(4 * EXT))
    live.cmd("restore", source="src", clone_name="c1")
    first.wait_arrived()
    second.wait_arrived()
    fam = live.family("src")
    g = fam.guard
    live.write("src", b"D" * 4096, 12 * EXT + 4096)  # on demand, not blocked
    w = Async(lambda: live.write("src", b"E" * 8192, 8 * EXT - 4096))
    time.sleep(0.2)
    assert not w.done()
    second.release()
    w.result(10)
    first.release()
    live.wait(lambda: live.family("src").restore is None, 20, "restore done")
    expect = bytearray(clone_data)
    expect[12 * EXT + 4096:12 * EXT + 8192] = b"D" * 4096
    expect[8 * EXT - 4096:8 * EXT + 4096] = b"E" * 8192
    assert live.whole("src") == bytes(expect)
    assert not g.inflight
    assert os.path.exists(c1_path)


def test_restore_start_stops_sync_with_two_local_copies_in_flight(live, monkeypatch):
    """LOCAL_WINDOW as merged (no window patch): a restore start from c2
    stops c1's sync with two copies in flight; the start waits for both,
    bits of those copies are not cleared (job no longer counts), requests
    go on and the restore finishes."""
    monkeypatch.setattr(jobs, "RUN_EXTENTS", 4)
    assert jobs.LOCAL_WINDOW == 2
    live.fractured_clone(clone="c2", data=pattern(b"a"))
    live.write("src", pattern(b"b", 16 * EXT), 0)
    src_path = live.engine.volumes.path("src")
    c2_path = live.engine.volumes.path("c2")

    def sync_copy_at(offset):
        return lambda s, d, off, n: (getattr(s, "path", None) == src_path
                                     and getattr(d, "path", None) != c2_path and off == offset)
    first = Hold(monkeypatch, policy, "copy_range", sync_copy_at(0))
    second = Hold(monkeypatch, policy, "copy_range", sync_copy_at(4 * EXT))
    live.cmd("clone_create", source="src", name="c1")
    first.wait_arrived()
    second.wait_arrived()
    rs = live.cmd_in_thread("restore", source="src", clone_name="c2")
    time.sleep(0.3)
    assert not rs.done(), "the restore started under copies into c1 in flight"
    second.release()
    time.sleep(0.2)
    assert not rs.done()
    first.release()
    rs.result()
    c1 = live.clone("c1")
    assert c1.state == "fractured"
    assert {0, 4} <= set(c1.delta.iter_set())
    assert live.read("src", 0, SIZE) == pattern(b"a")
    live.wait(lambda: live.family("src").restore is None, 20, "restore done")
    assert not live.family("src").guard.inflight
