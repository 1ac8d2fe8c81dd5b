"""During a protected restore, host requests on extents the restore no
longer copies take no lock (``Family.refresh_fast``, ``_all_copied``):
reads of extents not pending (or protected), one-extent writes into
protected extents, and reads within one pending extent with no copy in
flight (``_read_one_extent``: from the clone).  The test holds
``maps_lock``, which every other path takes, and such requests must still
return; writes into pending extents and reads across extents wait for it.
"""
from __future__ import annotations

from live import EXT, Async

def test_requests_on_extents_not_copied_again_take_no_lock(live):
    clone_data = live.pending_restore(paused=True)
    live.write("src", b"W" * 4096, 20 * EXT)  # copied on demand: protected
    fam = live.family("src")
    with fam.maps_lock:  # (an RLock: other threads wait for it)
        read_done = Async(lambda: live.read("src", 40 * EXT, 4096)).result(5.0)
        Async(lambda: live.write("src", b"X" * 4096, 20 * EXT + 8192)).result(5.0)
        protected_read = Async(lambda: live.read("src", 20 * EXT, 3 * 4096)).result(5.0)
        # A read within one pending extent reads the clone without the lock.
        pending_read = Async(lambda: live.read("src", 21 * EXT, 4096))
        pending_read.thread.join(5.0)
        assert pending_read.done(), "a read of one pending extent waited for the lock"
        spanning = Async(lambda: live.read("src", 21 * EXT + EXT - 512, 1024))
        spanning.thread.join(0.3)
        assert not spanning.done(), "a read across pending extents took no lock"
        pending_write = Async(lambda: live.write("src", b"Y" * 512, 22 * EXT))
        pending_write.thread.join(0.3)
        assert not pending_write.done(), "a write into a pending extent took no lock"
    assert read_done == clone_data[40 * EXT:40 * EXT + 4096]
    assert protected_read == (b"W" * 4096 + clone_data[20 * EXT + 4096:20 * EXT + 8192]
                              + b"X" * 4096)
    assert pending_read.result(5.0) == clone_data[21 * EXT:21 * EXT + 4096]
    assert spanning.result(5.0) == clone_data[22 * EXT - 512:22 * EXT + 512]
    pending_write.result(5.0)
    live.cmd("restore_resume", source="src")
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: fam.restore is None, what="restore done")
    expected = bytearray(clone_data)
    expected[20 * EXT:20 * EXT + 4096] = b"W" * 4096
    expected[20 * EXT + 8192:20 * EXT + 3 * 4096] = b"X" * 4096
    expected[22 * EXT:22 * EXT + 512] = b"Y" * 512
    assert live.whole("src") == bytes(expected)
    assert set(live.clone("c1").delta.iter_set()) == {20, 22}


def test_no_fast_path_before_the_gate_opens_and_unprotected_ones_mirror(live):
    """The restore's gate closed (pending map not filled yet): no lock-free
    write.  An unprotected restore's fast-path writes go to the clone too,
    until its mirror is lost."""
    live.pending_restore(paused=True)
    fam = live.family("src")
    r = fam.restore
    assert fam.fast is not None and fam.fast[1] == []
    r.ready.clear()
    with fam.maps_lock:
        fam.refresh_fast()
    assert fam.fast is None
    r.ready.set()
    r.protected_mode = False
    with fam.maps_lock:
        fam.refresh_fast()
    assert fam.fast is not None and fam.fast[1] == [r.clone]
    fam.mirror_broken(r.clone, "write", OSError(5, "injected"))
    assert r.mirror_lost and fam.fast[1] == []
