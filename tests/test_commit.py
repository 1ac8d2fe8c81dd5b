"""Group commit (``commit.Committer``), on a real SQLite database and real
files: the rules of docs/DESIGN.md, "Crash consistency".

- A bit a writer asks for is set in memory only once its commit is
  durable; writers who ask while a commit gathers share it (one commit).
- A bit is cleared lazily; the clear reaches the database with the next
  commit, and only after the volumes copied into were fdatasync'ed.
- A failed commit fails its waiters and keeps its pages for the next one.
- A failed fdatasync is never taken as harmless: the volume is marked
  failed and the maps are put back to what the database holds.

The committer thread is not started: each test calls ``commit_now`` at the
moment it chooses, as the thread would.  Durability is shown with LazyFS
(tests/lazyfs.py): after a power cut only what was fdatasync'ed is there.
"""
from __future__ import annotations

import errno
import os
import sqlite3
import threading

import pytest

from lunclone import faults
from lunclone.bitmap import Bitmap
from lunclone.errors import LuncloneError, NoSpace
from helpers import Maps


@pytest.fixture
def maps(tmp_path):
    m = Maps(str(tmp_path))
    yield m
    faults.disarm()
    m.close()


def writer(maps: Maps, bm: Bitmap, i: int, asked: threading.Event, box: dict) -> threading.Thread:
    """A host write's bit request, as ``policy.Family`` makes it: ask under
    the lock, then wait for the commit without it."""
    def run():
        try:
            with maps.lock:
                batch = maps.committer.request(bm, i)
            asked.set()
            if batch is not None:
                batch.wait()
            box[i] = bm.test(i)
        except BaseException as e:
            box[i] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_bits_asked_for_by_several_writers_share_one_commit(maps):
    asked = [threading.Event() for _ in range(3)]
    box: dict = {}
    threads = [writer(maps, maps.delta, 3, asked[0], box),
               writer(maps, maps.delta, 40, asked[1], box),
               writer(maps, maps.protected, 7, asked[2], box)]
    for ev in asked:
        assert ev.wait(10)
    assert all(t.is_alive() for t in threads), "a writer went on before its commit"
    assert not maps.delta.test(3) and not maps.protected.test(7), \
        "a bit is set in memory before it is committed"
    before = maps.committer.commits
    maps.committer.commit_now()
    for t in threads:
        t.join(10)
    assert box == {3: True, 40: True, 7: True}
    assert maps.committer.commits == before + 1
    assert maps.in_db("c1", "delta") == {3, 40}
    assert maps.in_db("src", "protected") == {7}


def test_second_writer_to_a_bit_waits_for_the_same_commit(maps):
    """dm-era's lesson: a second request for a bit still being committed
    gets the same batch, never a pass on a bit set only in memory."""
    with maps.lock:
        first = maps.committer.request(maps.delta, 5)
        second = maps.committer.request(maps.delta, 5)
    assert first is not None and second is first
    assert not maps.delta.test(5) and maps.in_db() == set()
    maps.committer.commit_now()
    second.wait()
    with maps.lock:
        assert maps.committer.request(maps.delta, 5) is None  # durable: no wait
    assert maps.in_db() == {5}


def test_requests_during_a_commit_go_to_the_next_one(maps):
    """A commit takes the open batch at its start; a bit asked for while it
    writes waits for the next commit."""
    with maps.lock:
        first = maps.committer.request(maps.delta, 1)
    writing = threading.Event()
    go_on = threading.Event()

    def hold():
        writing.set()
        go_on.wait(10)
    faults.arm("commit.after_fdatasync", hold)
    t = threading.Thread(target=maps.committer.commit_now, daemon=True)
    t.start()
    assert writing.wait(10)
    with maps.lock:
        second = maps.committer.request(maps.delta, 2)
    assert second is not first
    go_on.set()
    t.join(10)
    faults.disarm()
    first.wait()
    assert maps.delta.test(1) and not maps.delta.test(2)
    assert maps.in_db() == {1}
    maps.committer.commit_now()
    second.wait()
    assert maps.in_db() == {1, 2}


def test_a_clear_is_lazy_and_reaches_the_database_with_the_next_commit(maps):
    maps.set_durably(maps.delta, 4, 9)
    with maps.lock:
        maps.delta.clear(4)
    assert not maps.delta.test(4) and maps.in_db() == {4, 9}
    maps.committer.commit_now()
    assert maps.in_db() == {9}


def test_a_failed_commit_fails_its_waiters_and_the_next_one_writes_the_pages(maps):
    """SQLite's COMMIT fails (a full disk): the writer gets NoSpace, its bit
    stays clear; a lazy clear of the same commit is kept for the next one."""
    maps.set_durably(maps.delta, 8)
    with maps.lock:
        maps.delta.clear(8)
        batch = maps.committer.request(maps.delta, 2)

    def full():
        raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)
    with pytest.raises(LuncloneError):
        maps.committer.commit_now()
    with pytest.raises(NoSpace):
        batch.wait()
    assert not maps.delta.test(2)
    assert maps.in_db() == {8}
    faults.disarm()
    with maps.lock:
        again = maps.committer.request(maps.delta, 2)
    assert again is not None and again is not batch
    maps.committer.commit_now()
    again.wait()
    assert maps.in_db() == {2}  # the clear of 8 was not lost with the failed commit


# -- with a volume file on LazyFS: what a power cut keeps ----------------------

def after_power_cut(lazy, m: Maps) -> tuple[set[int], bytes]:
    """Cut the power; return (bits of c1's delta, the file's first 8 KiB)."""
    data = m.power_cut(lazy)
    return m.in_db(), data


def test_a_clear_is_written_only_after_fdatasync_of_the_copied_volume(lazy, lazy_maps):
    """A copy landed in extent 0 and its bit is cleared: the commit
    fdatasyncs the volume before the clear goes to the database, so after a
    power cut the database never says "copied" for data that is gone."""
    m = lazy_maps
    m.set_durably(m.delta, 0, 1)
    os.pwrite(m.fd, b"n" * 4096, 0)  # the copy's data
    with m.lock:
        m.delta.clear(0)
        m.committer.copied_into(m.fd)
    seen: dict = {}
    faults.arm("commit.after_fdatasync", lambda: seen.setdefault("db", m.in_db()))
    m.committer.commit_now()
    assert seen["db"] == {0, 1}, "the clear was written before the volume was fdatasync'ed"
    bits, data = after_power_cut(lazy, m)
    assert bits == {1}
    assert data[:4096] == b"n" * 4096, "the database says copied, the data is gone"


def test_without_copied_into_the_data_is_not_synced(lazy, lazy_maps):
    """The converse, to show the power cut is real: a write nobody reported
    with ``copied_into`` is lost with the power, whatever was committed."""
    m = lazy_maps
    m.set_durably(m.delta, 0)
    os.pwrite(m.fd, b"n" * 4096, 0)
    m.set_durably(m.delta, 1)
    bits, data = after_power_cut(lazy, m)
    assert bits == {0, 1} and data[:4096] == b"o" * 4096


def test_a_failed_fdatasync_marks_the_volume_failed_and_puts_the_maps_back(lazy, lazy_maps):
    """Linux reports a write-back error once and drops the data: the commit
    fails, the cleared bit is set again (the extent will be copied again),
    and the volume is never synced as if nothing happened (a second
    fdatasync would succeed, and vouch for lost data)."""
    m = lazy_maps
    m.set_durably(m.delta, 0, 1)
    os.pwrite(m.fd, b"n" * 4096, 0)
    with m.lock:
        m.delta.clear(0)
        batch = m.committer.request(m.protected, 3)
        m.committer.copied_into(m.fd)
    lazy.fail_fsync("vol.img")
    with pytest.raises(OSError) as e:
        m.committer.commit_now()
    assert e.value.errno == errno.EIO
    with pytest.raises(LuncloneError):
        batch.wait()
    assert m.delta.test(0), "the clear of a copy whose data was lost was kept"
    assert m.in_db() == {0, 1}
    assert m.fd in m.committer.failed_fds
    for call in (m.committer.check_writable, m.committer.sync_volume):
        with pytest.raises(OSError) as e:
            call(m.fd)
        assert e.value.errno == errno.EIO
    # Other maps go on: the next commit neither retries the volume nor fails.
    with m.lock:
        again = m.committer.request(m.protected, 3)
    m.committer.commit_now()
    again.wait()
    assert m.in_db("src", "protected") == {3}
    assert m.fd in m.committer.failed_fds  # until the daemon is restarted


def test_requested_bits_alone_need_no_fdatasync_and_carry_no_lazy_clear(lazy, lazy_maps):
    """While a clear waits for the fdatasync of copied data, a writer's bit
    is committed alone, into its page as stored: no fdatasync, the clear
    stays out of the database, and a power cut then finds the bit set and
    the extent still to copy (its data may be gone).  The full commit
    follows (once per LAZY_INTERVAL, or for a flush)."""
    from lunclone import commit
    m = lazy_maps
    m.set_durably(m.delta, 0, 1)
    os.pwrite(m.fd, b"n" * 4096, 0)  # a copy's data, not yet durable
    with m.lock:
        m.delta.clear(0)
        m.committer.copied_into(m.fd)
        batch = m.committer.request(m.delta, 5)  # same page as the clear
    assert not m.committer._full_due(), "requested bits should go alone"
    synced: list[str] = []
    faults.arm("commit.before_fdatasync", lambda: synced.append("fdatasync"))
    m.committer.commit_now(full=m.committer._full_due())
    batch.wait()
    assert synced == [], "requested bits waited for an fdatasync"
    assert m.delta.test(5) and not m.delta.test(0)
    assert m.in_db() == {0, 1, 5}, "the lazy clear went out without its fdatasync"
    m.committer._last_full -= commit.LAZY_INTERVAL
    assert m.committer._full_due()
    bits, data = after_power_cut(lazy, m)
    assert bits == {0, 1, 5}  # extent 0 is copied again after the cut
    assert data[:4096] == b"o" * 4096, "the power cut is not real"


@pytest.fixture
def vol_fd(maps):
    """A volume file beside the database (on the test's tmpfs)."""
    fd = os.open(os.path.join(maps.state_dir, "vol.img"), os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def test_a_full_commit_writes_the_clear_after_requested_bits_went_alone(maps, vol_fd):
    maps.set_durably(maps.delta, 0, 1)
    with maps.lock:
        maps.delta.clear(0)
        maps.committer.copied_into(vol_fd)
        batch = maps.committer.request(maps.delta, 5)
    maps.committer.commit_now(full=False)
    batch.wait()
    assert maps.in_db() == {0, 1, 5}
    maps.committer.commit_now()
    assert maps.in_db() == {1, 5}


def test_a_flush_waiting_for_bits_set_until_a_flush_makes_the_next_commit_full(maps, vol_fd):
    with maps.lock:
        maps.committer.set_until_flush(maps.protected, 3, vol_fd)
        batch = maps.committer.request(maps.delta, 5)
    assert not maps.committer._full_due()
    flushed = threading.Thread(target=maps.committer.commit_for_flush, daemon=True)
    flushed.start()
    deadline = threading.Event()
    while not maps.committer._flush_wanted and not deadline.wait(0.01):
        pass
    assert maps.committer._full_due(), "a flush waits: the next commit must be full"
    maps.committer.commit_now(full=maps.committer._full_due())
    flushed.join(10)
    assert not flushed.is_alive(), "the flush still waits after a full commit"
    batch.wait()
    assert maps.in_db("src", "protected") == {3} and maps.in_db() == {5}


def test_a_commit_of_requested_bits_alone_leaves_a_waiting_flush_waiting(maps, vol_fd):
    """Its bits set until a flush are not durable after it."""
    with maps.lock:
        maps.committer.set_until_flush(maps.protected, 3, vol_fd)
        batch = maps.committer.request(maps.delta, 5)
    flushed = threading.Thread(target=maps.committer.commit_for_flush, daemon=True)
    flushed.start()
    maps.committer.commit_now(full=False)
    batch.wait()
    flushed.join(0.3)
    assert flushed.is_alive(), "a flush returned before its bits were committed"
    assert maps.in_db("src", "protected") == set()
    maps.committer.commit_now()
    flushed.join(10)
    assert not flushed.is_alive()
    assert maps.in_db("src", "protected") == {3}
