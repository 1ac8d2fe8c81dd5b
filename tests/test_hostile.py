"""Hostile requests: odd shapes, many connections, clients that vanish.
Correct results or errors, no leak of threads or file descriptors, other
clients unaffected."""
import errno
import os
import threading
import time

import nbd
import pytest

from helpers import MiB


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def settle(fn, pid, want, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn(pid) <= want:
            return fn(pid)
        time.sleep(0.1)
    return fn(pid)


def test_unaligned_and_straddling_requests(daemon):
    daemon.cli("create", "v", "--size", "4M", "--extent-size", "4K")
    daemon.cli("clone", "create", "v", "c")
    h = daemon.connect("v")
    model = bytearray(4 * MiB)
    for off, data in [(4095, b"x"), (4094, b"abc"), (1, b"q" * 10_000), (8191, b"z" * 8194),
                      (4 * MiB - 3, b"end")]:
        h.pwrite(data, off)
        model[off:off + len(data)] = data
    h.zero(5, 65533)
    model[65533:65538] = bytes(5)
    h.trim(3, 70_001)
    model[70_001:70_004] = bytes(3)
    assert h.pread(4 * MiB, 0) == model
    with pytest.raises(nbd.Error):
        h.pwrite(b"xxxx", 4 * MiB - 2)
    # requests past the end reach the server (libnbd would refuse them
    # itself) and are refused there: EINVAL for a read, ENOSPC for a write
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
    for length, off in [(4, 4 * MiB - 2), (32 * MiB, 0), (1, 4 * MiB)]:
        with pytest.raises(nbd.Error) as e:
            h.pread(length, off)
        assert e.value.errnum == errno.EINVAL, (length, off, e.value)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"xxxx", 4 * MiB - 2)
    assert e.value.errnum == errno.ENOSPC, e.value
    assert h.get_size() == 4 * MiB and h.pread(4 * MiB, 0) == model


def test_64_connections_no_leak(daemon):
    daemon.cli("create", "v", "--size", "64M")
    pid = daemon.proc.pid
    warm = daemon.connect("v")
    warm.pread(4096, 0)
    del warm
    time.sleep(0.3)
    fd0, th0 = fds(pid), threads(pid)
    errors = []

    def client(k):
        try:
            h = daemon.connect("v")
            data = bytes([k]) * 65536
            h.pwrite(data, k * MiB)
            assert h.pread(65536, k * MiB) == data
            h.flush()
            del h
        except BaseException as e:
            errors.append(e)
    ts = [threading.Thread(target=client, args=(k,)) for k in range(64)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors[:3]
    assert settle(fds, pid, fd0) <= fd0, "file descriptors leaked"
    assert settle(threads, pid, th0) <= th0, "threads leaked"
    h = daemon.connect("v")
    assert all(h.pread(1, k * MiB) == bytes([k]) for k in range(64))


def test_client_vanishing_mid_request(daemon):
    daemon.cli("create", "v", "--size", "64M")
    pid = daemon.proc.pid
    other = daemon.connect("v")
    fd0 = fds(pid)
    for _ in range(10):
        h = daemon.connect("v")
        buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(32 * MiB)))
        h.aio_pwrite(buf, 0)
        h.aio_pread(nbd.Buffer(32 * MiB), 32 * MiB)
        h.shutdown(nbd.SHUTDOWN_ABANDON_PENDING)
        del h
    other.pwrite(b"still here", 0)
    assert other.pread(10, 0) == b"still here"
    assert settle(fds, pid, fd0) <= fd0
