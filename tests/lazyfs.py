"""LazyFS for tests: a FUSE passthrough filesystem that can lose power.

The mounted view is a plain passthrough to a backing directory: every write,
truncate, fallocate, create, unlink, rename and mkdir shows at once.  Beside
it a *durable store* holds what reached "the disk":

- a file's data and size become durable at fsync/fdatasync of that file
  (only the ranges written since its last sync are copied, sparse-aware);
- a directory's entries (names -> inodes) become durable at fsync of that
  directory (a rename across directories: at fsync of either one).  An
  fsync of a file does NOT make its name durable.

``LazyFS.power_cut()`` stops the filesystem (the mount answers ENOTCONN),
optionally tears unsynced writes (keeps random 4 KiB pieces of them), then
resets the backing directory to the durable state; ``mount()`` brings it
back.  ``fail_fsync()`` makes the next fsync of matching files fail with
EIO and drops their unsynced data, as Linux does on a writeback error.

Usage::

    with LazyFS(backing, mnt) as fs:
        ...                       # run things with their files under mnt
        fs.power_cut(tear=True)   # everything not fsynced is gone
        fs.mount()                # boot again: mnt shows the durable state

Built on fusepy (libfuse 2, high-level API) with its ``fallocate`` hook
added.  Limits: libfuse 2 has no lseek, so the kernel answers SEEK_DATA /
SEEK_HOLE itself and sees a file as data from 0 to its size (no holes are
reported; reads still return zeroes in holes); copy_file_range is done by
the kernel or the caller with reads and writes.  POSIX and flock locks are
kept by the kernel (local to this machine), which is all a single host
needs.  The server runs as ``python lazyfs.py serve ...`` in a subprocess.
"""
from __future__ import annotations

import argparse
import bisect
import ctypes
import ctypes.util
import errno
import fnmatch
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

BLOCK = 4096
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


# ---------------------------------------------------------------- files

def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch(fd: int, offset: int, length: int) -> None:
    if length > 0:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of the data within [start, end) of a real file."""
    pos = start
    while pos < end:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if a >= end:
            return
        b = min(os.lseek(fd, a, os.SEEK_HOLE), end)
        yield a, b
        pos = b


def copy_sparse(src: int, dst: int, start: int, end: int) -> None:
    """Make dst[start:end] equal src[start:end]: data copied, holes punched.

    Bytes past src's end count as a hole."""
    end_data = min(end, os.fstat(src).st_size)
    pos = start
    for a, b in data_runs(src, start, end_data):
        punch(dst, pos, a - pos)
        while a < b:
            data = os.pread(src, min(1 << 20, b - a), a)
            if not data:
                break
            os.pwrite(dst, data, a)
            a += len(data)
        pos = b
    punch(dst, pos, end - pos)


def copy_file(src_path: str, dst_path: str) -> None:
    src = os.open(src_path, os.O_RDONLY)
    try:
        dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            size = os.fstat(src).st_size
            os.ftruncate(dst, size)
            copy_sparse(src, dst, 0, size)
        finally:
            os.close(dst)
    finally:
        os.close(src)


class Ranges:
    """A set of byte ranges, kept merged and sorted (``runs``)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    @property
    def runs(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends))

    def add(self, a: int, b: int) -> None:
        if a >= b:
            return
        i = bisect.bisect_left(self.ends, a)      # first run that may touch [a, b)
        j = bisect.bisect_right(self.starts, b)   # runs i..j-1 touch it
        if i < j:
            a, b = min(a, self.starts[i]), max(b, self.ends[j - 1])
        self.starts[i:j] = [a]
        self.ends[i:j] = [b]

    def blocks(self) -> Iterator[int]:
        """The starts of the 4 KiB blocks these ranges touch."""
        for a, b in self.runs:
            yield from range(a // BLOCK * BLOCK, b, BLOCK)


# ---------------------------------------------------------------- the durable store
#
# store/files/<key>  the durable content of one inode (file)
# store/ns.json      {"root": key, "dirs": {dirkey: {name: entry}}}, an entry is
#                    {"t": "f"|"d", "k": key, "m": mode} or {"t": "l", "target": str}

def _entry(path: str, key_of: Callable[[int], str]) -> dict:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return {"t": "l", "target": os.readlink(path)}
    kind = "d" if stat.S_ISDIR(st.st_mode) else "f"
    return {"t": kind, "k": key_of(st.st_ino), "m": stat.S_IMODE(st.st_mode)}


def dir_entries(path: str, key_of: Callable[[int], str]) -> dict:
    return {name: _entry(os.path.join(path, name), key_of) for name in os.listdir(path)}


def write_ns(store: str, ns: dict) -> None:
    tmp = os.path.join(store, "ns.json.tmp")
    with open(tmp, "w") as f:
        json.dump(ns, f)
    os.replace(tmp, os.path.join(store, "ns.json"))


def _clear_dir(path: str) -> None:
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)


def restore(backing: str, store: str) -> None:
    """Reset ``backing`` to the durable state kept in ``store``."""
    with open(os.path.join(store, "ns.json")) as f:
        ns = json.load(f)
    _clear_dir(backing)
    used: set[str] = set()
    seen: set[str] = set()

    def fill(dirkey: str, path: str) -> None:
        if dirkey in seen:      # a cycle of renames: never twice
            return
        seen.add(dirkey)
        for name, e in ns["dirs"].get(dirkey, {}).items():
            p = os.path.join(path, name)
            if e["t"] == "l":
                os.symlink(e["target"], p)
            elif e["t"] == "d":
                os.mkdir(p, e["m"])
                fill(e["k"], p)
            else:
                _restore_file(store, e["k"], p, e["m"], used)

    fill(ns["root"], backing)


def _restore_file(store: str, key: str, path: str, mode: int, used: set[str]) -> None:
    data = os.path.join(store, "files", key)
    if not os.path.exists(data):
        open(path, "wb").close()          # the name is durable, no data ever was
    elif key in used:
        copy_file(data, path)             # a second link: a copy
    else:
        used.add(key)
        os.rename(data, path)
    os.chmod(path, mode)


# ---------------------------------------------------------------- the filesystem

def _load_fusepy():
    """fusepy with libfuse 2.9's ``fallocate`` operation added."""
    import fusepy

    class Ops(ctypes.Structure):
        _fields_ = fusepy.fuse_operations._fields_ + [
            ("poll", ctypes.c_voidp), ("write_buf", ctypes.c_voidp),
            ("read_buf", ctypes.c_voidp), ("flock", ctypes.c_voidp),
            ("fallocate", ctypes.CFUNCTYPE(
                ctypes.c_int, ctypes.c_char_p, ctypes.c_int, fusepy.c_off_t,
                fusepy.c_off_t, ctypes.POINTER(fusepy.fuse_file_info))),
        ]

    fusepy.fuse_operations = Ops

    class Fuse(fusepy.FUSE):
        def fallocate(self, path, mode, offset, length, fip):
            return self.operations("fallocate", self._decode_optional_path(path),
                                   mode, offset, length, fip.contents)

    return fusepy, Fuse


class LazyOps:
    """The FUSE operations: a passthrough that remembers what is not durable.

    One lock serialises every operation: simple, and the tests are small."""

    use_ns = True
    flag_nullpath_ok = 1    # an unlinked open file works by its fd (hard_remove)

    def __init__(self, backing: str, store: str):
        self.root = os.path.realpath(backing)
        self.store = store
        self._mutex = threading.RLock()
        self.dead = False
        self.keys: dict[int, str] = {}      # backing inode -> key
        self.next_key = 0
        self.dirty: dict[str, Ranges] = {}  # key -> ranges not yet durable
        self.fd_keys: dict[int, str] = {}   # open fd -> key
        self.faults: list[dict] = []
        self.renames: list[tuple[str, str]] = []  # cross-directory, not yet durable
        self.ns: dict = {}
        self._init_store()

    # ---- keys and the store

    def _new_key(self, ino: int) -> str:
        self.next_key += 1
        self.keys[ino] = f"k{self.next_key}"
        return self.keys[ino]

    def key_of(self, ino: int) -> str:
        return self.keys.get(ino) or self._new_key(ino)

    def _init_store(self) -> None:
        """At mount everything in the backing directory is durable."""
        shutil.rmtree(self.store, ignore_errors=True)
        os.makedirs(os.path.join(self.store, "files"))
        dirs = {}
        for path, _, files in os.walk(self.root):
            dirs[self.key_of(os.lstat(path).st_ino)] = dir_entries(path, self.key_of)
            for name in files:
                p = os.path.join(path, name)
                if os.path.isfile(p) and not os.path.islink(p):
                    copy_file(p, self._data_path(self.key_of(os.lstat(p).st_ino)))
        self.ns = {"root": self.key_of(os.lstat(self.root).st_ino), "dirs": dirs}
        write_ns(self.store, self.ns)

    def _data_path(self, key: str) -> str:
        return os.path.join(self.store, "files", key)

    def _bp(self, path: str) -> str:
        return self.root + path

    def _mark(self, key: str, a: int, b: int) -> None:
        self.dirty.setdefault(key, Ranges()).add(a, b)

    def sync_file(self, key: str, fd: int) -> None:
        """Make the live content of ``fd`` durable (only what changed)."""
        size = os.fstat(fd).st_size
        data = self._data_path(key)
        fresh = not os.path.exists(data)
        dst = os.open(data, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(dst, size)
            runs = [(0, size)] if fresh else self.dirty.get(key, Ranges()).runs
            for a, b in runs:
                if a < size:
                    copy_sparse(fd, dst, a, min(b, size))
        finally:
            os.close(dst)
        self.dirty.pop(key, None)

    def drop_unsynced(self, key: str, fd: int) -> None:
        """A writeback error: the unsynced ranges fall back to the durable data."""
        size = os.fstat(fd).st_size
        data = self._data_path(key)
        src = os.open(data, os.O_RDONLY) if os.path.exists(data) else None
        try:
            for a, b in self.dirty.pop(key, Ranges()).runs:
                b = min(b, size)
                if a >= b:
                    continue
                if src is None:
                    punch(fd, a, b - a)
                else:
                    copy_sparse(src, fd, a, b)
        finally:
            if src is not None:
                os.close(src)

    def sync_dir(self, path: str) -> None:
        bp = self._bp(path)
        self.ns["dirs"][self.key_of(os.lstat(bp).st_ino)] = dir_entries(bp, self.key_of)
        write_ns(self.store, self.ns)

    # ---- control

    def cut(self, tear: bool, seed: int | None) -> None:
        """Power is lost: no further operation succeeds."""
        with self._mutex:
            self.dead = True
            if tear:
                self._tear(random.Random(seed))
            write_ns(self.store, self.ns)

    def _live_fds(self) -> dict[str, int]:
        """key -> an fd on the live file, for every dirty key still reachable."""
        fds = {}
        for fd, key in self.fd_keys.items():
            fds.setdefault(key, os.dup(fd))
        for path, _, files in os.walk(self.root):
            for name in files:
                p = os.path.join(path, name)
                key = self.keys.get(os.lstat(p).st_ino)
                if key in self.dirty and key not in fds and not os.path.islink(p):
                    fds[key] = os.open(p, os.O_RDONLY)
        return fds

    def _tear(self, rng: random.Random) -> None:
        """Keep a random half of the unsynced 4 KiB blocks."""
        fds = self._live_fds()
        try:
            for key, ranges in self.dirty.items():
                if key in fds:
                    self._tear_file(key, fds[key], ranges, rng)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _tear_file(self, key: str, fd: int, ranges: Ranges, rng: random.Random) -> None:
        size = os.fstat(fd).st_size
        dst = os.open(self._data_path(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for blk in ranges.blocks():
                end = min(blk + BLOCK, size)
                if blk < end and rng.random() < 0.5:
                    if os.fstat(dst).st_size < end:
                        os.ftruncate(dst, end)
                    copy_sparse(fd, dst, blk, end)
        finally:
            os.close(dst)

    def add_fault(self, pattern: str, err: int, once: bool) -> None:
        with self._mutex:
            self.faults.append({"pattern": pattern.lstrip("/"), "errno": err, "once": once})

    def clear_faults(self) -> None:
        with self._mutex:
            self.faults.clear()

    def _fault_for(self, path: str | None) -> int:
        if path is None:
            return 0
        for rule in self.faults:
            if fnmatch.fnmatch(path.lstrip("/"), rule["pattern"]):
                if rule["once"]:
                    self.faults.remove(rule)
                return rule["errno"]
        return 0

    # ---- FUSE operations (called by fusepy as ops(name, *args))

    def __call__(self, op: str, *args):
        with self._mutex:
            if self.dead:
                raise OSError(errno.EIO, "power is off")
            return getattr(self, op)(*args)

    def getattr(self, path, fi=None):
        st = os.fstat(fi.fh) if fi is not None else os.lstat(self._bp(path))
        return {k: getattr(st, k) for k in (
            "st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")} | {
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns, "st_blksize": st.st_blksize}

    def access(self, path, amode):
        if not os.access(self._bp(path), amode):
            raise OSError(errno.EACCES, "")

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._bp(path))

    def readlink(self, path):
        return os.readlink(self._bp(path))

    def statfs(self, path):
        sv = os.statvfs(self._bp(path))
        return {k: getattr(sv, k) for k in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
            "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def mkdir(self, path, mode):
        os.mkdir(self._bp(path), mode)
        self._new_key(os.lstat(self._bp(path)).st_ino)

    def rmdir(self, path):
        os.rmdir(self._bp(path))

    def mknod(self, path, mode, dev):
        os.mknod(self._bp(path), mode, dev)
        self._new_key(os.lstat(self._bp(path)).st_ino)

    def symlink(self, path, target):
        os.symlink(target, self._bp(path))

    def link(self, path, existing):
        os.link(self._bp(existing), self._bp(path))

    def unlink(self, path):
        os.unlink(self._bp(path))

    def rename(self, old, new):
        os.rename(self._bp(old), self._bp(new))
        pair = (os.path.dirname(old), os.path.dirname(new))
        if pair[0] != pair[1]:
            self.renames.append(pair)

    def chmod(self, path, mode):
        os.chmod(self._bp(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._bp(path), uid, gid)

    def utimens(self, path, times=None):
        if times is None:
            os.utime(self._bp(path))
        else:
            os.utime(self._bp(path), ns=tuple(int(t) for t in times))

    # pwrite with O_APPEND would ignore the offset; O_TRUNC must be seen as a truncate
    _STRIP = os.O_APPEND | os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC

    def create(self, path, mode, fi):
        fd = os.open(self._bp(path), (fi.flags & ~(os.O_APPEND | os.O_DIRECT)) | os.O_CREAT,
                     mode)
        self.fd_keys[fd] = self._new_key(os.fstat(fd).st_ino)
        fi.fh = fd

    def open(self, path, fi):
        fd = os.open(self._bp(path), fi.flags & ~self._STRIP)
        self.fd_keys[fd] = self.key_of(os.fstat(fd).st_ino)
        fi.fh = fd
        if fi.flags & os.O_TRUNC:
            self.truncate(path, 0, fi)

    def read(self, path, size, offset, fi):
        return os.pread(fi.fh, size, offset)

    def write(self, path, data, offset, fi):
        n = os.pwrite(fi.fh, data, offset)
        self._mark(self.fd_keys[fi.fh], offset, offset + n)
        return n

    def truncate(self, path, length, fi=None):
        if fi is not None:
            fd, own = fi.fh, False
        else:
            fd, own = os.open(self._bp(path), os.O_WRONLY), True
        try:
            old = os.fstat(fd).st_size
            os.ftruncate(fd, length)
            self._mark(self.key_of(os.fstat(fd).st_ino), length, old)
        finally:
            if own:
                os.close(fd)

    def fallocate(self, path, mode, offset, length, fi):
        fallocate(fi.fh, mode, offset, length)
        self._mark(self.fd_keys[fi.fh], offset, offset + length)

    def flush(self, path, fi):
        return 0

    def release(self, path, fi):
        self.fd_keys.pop(fi.fh, None)
        os.close(fi.fh)

    def fsync(self, path, datasync, fi):
        key = self.fd_keys[fi.fh]
        err = self._fault_for(path)
        if err:
            self.drop_unsynced(key, fi.fh)
            raise OSError(err, os.strerror(err))
        self.sync_file(key, fi.fh)

    def fsyncdir(self, path, datasync, fh):
        self.sync_dir(path)
        # A rename between two directories is one journal transaction on
        # ext4: an fsync of either side makes both sides durable.
        for pair in [p for p in self.renames if path in p]:
            self.renames.remove(pair)
            other = pair[1] if pair[0] == path else pair[0]
            if os.path.isdir(self._bp(other)):
                self.sync_dir(other)


class ControlServer(threading.Thread):
    """JSON lines over a Unix socket: ping, cut, fail_fsync, clear_faults."""

    def __init__(self, ops: LazyOps, path: str):
        super().__init__(daemon=True)
        self.ops = ops
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)

    def run(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn, conn.makefile("rw") as f:
                for line in f:
                    f.write(json.dumps(self.handle(json.loads(line))) + "\n")
                    f.flush()

    def handle(self, req: dict) -> dict:
        try:
            cmd = req["cmd"]
            if cmd == "ping":
                return {"ok": True}
            if cmd == "cut":
                self.ops.cut(bool(req.get("tear")), req.get("seed"))
            elif cmd == "fail_fsync":
                self.ops.add_fault(req["pattern"], int(req.get("errno", errno.EIO)),
                                   bool(req.get("once", True)))
            elif cmd == "clear_faults":
                self.ops.clear_faults()
            else:
                return {"ok": False, "error": f"unknown command {cmd!r}"}
            return {"ok": True}
        except Exception as e:  # reported to the test, never kills the server
            return {"ok": False, "error": repr(e)}


def serve(backing: str, mountpoint: str, store: str) -> None:
    fusepy, Fuse = _load_fusepy()
    ops = LazyOps(backing, store)
    ControlServer(ops, os.path.join(store, "control.sock")).start()
    Fuse(ops, mountpoint, raw_fi=True, foreground=True, fsname="lazyfs",
         hard_remove=True, big_writes=True, use_ino=True)


# ---------------------------------------------------------------- the test side

def unavailable() -> str | None:
    """Why a LazyFS cannot be mounted here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this container)"
    if shutil.which("fusermount") is None:
        return "fusermount is not installed (apt-get install fuse3)"
    try:
        import fusepy  # noqa: F401
    except ImportError:
        return "fusepy is not installed (apt-get install python3-fusepy)"
    return None


def _in_mount_table(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


class LazyFS:
    """A LazyFS mount of ``backing`` on ``mountpoint``, served by a subprocess.

    The durable store lives in ``store`` (default: ``backing + ".lazyfs"``)."""

    def __init__(self, backing: str, mountpoint: str, store: str | None = None):
        self.backing = os.path.abspath(backing)
        self.mountpoint = os.path.abspath(mountpoint)
        self.store = store or self.backing.rstrip("/") + ".lazyfs"
        self.proc: subprocess.Popen | None = None

    @property
    def control_path(self) -> str:
        return os.path.join(self.store, "control.sock")

    @property
    def log_path(self) -> str:
        return self.store + ".log"

    def __enter__(self) -> "LazyFS":
        return self.mount()

    def __exit__(self, *exc) -> None:
        self.unmount()

    def mount(self, timeout: float = 20.0) -> "LazyFS":
        """Mount (again): whatever the backing directory holds is durable."""
        if self.proc is not None:
            raise RuntimeError("already mounted")
        if _in_mount_table(self.mountpoint):     # left by a killed test run
            subprocess.run(["fusermount", "-u", "-z", self.mountpoint], capture_output=True)
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "serve", self.backing,
                 self.mountpoint, self.store], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"lazyfs exited at mount: {self.log()}")
            if _in_mount_table(self.mountpoint) and self._ping():
                return self
            time.sleep(0.02)
        self.unmount()
        raise RuntimeError(f"lazyfs did not mount: {self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def _ping(self) -> bool:
        try:
            return self._call({"cmd": "ping"})["ok"]
        except OSError:
            return False

    def _call(self, req: dict) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(self.control_path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise OSError(errno.EPIPE, "lazyfs control closed")
                buf += chunk
        return json.loads(buf)

    def _command(self, req: dict) -> None:
        if self.proc is None:
            raise RuntimeError("not mounted")
        reply = self._call(req)
        if not reply["ok"]:
            raise RuntimeError(f"lazyfs {req['cmd']}: {reply['error']}")

    def fail_fsync(self, pattern: str, errno: int = errno.EIO, once: bool = True) -> None:
        """The next fsync/fdatasync of a file whose path (relative to the mount)
        matches the fnmatch ``pattern`` fails with ``errno``, and the file's
        unsynced data is dropped.  ``once=False``: every such fsync, until
        ``clear_faults``."""
        self._command({"cmd": "fail_fsync", "pattern": pattern, "errno": errno,
                       "once": once})

    def clear_faults(self) -> None:
        self._command({"cmd": "clear_faults"})

    def power_cut(self, tear: bool = False, seed: int | None = None) -> None:
        """Lose power: the mount goes away (its users get ENOTCONN or EIO) and the
        backing directory is reset to what was durable.  ``tear``: a random half
        of the unsynced 4 KiB blocks reach the disk too.  ``mount()`` again."""
        try:
            self._command({"cmd": "cut", "tear": tear, "seed": seed})
        finally:    # what fsync and fsyncdir stored is on the disk already
            self._stop(kill=True)
            restore(self.backing, self.store)

    def unmount(self) -> None:
        """A clean unmount: everything written stays in the backing directory."""
        if self.proc is not None:
            self._stop(kill=False)

    def _stop(self, kill: bool) -> None:
        proc, self.proc = self.proc, None
        if kill:
            proc.kill()
        elif subprocess.run(["fusermount", "-u", self.mountpoint],
                            capture_output=True).returncode != 0:
            proc.kill()          # busy: users still hold files open
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if _in_mount_table(self.mountpoint):   # a dead FUSE mount fails stat()
            subprocess.run(["fusermount", "-u", "-z", self.mountpoint], capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="mount and serve in the foreground")
    s.add_argument("backing")
    s.add_argument("mountpoint")
    s.add_argument("store")
    a = p.parse_args()
    serve(a.backing, a.mountpoint, a.store)


if __name__ == "__main__":
    main()
