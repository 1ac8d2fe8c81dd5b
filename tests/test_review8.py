"""Review of 2d7a02b (requests-only commits: ``Committer._commit_requests``
writes requested bits into their pages as stored, with no fdatasync; the
full commit follows once per LAZY_INTERVAL or for a waiting flush).

The bug found: a requested *protected* bit acts like a clear of the
extent's *pending* bit (``take_runs`` clears pending extents that are
protected, reads go to the source): it stops the copy, so it must follow
the data as a clear does (rule 2).  A host write into an extent the job
has just copied (its pending clear still lazy, the copy not fdatasync'ed:
a job alone leaves the write-back to the commit) requests the protected
bit; the requests-only commit makes it durable beside the stale pending
bit without the fdatasync.  After a power cut the extent is pending *and*
protected: never copied again, and it holds pre-restore data.  Before the
change every commit fdatasync'ed first, so the protected bit never got
ahead of the copy's data.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from lunclone import commit, faults
from lunclone.bitmap import PAGE_BITS, Bitmap
from helpers import read_bitmap
from helpers import NBITS, Maps
from live import EXT


@pytest.fixture
def lazy_maps(lazy_maps):
    """conftest's, with the restore-pending map of ``src`` registered too
    (its volume file's b"o" is the pre-restore data)."""
    m = lazy_maps
    m.pending = Bitmap(NBITS, key=("src", "pending"))
    with m.lock:
        m.committer.register(m.pending)
    return m


def test_a_protected_bit_committed_alone_does_not_outrun_the_copy_it_stops(lazy, lazy_maps):
    m = lazy_maps
    m.set_durably(m.pending, 0)  # the restore start: extent 0 pending
    # The job copies the clone's data into extent 0 (host quiet: no
    # write-back in the copy thread), ``finish_runs`` clears the bit lazily.
    os.pwrite(m.fd, b"n" * 4096, 0)
    with m.lock:
        m.pending.clear(0)
        m.committer.copied_into(m.fd)
    # A host write into extent 0: no longer pending in memory, so
    # ``_write_plan`` requests its protected bit.
    with m.lock:
        batch = m.committer.request(m.protected, 0)
    m.committer.commit_now(full=m.committer._full_due())
    batch.wait()
    os.pwrite(m.fd, b"h" * 512, 0)  # the host's write, never flushed
    data = m.power_cut(lazy)[:4096]
    pending = read_bitmap(m.state_dir, "src", "pending")
    protected = read_bitmap(m.state_dir, "src", "protected")
    if 0 in protected:  # never copied again (take_runs skips and clears it)
        assert data[512:] == b"n" * (4096 - 512), (
            f"pending={pending} protected={protected}: extent 0 is protected, so never "
            f"copied again, but holds {data[512:516]!r}... (pre-restore data)")


def test_live_write_into_a_just_copied_extent_commits_protected_before_the_copy_is_durable(
        live, monkeypatch):
    live.pending_restore(paused=True)
    eng = live.engine
    fam = live.family("src")
    r = fam.restore
    src_fd = fam.source.fd
    synced: list[int] = []
    real = os.fdatasync

    def recording(fd):
        synced.append(fd)
        return real(fd)
    monkeypatch.setattr(commit, "LAZY_INTERVAL", 60.0)
    eng.committer._wake.set()  # the thread's next periodic wake is 60 s away
    time.sleep(0.3)
    live.commit()  # a full commit now: the next ones (within 60 s) are requests-only
    monkeypatch.setattr(os, "fdatasync", recording)
    # As the job does it alone: the clone's extent copied into the source
    # (page cache only), then ``finish_runs`` under the lock.
    i = max(r.pending.iter_set())  # an extent the job has not copied (paused)
    assert i in read_bitmap(live.state_dir, "src", "pending")
    data = live.read("c1", i * EXT, EXT)
    os.pwrite(src_fd, data, i * EXT)
    with fam.maps_lock:
        fam.guard.start_copies([i])
        fam.finish_runs(r.pending, [(i, 1)], fam.source.store, copied=True, src=r.data_source)
    live.write("src", b"h" * 4096, i * EXT)  # returns once its protected bit is committed
    state = live.state_dir
    assert i in read_bitmap(state, "src", "protected")
    assert not (i in read_bitmap(state, "src", "pending") and src_fd not in synced), (
        f"protected and pending both durable for extent {i}, and the source's copy of "
        "it was never fdatasync'ed: a power cut now leaves pre-restore data that is "
        "never copied again")


# -- what the review found safe, kept as tests -------------------------------------

def test_requests_only_commit_into_a_short_last_page_with_no_row(maps_big):
    m, bm, fd = maps_big
    i = PAGE_BITS + 11  # in the short last page (2 bytes), which has no row
    with m.lock:
        m.committer.copied_into(fd)  # lazy work waits: the commit goes alone
        batch = m.committer.request(bm, i)
    assert not m.committer._full_due()
    m.committer.commit_now(full=False)
    batch.wait()
    loaded = m.md.load_bitmap(*bm.key, bm.nbits)
    assert loaded.test(i) and loaded.count() == 1
    assert len(loaded.page(1)) == 2
    with m.lock:  # a lazy clear beside it, then the full commit
        bm.clear(i)
        m.committer.copied_into(fd)
    m.committer.commit_now()
    assert m.md.load_bitmap(*bm.key, bm.nbits).count() == 0


def test_requests_only_commit_skips_a_map_unregistered_meanwhile(maps_big):
    m, bm, fd = maps_big
    with m.lock:
        m.committer.copied_into(fd)
        batch = m.committer.request(bm, 3)
        m.committer.unregister(bm)  # the clone deleted by a transaction
    m.committer.commit_now(full=False)
    batch.wait()  # woken, as a full commit would
    assert m.md.load_bitmap(*bm.key, bm.nbits).count() == 0, "a deleted map got a row"


def test_full_commit_keeps_bits_a_requests_only_commit_wrote(maps_big):
    m, bm, fd = maps_big
    with m.lock:
        bm.set(2)
    m.committer.commit_now()
    with m.lock:
        bm.clear(2)  # lazy clear, dirty page 0
        m.committer.copied_into(fd)
        batch = m.committer.request(bm, 7)
    m.committer.commit_now(full=False)
    batch.wait()
    with m.lock:
        later = m.committer.request(bm, 9)  # the full commit's own bit
    m.committer.commit_now()
    later.wait()
    got = m.md.load_bitmap(*bm.key, bm.nbits)
    assert [i for i in got.iter_set()] == [7, 9]


def test_constant_requests_still_get_a_full_commit_and_a_flush_returns(maps_big, monkeypatch):
    m, bm, fd = maps_big
    monkeypatch.setattr(commit, "LAZY_INTERVAL", 0.3)
    synced: list[float] = []
    real = os.fdatasync

    def recording(f):
        if f == fd:
            synced.append(time.monotonic())
        return real(f)
    monkeypatch.setattr(os, "fdatasync", recording)
    m.committer.start()
    stop = threading.Event()

    def host():
        i = 0
        while not stop.is_set():
            with m.lock:
                m.committer.copied_into(fd)  # a job copies all the time
                b = m.committer.request(bm, i % bm.nbits)
            if b is not None:
                b.wait()
            with m.lock:
                bm.clear(i % bm.nbits)
            i += 1
    t = threading.Thread(target=host, daemon=True)
    t.start()
    try:
        time.sleep(1.5)
        assert len(synced) >= 2, f"{len(synced)} full commits in 1.5 s of constant requests"
        with m.lock:
            m.committer.set_until_flush(m.protected, 3, fd)
        f = threading.Thread(target=m.committer.commit_for_flush, daemon=True)
        f.start()
        f.join(5)
        assert not f.is_alive(), "a flush waits forever under constant requests"
        assert 3 in read_bitmap(m.state_dir, "src", "protected")
    finally:
        stop.set()
        t.join(5)
        m.committer.stop()


@pytest.fixture
def maps_big(tmp_path):
    m = Maps(str(tmp_path))
    bm = Bitmap(PAGE_BITS + 16, key=("c2", "delta"))
    with m.lock:
        m.committer.register(bm)
    fd = os.open(os.path.join(str(tmp_path), "vol.img"), os.O_RDWR | os.O_CREAT, 0o600)
    yield m, bm, fd
    faults.disarm()
    os.close(fd)
    m.close()
