"""Host writes into extents a restore has not copied yet wait for the copy,
never for a metadata commit; the next flush waits for it (dm-clone's
approach, docs/DESIGN.md rule 3).

The tests hold the committer's ``commit_lock``, so that no commit can
happen, while the host writes into pending extents (in part: copied on
demand first; whole: no copy) and reads them: all must return.  A flush
must not return before the commit, and once it has, a crash (no last
commit, page cache kept) must keep the writes.
"""
from __future__ import annotations

import time

from live import EXT, Async

def test_writes_into_pending_extents_wait_for_no_commit(live):
    clone_data = live.pending_restore()
    partial, whole = b"P" * 4096, b"W" * EXT
    lock = live.engine.committer.commit_lock
    lock.acquire()
    try:
        Async(lambda: live.write("src", partial, 20 * EXT + 512)).result(5.0)
        Async(lambda: live.write("src", whole, 21 * EXT)).result(5.0)
        got = Async(lambda: live.read("src", 20 * EXT, 2 * EXT)).result(5.0)
        flush = Async(lambda: live.volume("src").flush())
        flush.thread.join(0.5)
        assert not flush.done(), "a flush returned before the protected bits were committed"
    finally:
        lock.release()
    flush.result(10.0)
    expected = bytearray(clone_data[20 * EXT:22 * EXT])
    expected[512:512 + 4096] = partial
    expected[EXT:] = whole
    assert got == expected
    r = live.family("src").restore
    assert r.protected.test(20) and r.protected.test(21)

    live.restart()  # as SIGKILL: no last commit
    assert live.read("src", 20 * EXT, 2 * EXT) == expected, "a flushed write was undone"
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: live.family("src").restore is None, what="restore done")
    assert live.read("src", 20 * EXT, 2 * EXT) == expected
    assert live.read("src", 22 * EXT, EXT) == clone_data[22 * EXT:23 * EXT]


def test_fua_write_into_a_pending_extent_survives_a_crash(live):
    clone_data = live.pending_restore()
    live.write("src", b"F" * 4096, 25 * EXT, fua=True)
    live.restart()
    expected = b"F" * 4096 + clone_data[25 * EXT + 4096:26 * EXT]
    assert live.read("src", 25 * EXT, EXT) == expected


def test_partial_writes_to_different_pending_extents_copy_at_once(live, monkeypatch):
    """Copies on demand of different extents do not wait for each other:
    each copy is held until the other has started."""
    live.pending_restore()
    live.cmd("restore_pause", source="src")  # only the host copies
    from lunclone import policy
    real, started = policy.copy_range, []

    def copy_range(src, dst, offset, length):
        started.append(offset)
        deadline = time.monotonic() + 5.0
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return real(src, dst, offset, length)
    monkeypatch.setattr(policy, "copy_range", copy_range)
    a = Async(lambda: live.write("src", b"A" * 512, 26 * EXT + 4096))
    b = Async(lambda: live.write("src", b"B" * 512, 27 * EXT + 4096))
    a.result(10.0)
    b.result(10.0)
    assert sorted(started) == [26 * EXT, 27 * EXT]
