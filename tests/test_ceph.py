"""Smoke test of tests/ceph.py: an RBD image on a one-OSD memstore cluster,
served by qemu-nbd, read and written with libnbd.  `pytest -s` shows timings."""
import os
import shutil
import tempfile
import time

import nbd
import pytest

from ceph import CephCluster, ceph_available
from helpers import MiB

OBJ = 4 * MiB  # rbd object size (order 22)
STATE_HOLE, STATE_ZERO = nbd.STATE_HOLE, nbd.STATE_ZERO


def connect(sock: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(f"nbd+unix:///?socket={sock}")
    return h


def extents(h: nbd.NBD, offset: int, length: int) -> list[tuple[int, int, int]]:
    """base:allocation as (offset, length, flags), covering [offset, offset+length)."""
    out: list[tuple[int, int, int]] = []
    pos = offset
    while pos < offset + length:
        got: list[int] = []

        def cb(meta, off, entries, err):
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0

        h.block_status(offset + length - pos, pos, cb)
        assert got, "block_status returned no extent"
        for i in range(0, len(got), 2):
            n = min(got[i], offset + length - pos)
            out.append((pos, n, got[i + 1]))
            pos += n
            if pos >= offset + length:
                break
    return out


def flags_at(ext, offset: int) -> int:
    for o, n, f in ext:
        if o <= offset < o + n:
            return f
    raise AssertionError(f"no extent covers {offset}")


def test_rbd_over_nbd(ceph_cluster: CephCluster):
    c = ceph_cluster
    t = c.timings
    print(f"\nceph start: mon up {t['mon']:.2f}s, osd up {t['osd']:.2f}s, "
          f"pool {t['pool']:.2f}s, total {t['start']:.2f}s")

    size = 64 * MiB
    t0 = time.monotonic()
    c.create_image("smoke", size)
    t1 = time.monotonic()
    assert c.image_size("smoke") == size
    sock = os.path.join(c.workdir, "smoke.sock")
    t2 = time.monotonic()
    srv = c.serve_nbd("smoke", sock)
    t3 = time.monotonic()
    print(f"rbd create {t1 - t0:.2f}s, qemu-nbd serving {t3 - t2:.2f}s")

    h = connect(sock)
    assert h.get_size() == size
    assert h.can_flush() and h.can_zero() and h.can_trim()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

    # random data at a few offsets: start, across an object boundary, middle, end
    writes = {0: 4096, OBJ - 8192: 65536, 33 * MiB + 512: 1536, size - 65536: 65536}
    data = {off: os.urandom(n) for off, n in writes.items()}
    for off, buf in data.items():
        h.pwrite(buf, off)
    h.flush()
    for off, buf in data.items():
        assert h.pread(len(buf), off) == buf

    # a fresh image reads zeros where nothing was written
    assert h.pread(4096, 16 * MiB) == bytes(4096)

    # zero one whole rbd object (it goes away) and part of another
    ZOFF = 10 * OBJ  # [40 MiB, 44 MiB): away from the writes above
    h.pwrite(os.urandom(OBJ), ZOFF)
    h.zero(OBJ, ZOFF)
    h.zero(4096, 0)
    h.flush()
    assert h.pread(OBJ, ZOFF) == bytes(OBJ)
    assert h.pread(4096, 0) == bytes(4096)

    ext = extents(h, 0, size)
    assert sum(n for _, n, _ in ext) == size
    print("block_status:", [(o // MiB, n // MiB, f) for o, n, f in ext])
    assert flags_at(ext, OBJ - 8192) & STATE_HOLE == 0          # data written there
    assert flags_at(ext, size - 1) & STATE_HOLE == 0
    assert flags_at(ext, ZOFF) == STATE_HOLE | STATE_ZERO     # zeroed whole object
    assert flags_at(ext, 16 * MiB) == STATE_HOLE | STATE_ZERO    # never written

    # a second client of the same server sees it all
    h2 = connect(sock)
    for off, buf in data.items():
        if off != 0:
            assert h2.pread(len(buf), off) == buf
    assert h2.pread(4096, 0) == bytes(4096)
    assert h2.pread(8192, OBJ - 8192) == data[OBJ - 8192][:8192]
    del h2
    del h

    # flushed data is in RADOS: SIGKILL qemu-nbd (no clean close), serve again
    t4 = time.monotonic()
    c.kill_server(srv)
    srv = c.serve_nbd("smoke", sock)
    h3 = connect(sock)
    for off, buf in data.items():
        if off != 0:
            assert h3.pread(len(buf), off) == buf
    assert h3.pread(OBJ, ZOFF) == bytes(OBJ)
    h3.pwrite(b"y" * 4096, 0)   # takes the exclusive lock the killed server held
    h3.flush()
    del h3
    print(f"qemu-nbd SIGKILL, restart, reads, write {time.monotonic() - t4:.2f}s")

    t5 = time.monotonic()
    c.stop_server(srv)
    print(f"qemu-nbd stop {time.monotonic() - t5:.3f}s")


def test_stop_is_fast(tmp_path_factory):
    """A cluster of its own, to time start and stop (teardown) end to end."""
    reason = ceph_available()
    if reason:
        pytest.skip(reason)
    workdir = tempfile.mkdtemp(prefix="lcceph", dir="/tmp")
    try:
        with CephCluster(workdir) as c:
            c.create_image("a", 8 * MiB)
            srv = c.serve_nbd("a", os.path.join(workdir, "a.sock"))
            h = connect(os.path.join(workdir, "a.sock"))
            h.pwrite(b"x" * 4096, 0)
            # left connected: stop() must still be quick
        t = c.timings
        print(f"\nsecond cluster: start {t['start']:.2f}s "
              f"(mon {t['mon']:.2f}, osd {t['osd']:.2f}, pool {t['pool']:.2f}), "
              f"stop with a connected client {t['stop']:.3f}s")
        assert srv.poll() is not None and c.mon is None and c.osd is None
        assert t["stop"] < 2.5
        del h
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
