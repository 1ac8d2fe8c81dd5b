"""Clones kept on another storage system, behind an NBD export.

The "other system" here is a second, real nbdkit serving a plain file on
its own Unix socket: the bytes of the clone are in that file, so the tests
read it directly to show where the data went.  Ceph (test_ceph_clone.py)
and a real network between namespaces (test_network.py) use the same
checks through other servers.
"""
import os
import random

import nbd
import pytest

from helpers import (EXT, SIZE, MiB, clone_state, fractured_then_damaged, read_bitmap,
                     restore_status, wait_clone_state, wait_for, wait_restore_done, whole)
from servers import NbdkitFile
from workloads import host_io_during_restore, run_crash_points


@pytest.fixture
def remote(workdir):
    srv = NbdkitFile(os.path.join(workdir, "remote.img"), os.path.join(workdir, "remote.sock"))
    srv.start()
    yield srv
    srv.stop()


def test_remote_clone_sync_mirror_fracture_restore(daemon, remote):
    """A remote clone goes through every state as a local one does; the
    data lives in the remote's file; the restore is checked against a model
    with host I/O on four connections during the restore."""
    rng = random.Random(31)
    daemon.cli("create", "src", "--size", str(SIZE))
    src = daemon.connect("src")
    src.pwrite(rng.randbytes(4 * MiB), 2 * MiB)
    daemon.cli("clone", "create", "src", "c1", "--remote", remote.uri)
    wait_clone_state(daemon, "src", "c1", "synchronized")
    st = daemon.json("status", "src")
    c1 = st["clones"][0]
    assert c1["remote"]["connected"] and c1["remote"]["uri"] == remote.uri
    assert f"on {remote.uri} (connected" in daemon.cli("status", "src").stdout
    assert daemon.json("status", "c1")["remote"] == remote.uri
    assert remote.content() == whole(src, SIZE)  # the bytes are on the other system
    # Synchronized: host writes are mirrored to the remote.
    src.pwrite(b"M" * 8192, 9 * MiB)
    src.flush()
    assert remote.content()[9 * MiB:9 * MiB + 8192] == b"M" * 8192
    wait_for(lambda: clone_state(daemon, "src", "c1")["delta_extents"] == 0, 20,
             what="write-intent bits swept")
    daemon.cli("clone", "fracture", "c1")
    for _ in range(40):  # damage after the point in time
        src.pwrite(rng.randbytes(EXT), rng.randrange(0, SIZE // EXT) * EXT)
    clone_data = remote.content()
    assert whole(daemon.connect("c1"), SIZE) == clone_data  # the clone's export reads it
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    model, touched = host_io_during_restore(daemon, src, clone_data, 300, 80)
    assert remote.content() == clone_data, "the remote clone changed during the restore"
    assert read_bitmap(daemon.state_dir, "c1", "delta") == touched
    # Re-sync brings the remote clone up to date again.
    daemon.cli("clone", "sync", "c1")
    wait_clone_state(daemon, "src", "c1", "synchronized")
    assert remote.content() == bytes(model)


def test_remote_with_old_data_is_fully_overwritten(daemon, workdir):
    """An export that holds old bytes: the initial sync makes it equal to the
    source everywhere, holes included (they become NBD zero requests)."""
    srv = NbdkitFile(os.path.join(workdir, "old.img"), os.path.join(workdir, "old.sock"),
                     fill=b"\xaa" * 4096).start()
    try:
        daemon.cli("create", "src", "--size", str(SIZE))
        src = daemon.connect("src")
        src.pwrite(os.urandom(MiB), 5 * MiB)
        daemon.cli("clone", "create", "src", "c1", "--remote", srv.uri, "--wait")
        wait_clone_state(daemon, "src", "c1", "synchronized")
        assert srv.content() == whole(src, SIZE)
    finally:
        srv.stop()


def test_large_sparse_remote_copies_only_data(daemon, workdir):
    """An 8 GiB volume (past NBD's 32-bit lengths) on a sparse export: the
    initial sync asks block status in pieces and copies only the data."""
    size = 8 << 30
    srv = NbdkitFile(os.path.join(workdir, "big.img"), os.path.join(workdir, "big.sock"),
                     size=size).start()
    try:
        daemon.cli("create", "big", "--size", str(size))
        h = daemon.connect("big")
        for off in (0, 5 << 30, size - MiB):
            h.pwrite(b"D" * MiB, off)
        h.flush()
        daemon.cli("clone", "create", "big", "far", "--remote", srv.uri)
        wait_clone_state(daemon, "big", "far", "synchronized")
        sync = daemon.json("status", "big")["clones"][0]
        assert sync["delta_extents"] == 0
        with open(srv.path, "rb") as f:
            for off in (0, 5 << 30, size - MiB):
                f.seek(off)
                assert f.read(MiB) == b"D" * MiB
        assert os.stat(srv.path).st_blocks * 512 < 64 * MiB  # holes stayed holes
        del h
    finally:
        srv.stop()


def test_refused_request_fails_alone_with_its_errno(remote):
    """A command libnbd refuses (here: past the end) fails with a numeric
    errno, which is what the plugin hands nbdkit; the connection stays."""
    import errno
    from lunclone.nbdconn import READ, RemoteError, Request
    from lunclone.remote import NbdStore
    store = NbdStore("c", remote.uri, SIZE, connections=1)
    store.start()
    try:
        store.wait_connected()
        with pytest.raises(RemoteError) as e:
            store.submit(Request(READ, SIZE, 4096, bytearray(4096))).wait()
        assert e.value.errno == errno.EINVAL
        buf = bytearray(4096)
        store.pread(buf, 0)
        assert store.connected
    finally:
        store.close()


def test_remote_refusals_change_nothing(daemon, workdir, remote):
    daemon.cli("create", "src", "--size", str(SIZE))
    other = NbdkitFile(os.path.join(workdir, "small.img"), os.path.join(workdir, "small.sock"),
                       size=SIZE // 2).start()
    try:
        for uri, words in [
            (other.uri, "bytes, the clone must be"),                    # another size
            (f"nbd+unix:///?socket={workdir}/nobody.sock", "cannot keep a clone"),
            ("http://example.invalid/x", "give an NBD URI"),
        ]:
            p = daemon.cli("clone", "create", "src", "c1", "--remote", uri, check=False)
            assert p.returncode == 1 and words in p.stderr, p.stderr
            assert len(p.stderr.strip().splitlines()) == 1
            assert daemon.json("status", "src")["clones"] == []
        daemon.cli("clone", "create", "src", "c1", "--remote", remote.uri)
        p = daemon.cli("clone", "create", "src", "c2", "--remote", remote.uri, check=False)
        assert p.returncode == 1 and "already the clone c1" in p.stderr
        assert not os.path.exists(daemon.volume_path("c1"))  # no local file for it
    finally:
        other.stop()


def test_remote_lost_then_back(daemon, remote):
    """The remote goes away mid-restore: status says so, host requests that
    need an extent from it get EIO, the others are served; the job pauses
    with the error; with the remote back, resume finishes the restore and
    every byte matches the model."""
    rng = random.Random(41)
    clone_data, src = fractured_then_damaged(daemon, rng, remote=remote.uri)
    daemon.cli("restore", "src", "--from", "c1", "--rate", "128K")
    pending_before = restore_status(daemon, "src")["pending_extents"]
    remote.stop()
    wait_for(lambda: not clone_state(daemon, "src", "c1")["remote"]["connected"], 30,
             what="status shows the remote away")
    c1 = clone_state(daemon, "src", "c1")
    assert c1["remote"]["error"]
    assert "UNREACHABLE" in daemon.cli("status", "src").stdout
    assert 'lunclone_remote_connected{source="src",clone="c1"} 0' in \
        daemon.cli("metrics").stdout
    model = bytearray(clone_data)
    # Whole-extent writes need nothing from the clone: served.
    served = eio = 0
    for k in range(SIZE // EXT):
        off = k * EXT
        if k % 3 == 0:
            data = rng.randbytes(EXT)
            src.pwrite(data, off)
            model[off:off + EXT] = data
            served += 1
        else:
            try:
                got = src.pread(4096, off)
                assert got == bytes(model[off:off + 4096])
                served += 1
            except nbd.Error as e:
                assert e.errno == "EIO", e
                eio += 1
    assert served > 0 and eio > 0, (served, eio)
    wait_for(lambda: restore_status(daemon, "src")["state"] == "paused", 60,
             what="restore paused on the lost remote")
    assert restore_status(daemon, "src")["error"]
    assert restore_status(daemon, "src")["pending_extents"] <= pending_before
    remote.start()
    wait_for(lambda: clone_state(daemon, "src", "c1")["remote"]["connected"], 30,
             what="reconnected")
    assert clone_state(daemon, "src", "c1")["remote"]["reconnects"] >= 1
    daemon.cli("restore", "resume", "src")
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    assert whole(src, SIZE) == bytes(model)
    assert remote.content() == clone_data


def test_sigkill_during_restore_from_remote(daemon, remote, long_mode):
    """The crash test of test_crash.py with the clone behind NBD."""
    points = 60 if long_mode else 8
    tried, mismatches = run_crash_points(daemon, points, seed=5, remote=remote.uri)
    print(f"remote clone: crash points tried: {tried}, mismatches: {mismatches}")
    assert tried >= points and mismatches == 0


def test_large_trim_on_a_remote_without_zero(daemon, workdir):
    """A remote that cannot zero gets writes of zeroes instead, at most
    32 MiB per request (libnbd refuses more than 64 MiB): a 200 MiB trim
    mirrored to a synchronized clone, and a 200 MiB zero sent directly,
    read back as zeroes and break nothing."""
    from lunclone.remote import NbdStore
    size = 256 * MiB
    srv = NbdkitFile(os.path.join(workdir, "nz.img"), os.path.join(workdir, "nz.sock"),
                     size=size, filters=("nozero",)).start()
    try:
        direct = NbdStore("d", srv.uri, size, connections=2)
        direct.start()
        try:
            direct.wait_connected()
            direct.pwrite(b"Z" * MiB, 100 * MiB)
            direct.zero(8 * MiB, 200 * MiB)
            direct.flush()
            assert srv.content(size)[8 * MiB:208 * MiB] == bytes(200 * MiB)
        finally:
            direct.close()
        daemon.cli("create", "big", "--size", str(size))
        h = daemon.connect("big")
        for off in range(0, size, 16 * MiB):
            h.pwrite(b"D" * MiB, off)
        daemon.cli("clone", "create", "big", "far", "--remote", srv.uri)
        wait_clone_state(daemon, "big", "far", "synchronized")
        h.trim(200 * MiB, 16 * MiB)
        h.flush()
        c = clone_state(daemon, "big", "far")
        assert c["state"] == "synchronized" and not c["error"], c
        assert srv.content(size) == whole(h, size)
        assert srv.content(size)[16 * MiB:216 * MiB] == bytes(200 * MiB)
        del h
    finally:
        srv.stop()
