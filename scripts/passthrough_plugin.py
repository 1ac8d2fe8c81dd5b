"""The baseline: a bare nbdkit Python pass-through plugin onto one file.

    nbdkit python scripts/passthrough_plugin.py file=PATH [mirror=PATH2]

The least a Python plugin can do per request; lunclone's hot path is
measured against it. With ``mirror=`` every write also goes to PATH2 at
the same offset and flush syncs both (reads come from PATH): the peer of
lunclone's synchronized clone. The plugin has no zero or trim callback:
nbdkit emulates zero with pwrite (so it is mirrored) and trim is not
offered.
"""
import os

import nbdkit

API_VERSION = 2
path = None
mirror = None
fd = -1
mirror_fd = -1


def config(key, value):
    global path, mirror
    if key == "file":
        path = value
    elif key == "mirror":
        mirror = value
    else:
        raise RuntimeError(f"unknown key {key}")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready():
    global fd, mirror_fd
    fd = os.open(path, os.O_RDWR)
    if mirror is not None:
        mirror_fd = os.open(mirror, os.O_RDWR)


def open(readonly):
    return fd


def get_size(h):
    return os.fstat(h).st_size


def can_multi_conn(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def pread(h, buf, offset, flags):
    os.preadv(h, [buf], offset)


def pwrite(h, buf, offset, flags):
    os.pwrite(h, buf, offset)
    if mirror_fd >= 0:
        os.pwrite(mirror_fd, buf, offset)
    if flags & nbdkit.FLAG_FUA:
        flush(h, 0)


def flush(h, flags):
    os.fdatasync(h)
    if mirror_fd >= 0:
        os.fdatasync(mirror_fd)
