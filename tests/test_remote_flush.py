"""Durability of writes to a remote clone when its connections fail.

The remote is a real nbdkit running ``writeback_plugin.py``: writes stay in
the server's memory until a flush on the same connection, and are lost with
their connection, as NBD allows.  The tests steer it through hold files
(a write or a flush waits while its file exists) and by killing it.
"""
import os
import random
import threading
import time

import pytest

from helpers import SIZE, MiB, clone_state, wait_clone_state, wait_for, whole
from servers import WritebackServer


@pytest.fixture
def wb(workdir):
    srv = WritebackServer(workdir).start()
    yield srv
    for name in os.listdir(srv.ctl):
        os.unlink(os.path.join(srv.ctl, name))  # nothing stays held
    srv.stop()


def source_file(workdir: str, rng: random.Random):
    from lunclone.store import FileStore
    path = os.path.join(workdir, "src.img")
    with open(path, "wb") as f:
        f.write(rng.randbytes(SIZE))
    return FileStore(path)


def in_thread(fn, *args) -> dict:
    """Run fn in a thread; the dict gets 'ok' or 'error' when it ends."""
    out: dict = {}

    def run():
        try:
            fn(*args)
            out["ok"] = True
        except OSError as e:
            out["error"] = e
    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def joined(out: dict) -> dict:
    out["thread"].join(30)
    assert not out["thread"].is_alive()
    return out


def test_copy_fails_when_its_connection_died_before_its_flush(workdir, wb):
    """Copy A writes one chunk on connection 0 and one on connection 1 (held
    by the server).  Connection 0 is lost (copy B's write is held past the
    request timeout) with A's chunk not flushed, and reconnects; copy C
    flushes on the new connection 0; then A's second chunk completes and A
    flushes.  A's first chunk is gone with its connection: A must fail."""
    from lunclone.remote import NbdStore
    from lunclone.store import copy_range
    rng = random.Random(6)
    src = source_file(workdir, rng)
    store = NbdStore("c", wb.uri, SIZE, depth=8, timeout=1.0, connections=2)
    store.lanes[1].timeout = 60.0  # connection 1 waits for the held chunk
    store.start()
    try:
        store.wait_connected()
        wb.hold(0)
        wb.hold(MiB)
        a = in_thread(copy_range, src, store, 0, 2 * MiB)
        wb.wait_held(0)
        wb.wait_held(MiB)
        assert [lane.in_flight() for lane in store.lanes] == [1, 1]
        wb.release(0)  # A's first chunk completes on connection 0
        wait_for(lambda: store.lanes[0].in_flight() == 0, 10, what="A's chunk 0 written")
        wb.hold(4 * MiB)
        b = joined(in_thread(copy_range, src, store, 4 * MiB, MiB))  # times out
        assert "error" in b
        wb.release(4 * MiB)
        wait_for(lambda: store.lanes[0].connected and store.lanes[0].reconnects >= 1, 20,
                 what="connection 0 back")
        c = joined(in_thread(copy_range, src, store, 8 * MiB, MiB))
        wb.release(MiB)  # A's second chunk completes; A flushes
        joined(a)
        assert "error" in a, ("copy A reported success, yet its first chunk was lost "
                              f"with connection 0: remote holds A's data: "
                              f"{wb.content(0, MiB) == src_bytes(src, 0, MiB)}")
        assert "ok" in c, c.get("error")  # C's writes and flush were on one connection
        assert wb.content(8 * MiB, MiB) == src_bytes(src, 8 * MiB, MiB)
        # A again, as the job retries it: now it lands.
        copy_range(src, store, 0, 2 * MiB)
        assert wb.content(0, 2 * MiB) == src_bytes(src, 0, 2 * MiB)
    finally:
        store.close()
        src.close()


def test_write_past_the_timeout_fails_its_copy_and_is_counted(workdir, wb):
    """A write the server holds past the request timeout: the copy fails
    (its bits stay set), the store counts a connection lost with writes not
    flushed (so an intent sweep clears nothing), and the copy sent again
    after the reconnect lands."""
    from lunclone.remote import NbdStore
    from lunclone.store import copy_range
    src = source_file(workdir, random.Random(7))
    store = NbdStore("c", wb.uri, SIZE, depth=8, timeout=1.0, connections=1)
    store.start()
    try:
        store.wait_connected()
        before = store.lost_unflushed
        wb.hold(2 * MiB)
        t0 = time.monotonic()
        with pytest.raises(OSError):
            copy_range(src, store, 2 * MiB, MiB)
        assert time.monotonic() - t0 < 5
        assert store.lost_unflushed > before
        wb.release(2 * MiB)  # the server ends the write after its connection died
        wait_for(lambda: store.connected, 20, what="reconnected")
        copy_range(src, store, 2 * MiB, MiB)
        assert wb.content(2 * MiB, MiB) == src_bytes(src, 2 * MiB, MiB)
    finally:
        store.close()
        src.close()


def test_sweep_keeps_intents_of_mirror_writes_lost_with_the_remote(daemon, workdir, wb):
    """Mirrored writes sit unflushed on the remote; the sweep's flush is held;
    the remote dies (losing them) and comes back.  No sweep may clear their
    intent bits: the clone resynchronizes and the remote ends equal to the
    source."""
    rng = random.Random(12)
    daemon.cli("create", "src", "--size", str(SIZE))
    src = daemon.connect("src")
    src.pwrite(rng.randbytes(2 * MiB), 0)
    daemon.cli("clone", "create", "src", "c1", "--remote", wb.uri)
    wait_clone_state(daemon, "src", "c1", "synchronized")
    wait_for(lambda: clone_state(daemon, "src", "c1")["delta_extents"] == 0, 30,
             what="clean synchronized clone")
    wb.hold("flush")
    for k in range(8):
        src.pwrite(rng.randbytes(64 * 1024), (3 + k) * MiB)  # mirrored, not flushed
    wb.wait_held("flush")  # the sweep flushes
    wb.stop()
    wb.release("flush")
    wb.start()
    wait_for(lambda: clone_state(daemon, "src", "c1")["remote"]["connected"], 30,
             what="reconnected")
    time.sleep(8)  # a few sweeps
    wait_clone_state(daemon, "src", "c1", "synchronized", timeout=60)
    wait_for(lambda: clone_state(daemon, "src", "c1")["delta_extents"] == 0, 60,
             what="intent bits swept")
    assert wb.content() == whole(src, SIZE), \
        "intent bits were cleared for mirror writes the remote lost"
    del src


def test_remote_without_flush_is_refused(daemon, workdir):
    srv = WritebackServer(workdir, "noflush", flush=False).start()
    try:
        daemon.cli("create", "src", "--size", str(SIZE))
        p = daemon.cli("clone", "create", "src", "c1", "--remote", srv.uri, check=False)
        assert p.returncode == 1 and "flush" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        assert daemon.json("status", "src")["clones"] == []
    finally:
        srv.stop()


def src_bytes(src, offset: int, length: int) -> bytes:
    return os.pread(src.fd, length, offset)
