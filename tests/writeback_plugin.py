"""An nbdkit Python plugin for the remote durability tests: a file-backed
export with a volatile write-back cache per connection, that a test steers
through files in a control directory.

    nbdkit --unix SOCK python tests/writeback_plugin.py file=IMG ctl=DIR [flush=0]

- A write stays in the server's memory until a flush *on the same
  connection* writes it to the file (NBD without multi-conn promises no
  more); a connection that ends, or a server that dies, loses its
  unflushed writes.  Reads see the file with every cached write on top.
- ``DIR/hold-<offset>`` (a write at that offset) or ``DIR/hold-flush``
  (every flush): the request waits while that file exists, and
  ``DIR/held-<tag>`` says it is waiting.  A held write that ends after its
  connection is gone is dropped with the connection's cache.
- ``flush=0``: the export does not advertise flush.
"""
import os
import threading
import time

import nbdkit

API_VERSION = 2

path = ""
ctl = ""
has_flush = True
lock = threading.Lock()
cache: list[tuple[int, int, bytes]] = []  # (connection, offset, data), in write order
alive: set[int] = set()
next_id = [0]


def config(key, value):
    global path, ctl, has_flush
    if key == "file":
        path = value
    elif key == "ctl":
        ctl = value
    elif key == "flush":
        has_flush = value not in ("0", "no", "false")
    else:
        raise RuntimeError(f"unknown parameter {key}")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    with lock:
        next_id[0] += 1
        alive.add(next_id[0])
        return next_id[0]


def close(h):
    with lock:
        alive.discard(h)
        cache[:] = [c for c in cache if c[0] != h]


def get_size(h):
    return os.stat(path).st_size


def can_write(h):
    return True


def can_flush(h):
    return has_flush


def can_multi_conn(h):
    return False


def _hold(tag: str) -> None:
    if not ctl:
        return
    marker = os.path.join(ctl, f"hold-{tag}")
    while os.path.exists(marker):
        os.close(os.open(os.path.join(ctl, f"held-{tag}"), os.O_WRONLY | os.O_CREAT, 0o644))
        time.sleep(0.02)


def pread(h, buf, offset, flags):
    fd = os.open(path, os.O_RDONLY)
    try:
        data = bytearray(os.pread(fd, len(buf), offset))
    finally:
        os.close(fd)
    data += bytes(len(buf) - len(data))
    end = offset + len(buf)
    with lock:
        for _, off, d in cache:
            lo, hi = max(off, offset), min(off + len(d), end)
            if lo < hi:
                data[lo - offset:hi - offset] = d[lo - off:hi - off]
    buf[:] = data


def pwrite(h, buf, offset, flags):
    _hold(str(offset))
    with lock:
        if h in alive:
            cache.append((h, offset, bytes(buf)))
    if flags & nbdkit.FLAG_FUA:
        _write_back(h)


def flush(h, flags):
    _hold("flush")
    _write_back(h)


def _write_back(h) -> None:
    with lock:
        mine = [c for c in cache if c[0] == h]
        cache[:] = [c for c in cache if c[0] != h]
        fd = os.open(path, os.O_WRONLY)
        try:
            for _, off, d in mine:
                os.pwrite(fd, d, off)
            os.fdatasync(fd)
        finally:
            os.close(fd)
