"""The baseline: a bare nbdkit Python pass-through plugin onto one file.

    nbdkit python scripts/passthrough_plugin.py file=PATH

The least a Python plugin can do per request; lunclone's hot path is
measured against it.
"""
import os

import nbdkit

API_VERSION = 2
path = None
fd = -1


def config(key, value):
    global path
    if key != "file":
        raise RuntimeError(f"unknown key {key}")
    path = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready():
    global fd
    fd = os.open(path, os.O_RDWR)


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
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(h)


def flush(h, flags):
    os.fdatasync(h)
