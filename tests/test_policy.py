"""The rules of ``policy.Family`` during a restore, shown on the real engine
in this process (real files, real SQLite, real committer; tests/live.py),
with host requests made from threads as nbdkit's workers make them.

The restore is started and paused through the command table, so the maps
stand still unless a test moves them: a background copy is made by hand
with the job's own steps (``take_runs``, ``copy_extents``, ``finish_runs``).

The volume has a ragged end: its last extent is 12 KiB.  The clone holds
``C`` everywhere, the source ``S`` (every extent differs: all pending).
The rules are in docs/DESIGN.md ("A host request", "Restore"), which also
maps these tests to the claims.
"""
from __future__ import annotations

import threading
import time

import pytest

from lunclone import faults
from helpers import EXT, read_bitmap
from live import Async

TAIL = 12 * 1024
NEXT = 9                      # extents: 8 whole ones and the 12 KiB tail
SIZE = (NEXT - 1) * EXT + TAIL
LAST = NEXT - 1


def start_paused_restore(live, protected: bool = True) -> None:
    """Clone ``c1`` of ``src`` holds C, ``src`` holds S; a restore from c1
    is started and paused at once (at 64 KiB/s its job copies at most one
    extent, the first, before it sees the pause)."""
    live.fractured_clone(size=SIZE, data=b"C" * SIZE)
    live.write("src", b"S" * SIZE, 0)
    live.cmd("restore", source="src", clone_name="c1", protected=protected, rate_limit="64K")
    live.cmd("restore_pause", source="src")
    # A copy taken just before the pause ends after it: the maps move until then.
    live.wait(lambda: not live.family("src").guard.copying(), what="the job's last copy")


@pytest.fixture
def restoring(live):
    start_paused_restore(live)
    return live


def maps(live) -> tuple[set[int], set[int], int]:
    """(pending extents, protected extents, copies on demand) of src's restore."""
    r = live.family("src").restore
    return set(r.pending.iter_set()), set(r.protected.iter_set()), r.on_demand


def restore_state(live) -> str | None:
    return (live.cmd("status", name="src")["restore"] or {}).get("state")


def clone_file_untouched(live) -> bool:
    return live.file("c1") == b"C" * SIZE


class HeldWrite:
    """A host write held after its map bits are committed, before its data
    is written (fault point ``write.bits_committed``): it is registered as
    a writer of its extents for as long as it is held."""

    def __init__(self, live, data: bytes, offset: int):
        self.arrived, self.go = threading.Event(), threading.Event()
        first = [True]

        def hold():
            if first[0]:
                first[0] = False
                self.arrived.set()
                self.go.wait(30)
        faults.arm("write.bits_committed", hold)
        self.write = Async(lambda: live.write("src", data, offset))
        assert self.arrived.wait(10), "the write never reached its data"

    def release(self) -> None:
        self.go.set()
        self.write.result()
        faults.disarm("write.bits_committed")


# -- reads -------------------------------------------------------------------

def test_read_of_a_pending_extent_reads_the_clone_and_copies_nothing(restoring):
    """A read changes no map: it takes a pending extent's data from the
    clone, and the job copies the extent later."""
    live = restoring
    pending, _, on_demand = maps(live)
    assert 3 in pending
    assert live.read("src", 3 * EXT + 100, 4096) == b"C" * 4096
    assert maps(live) == (pending, set(), on_demand)  # nothing copied, nothing cleared
    assert live.file("src")[3 * EXT:4 * EXT] == b"S" * EXT  # the source file is not written
    assert clone_file_untouched(live)


def test_read_across_extents_takes_each_from_where_its_data_lies(restoring):
    """Extents 3, 4, 5: 4 copied already (from the source), 3 and 5 pending
    (from the clone), 4 written by the host since (protected)."""
    live = restoring
    assert take(live, 4, 1) == (4, 1)
    copy_and_finish(live, 4, 1)
    live.write("src", b"h" * 100, 4 * EXT + 50)
    got = live.read("src", 4 * EXT - 10, EXT + 20)
    assert got == b"C" * 10 + b"C" * 50 + b"h" * 100 + b"C" * (EXT - 150) + b"C" * 10
    pending, protected, _ = maps(live)
    assert {3, 5} <= pending and 4 in protected and 4 not in pending


# -- writes ------------------------------------------------------------------

def test_partial_write_to_a_pending_extent_copies_then_protects(restoring):
    live = restoring
    on_demand = maps(live)[2]
    live.write("src", b"w" * 100, 3 * EXT + 10)
    pending, protected, n = maps(live)
    assert 3 in protected and 3 not in pending and n == on_demand + 1
    got = live.read("src", 3 * EXT, EXT)
    assert got == b"C" * 10 + b"w" * 100 + b"C" * (EXT - 110)
    assert clone_file_untouched(live), "a protected restore wrote to its clone"


def test_whole_extent_write_to_a_pending_extent_copies_nothing(restoring):
    live = restoring
    on_demand = maps(live)[2]
    live.write("src", b"W" * EXT, 7 * EXT)
    _, protected, n = maps(live)
    assert 7 in protected and n == on_demand
    assert live.read("src", 7 * EXT, EXT) == b"W" * EXT
    assert clone_file_untouched(live)


def test_write_straddling_two_pending_extents_copies_both(restoring):
    live = restoring
    on_demand = maps(live)[2]
    live.write("src", b"x" * 200, 5 * EXT - 100)
    pending, protected, n = maps(live)
    assert {4, 5} <= protected and not {4, 5} & pending and n == on_demand + 2
    assert live.read("src", 4 * EXT, 2 * EXT) == (
        b"C" * (EXT - 100) + b"x" * 200 + b"C" * (EXT - 100))


def test_write_covering_one_extent_whole_copies_only_the_partial_one(restoring):
    live = restoring
    on_demand = maps(live)[2]
    live.write("src", b"y" * (EXT + 512), 2 * EXT)  # extent 2 whole, 3 in part
    _, protected, n = maps(live)
    assert {2, 3} <= protected and n == on_demand + 1
    assert live.read("src", 3 * EXT, EXT) == b"y" * 512 + b"C" * (EXT - 512)


def test_write_of_the_ragged_tail_covers_the_last_extent_whole(restoring):
    """The last extent ends at the volume's end: 12 KiB cover it whole."""
    live = restoring
    on_demand = maps(live)[2]
    live.write("src", b"t" * TAIL, LAST * EXT)
    _, protected, n = maps(live)
    assert LAST in protected and n == on_demand
    assert live.read("src", LAST * EXT, TAIL) == b"t" * TAIL


def test_write_into_the_ragged_tail_in_part_copies_it(restoring):
    live = restoring
    on_demand = maps(live)[2]
    live.write("src", b"p" * 512, SIZE - 1024)
    _, protected, n = maps(live)
    assert LAST in protected and n == on_demand + 1
    assert live.read("src", LAST * EXT, TAIL) == b"C" * (TAIL - 1024) + b"p" * 512 + b"C" * 512


def test_protected_map_is_the_extents_the_host_wrote_and_is_persisted(restoring):
    live = restoring
    for off, n in ((2 * EXT + 5, 10), (6 * EXT, EXT), (SIZE - 4096, 4096)):
        live.write("src", b"h" * n, off)
    live.commit()
    assert maps(live)[1] == {2, 6, LAST}
    assert read_bitmap(live.state_dir, "src", "protected") == {2, 6, LAST}


def test_a_protected_extent_keeps_the_hosts_data_to_the_end(restoring):
    """The job never copies the clone's data over what the host wrote."""
    live = restoring
    live.write("src", b"K" * 4096, 6 * EXT + 4096)
    live.write("src", b"L" * EXT, 7 * EXT)
    live.cmd("restore_rate", source="src", limit="0")
    live.cmd("restore_resume", source="src")
    live.wait(lambda: restore_state(live) == "done", what="restore done")
    expect = bytearray(b"C" * SIZE)
    expect[6 * EXT + 4096:6 * EXT + 8192] = b"K" * 4096
    expect[7 * EXT:8 * EXT] = b"L" * EXT
    assert live.whole("src") == bytes(expect)
    assert clone_file_untouched(live)


# -- host requests and copies in flight ----------------------------------------

def take(live, first: int, limit: int):
    """The job's first step: take a run of pending, copyable extents."""
    fam = live.family("src")
    with fam.maps_lock:
        runs = fam.take_runs(fam.restore.pending, first, limit, fam.restore.protected)
        return runs[0] if runs else None


def copy_and_finish(live, first: int, n: int, copied: bool = True) -> None:
    """The job's next steps: copy the run clone->source, then clear its bits
    (or, if the copy failed, only release the extents)."""
    fam = live.family("src")
    r = fam.restore
    if copied:
        fam.copy_extents(r.data_source, fam.source.store, first, n)
    with fam.maps_lock:
        fam.finish_runs(r.pending, [(first, n)], fam.source.store, copied=copied,
                        src=r.data_source)


def test_request_on_an_extent_being_copied_waits_for_the_copy(restoring):
    live = restoring
    on_demand = maps(live)[2]
    assert take(live, 3, 1) == (3, 1)
    read = Async(lambda: live.read("src", 3 * EXT + 100, 4096))
    write = Async(lambda: live.write("src", b"v" * 100, 3 * EXT + 8192))
    time.sleep(0.3)
    assert not read.done() and not write.done(), "a request passed a copy in flight"
    copy_and_finish(live, 3, 1)
    assert read.result() == b"C" * 4096
    write.result()
    assert maps(live)[2] == on_demand, "the request copied the extent again"
    assert live.read("src", 3 * EXT + 8192, 100) == b"v" * 100  # the write landed after


def test_a_failed_copy_leaves_its_extent_pending_and_releases_it(restoring):
    live = restoring
    assert take(live, 4, 1) == (4, 1)
    read = Async(lambda: live.read("src", 4 * EXT, 4096))
    time.sleep(0.2)
    assert not read.done()
    copy_and_finish(live, 4, 1, copied=False)
    assert read.result() == b"C" * 4096  # the read took it from the clone itself
    assert 4 in maps(live)[0]


def test_copy_skips_an_extent_being_written(restoring):
    """A whole-extent write into a pending extent copies nothing and is in
    progress: the job takes the extents after it, not it."""
    live = restoring
    held = HeldWrite(live, b"N" * EXT, 5 * EXT)
    try:
        run = take(live, 5, 4)
        assert run is not None and run[0] == 6, run
        copy_and_finish(live, *run, copied=False)
    finally:
        held.release()
    assert live.read("src", 5 * EXT, EXT) == b"N" * EXT
    assert 5 in maps(live)[1]


def test_requests_wait_for_a_whole_extent_write_into_a_pending_extent(restoring):
    """Until that write has landed, the extent holds neither the clone's
    data nor the new data: a read of it waits."""
    live = restoring
    held = HeldWrite(live, b"N" * EXT, 5 * EXT)
    read = Async(lambda: live.read("src", 5 * EXT + 4096, 4096))
    time.sleep(0.3)
    assert not read.done(), "a read passed a whole-extent write into a pending extent"
    held.release()
    assert read.result() == b"N" * 4096


def test_protected_extents_are_dropped_from_the_run_not_copied(restoring):
    live = restoring
    live.write("src", b"P" * EXT, 6 * EXT)
    run = take(live, 6, 1)
    assert run == (7, 1)
    assert 6 not in maps(live)[0]  # cleared from pending on the way
    copy_and_finish(live, *run)
    assert live.read("src", 6 * EXT, EXT) == b"P" * EXT


# -- unprotected restore ---------------------------------------------------------

def test_unprotected_restore_mirrors_host_writes_to_the_clone(live):
    start_paused_restore(live, protected=False)
    live.write("src", b"m" * 100, 3 * EXT + 10)  # partial: copied on demand, then mirrored
    live.write("src", b"M" * EXT, 6 * EXT)
    clone = live.file("c1")
    assert clone[3 * EXT + 10:3 * EXT + 110] == b"m" * 100
    assert clone[6 * EXT:7 * EXT] == b"M" * EXT
    assert live.read("src", 3 * EXT, EXT) == clone[3 * EXT:4 * EXT]


# -- block status ------------------------------------------------------------------

def test_block_status_during_a_restore_answers_for_what_a_read_returns(live):
    """Holes on the source where the clone has data: pending extents are
    data while the restore runs (a backup tool skipping holes would miss
    the clone's data)."""
    live.fractured_clone(size=SIZE, data=b"C" * SIZE)
    live.volume("src").trim(2 * EXT, 2 * EXT, False)
    before = live.volume("src").extents(2 * EXT, 2 * EXT, False)
    if not any(hole for _, _, hole in before):
        pytest.skip("this filesystem reports no holes")
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
    live.cmd("restore_pause", source="src")
    runs = live.volume("src").extents(2 * EXT, 2 * EXT, False)
    assert not any(hole for _, _, hole in runs), runs
    assert sum(n for _, n, _ in runs) == 2 * EXT
    assert live.read("src", 2 * EXT, 2 * EXT) == b"C" * 2 * EXT


def test_take_runs_groups_scattered_extents_in_one_scan_and_ends_them_together(restoring):
    """The job's step for local files: several runs at once, skipping
    protected extents (cleared on the way) and extents in flight, up to
    ``limit`` extents and ``max_runs`` runs; they share one in-flight event,
    so a request on any of them waits until ``finish_runs`` ends them all."""
    live = restoring
    fam = live.family("src")
    r = fam.restore
    live.write("src", b"P" * EXT, 2 * EXT)  # protected: needs no copy
    assert take(live, 4, 1) == (4, 1)       # in flight already
    with fam.maps_lock:  # (from extent 1: the job may have copied extent 0)
        assert fam.take_runs(r.pending, 1, 5, r.protected, max_runs=2) == [(1, 1), (3, 1)]
        fam.finish_runs(r.pending, [(1, 1), (3, 1)], fam.source.store, copied=False)
        runs = fam.take_runs(r.pending, 1, 5, r.protected, max_runs=3)
        assert runs == [(1, 1), (3, 1), (5, 3)], runs
        assert 2 not in set(r.pending.iter_set())
        ev = fam.guard.copy_blocking(1, False)
        assert all(fam.guard.copy_blocking(i, False) is ev for i in (3, 5, 6, 7))
    read = Async(lambda: live.read("src", 6 * EXT, 4096))
    time.sleep(0.2)
    assert not read.done(), "a read passed an extent in flight"
    copied = fam.copy_runs(r.data_source, fam.source.store, runs)
    assert copied == 5 * EXT
    with fam.maps_lock:
        fam.finish_runs(r.pending, runs, fam.source.store, copied=True, src=r.data_source)
    assert read.result() == b"C" * 4096
    assert maps(live)[0] - {0} == {4, 8}
    data = live.file("src")
    assert data[EXT:2 * EXT] == data[3 * EXT:4 * EXT] == b"C" * EXT
    assert data[5 * EXT:8 * EXT] == b"C" * 3 * EXT
    copy_and_finish(live, 4, 1)
