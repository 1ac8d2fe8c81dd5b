"""Clones with a persisted delta map, against a real nbdkit (issue: clones).

The model: after every step, the persisted delta map of each fractured
clone covers every extent where source and clone differ; a sync leaves
them identical."""
import os
import random
import sqlite3
import time

import nbd
import pytest

from helpers import (EXT, MiB, clone_state, differing_extents, read_bitmap,
                     synchronize_and_fracture, wait_clone_state, whole)


def random_ops(h, rng, size, n, model=None):
    for _ in range(n):
        off = rng.randrange(0, size - 4096) & ~511
        ln = min(rng.choice([512, 4096, EXT, 3 * EXT + 100]), size - off)
        kind = rng.random()
        if kind < 0.7:
            data = rng.randbytes(ln)
            h.pwrite(data, off)
        elif kind < 0.85:
            h.trim(ln, off)
            data = bytes(ln)
        else:
            h.zero(ln, off)
            data = bytes(ln)
        if model is not None:
            model[off:off + ln] = data


def test_clone_lifecycle_model(daemon):
    size = 16 * MiB
    rng = random.Random(42)
    daemon.cli("create", "src", "--size", "16M")
    src = daemon.connect("src")
    random_ops(src, rng, size, 80)
    daemon.cli("clone", "create", "src", "c1")
    # Writes during the initial sync are mirrored or re-copied.
    random_ops(src, rng, size, 40)
    wait_clone_state(daemon, "src", "c1", "synchronized")
    c1 = daemon.connect("c1")
    assert whole(c1, size) == whole(src, size)
    with pytest.raises(nbd.Error):  # read-only while synchronized
        c1.pwrite(b"x" * 512, 0)
    random_ops(src, rng, size, 40)  # mirrored
    assert whole(c1, size) == whole(src, size)
    for cycle in range(3):
        daemon.cli("clone", "fracture", "c1")
        assert clone_state(daemon, "src", "c1")["state"] == "fractured"
        random_ops(src, rng, size, 30)
        random_ops(c1, rng, size, 10)  # the clone's export is writable now
        diff = differing_extents(whole(src, size), whole(c1, size), EXT)
        delta = read_bitmap(daemon.state_dir, "c1", "delta")
        assert diff <= delta, f"cycle {cycle}: delta map misses {sorted(diff - delta)[:10]}"
        assert clone_state(daemon, "src", "c1")["delta_extents"] >= len(diff)
        daemon.cli("clone", "sync", "c1")
        random_ops(src, rng, size, 30)  # writes during the re-sync
        wait_clone_state(daemon, "src", "c1", "synchronized")
        assert whole(c1, size) == whole(src, size), f"cycle {cycle}: sync left differences"


def test_initial_sync_copies_only_allocated(daemon):
    daemon.cli("create", "big", "--size", "1G")
    h = daemon.connect("big")
    h.pwrite(os.urandom(MiB), 100 * MiB)
    daemon.cli("clone", "create", "big", "bc")
    wait_clone_state(daemon, "big", "bc", "synchronized")
    st = os.stat(daemon.volume_path("bc"))
    assert st.st_blocks * 512 <= 2 * MiB  # the clone stayed sparse
    assert daemon.connect("bc").pread(MiB, 100 * MiB) == h.pread(MiB, 100 * MiB)


def test_delta_survives_sigkill(daemon):
    """Acknowledged writes to a fractured clone's source, then kill -9:
    the persisted delta map still covers every difference."""
    size = 16 * MiB
    rng = random.Random(3)
    daemon.cli("create", "src", "--size", "16M")
    synchronize_and_fracture(daemon)
    src = daemon.connect("src")
    c1 = daemon.connect("c1")
    random_ops(src, rng, size, 200)
    random_ops(c1, rng, size, 50)
    del src, c1
    daemon.kill()
    daemon.start()
    src, c1 = daemon.connect("src"), daemon.connect("c1")
    diff = differing_extents(whole(src, size), whole(c1, size), EXT)
    delta = read_bitmap(daemon.state_dir, "c1", "delta")
    assert diff and diff <= delta
    daemon.cli("clone", "sync", "c1")
    wait_clone_state(daemon, "src", "c1", "synchronized")
    assert whole(c1, size) == whole(src, size)


def acked(h, cookie, seconds: float) -> bool:
    """Has the write ``cookie`` been acknowledged within ``seconds``?"""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if h.aio_command_completed(cookie):
            return True
        h.poll(100)
    return h.aio_command_completed(cookie)


def test_two_writes_one_extent_share_commit(daemon):
    """dm-era's lesson: the second write to an extent waits for the same
    commit as the first, it does not pass on a bit that is set in memory but
    not committed.  The commit is held by holding the database's write lock;
    the daemon is killed before it is durable: no acknowledged write may
    lack its delta bit after the restart."""
    daemon.cli("create", "src", "--size", "4M")
    synchronize_and_fracture(daemon)
    assert 0 not in read_bitmap(daemon.state_dir, "c1", "delta")
    a, b = daemon.connect("src"), daemon.connect("src")
    hold = sqlite3.connect(os.path.join(daemon.state_dir, "lunclone.db"), isolation_level=None)
    hold.execute("BEGIN IMMEDIATE")  # the committer's transaction waits for it
    try:
        ca = a.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"a" * 4096)), 0)
        first = acked(a, ca, 1.0)
        cb = b.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"b" * 4096)), 8192)  # extent 0 too
        second = acked(b, cb, 1.0)
        daemon.kill()
    finally:
        hold.rollback()
        hold.close()
    del a, b
    daemon.start()
    acknowledged = [name for name, ok in (("first", first), ("second", second)) if ok]
    if acknowledged:
        assert 0 in read_bitmap(daemon.state_dir, "c1", "delta"), (
            f"the {' and '.join(acknowledged)} write was acknowledged, "
            "its delta bit was not committed")
    assert not first and not second, "a write was acknowledged before its bit was committed"


@pytest.mark.parametrize("args,words", [
    (["clone", "create", "nope", "c9"], "no volume named"),
    (["clone", "create", "src", "bad/name"], "invalid name"),
    (["clone", "create", "src", "src"], "exists already"),
    (["clone", "fracture", "nope"], "no clone named"),
    (["clone", "sync", "src"], "is not a clone"),
    (["delete", "src"], "has clones"),
    (["restore", "src", "--from", "c0"], "only a fractured clone"),
])
def test_clone_refusals(daemon, args, words):
    daemon.cli("create", "src", "--size", "4M")
    daemon.cli("clone", "create", "src", "c0")
    wait_clone_state(daemon, "src", "c0", "synchronized")
    p = daemon.cli(*args, check=False)
    assert p.returncode != 0 and words in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_at_most_eight_clones_and_force_delete(daemon):
    daemon.cli("create", "src", "--size", "4M")
    for i in range(8):
        daemon.cli("clone", "create", "src", f"c{i}")
    p = daemon.cli("clone", "create", "src", "c8", check=False)
    assert p.returncode != 0 and "8 clones" in p.stderr
    for i in range(8):
        wait_clone_state(daemon, "src", f"c{i}", "synchronized")
    daemon.cli("clone", "delete", "c7")
    assert not os.path.exists(daemon.volume_path("c7"))
    daemon.cli("delete", "src", "--force")
    assert daemon.json("list") == []
