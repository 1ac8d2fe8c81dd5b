"""Test helpers: a real lunclone daemon (nbdkit + plugin) and real clients."""
from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import nbd

from lunclone.bitmap import Bitmap
from lunclone.commit import Committer
from lunclone.metadata import Metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LUNCLONE = os.path.join(os.path.dirname(sys.executable), "lunclone")

MiB = 1 << 20
EXT = 64 * 1024  # the default extent size (units.DEFAULT_EXTENT)
SIZE = 16 * MiB  # the volume of the restore scenarios (``fractured_then_damaged``)
SMALL = 4 * MiB  # the volume of the in-process tests (``live.LiveEngine.fractured_clone``)


class Daemon:
    """`lunclone serve` in a temporary state and run directory."""

    def __init__(self, state_dir: str, run_dir: str, prefix: list[str] | None = None):
        self.state_dir = state_dir
        self.run_dir = run_dir
        # argv put before `lunclone serve ...`, e.g. ["ip", "netns", "exec", NS]
        self.prefix = list(prefix or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(os.path.dirname(state_dir), "daemon.log")

    @property
    def nbd_socket(self) -> str:
        return os.path.join(self.run_dir, "nbd.sock")

    def start(self, timeout: float = 20.0) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, LUNCLONE, "serve", "--state-dir", self.state_dir,
             "--run-dir", self.run_dir],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
            if self._answers():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not come up: {self.log()}")

    def _answers(self) -> bool:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(os.path.join(self.run_dir, "control.sock"))
            s.sendall(b'{"cmd":"ping"}\n')
            return b'"ok"' in s.recv(4096)
        except OSError:
            return False
        finally:
            s.close()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        # nbdkit 1.32 waits for connected clients before it exits: close the
        # handles a failed test or a reference cycle left behind.
        gc.collect()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: a crash. nbdkit leaves its sockets behind."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([LUNCLONE, *args, "--run-dir", self.run_dir],
                           capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"lunclone {' '.join(args)} failed: {p.stderr}")
        return p

    def json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.nbd_socket}"

    def connect(self, name: str) -> nbd.NBD:
        h = nbd.NBD()
        h.connect_uri(self.uri(name))
        return h

    def volume_path(self, name: str) -> str:
        return os.path.join(self.state_dir, "volumes", f"{name}.img")


def short_tmpdir(prefix: str = "lc") -> str:
    """Unix socket paths must stay under 108 bytes: pytest's tmp_path may not."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (bound, then released)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def which_or_skip(pytest, *tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None and not os.path.exists(t):
            pytest.skip(f"{t} is not installed (run scripts/setup)")


def read_bitmap(state_dir: str, owner: str, kind: str) -> set[int]:
    """The set bits of a persisted map, read from the real database (read-only)."""
    import sqlite3
    db = sqlite3.connect(f"file:{os.path.join(state_dir, 'lunclone.db')}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT page, bits FROM bitmaps WHERE owner=? AND kind=?",
                          (owner, kind)).fetchall()
    finally:
        db.close()
    out = set()
    for page, data in rows:
        base = page * len(data) * 8
        for j, b in enumerate(data):
            if b:
                for k in range(8):
                    if b >> k & 1:
                        out.add(base + j * 8 + k)
    return out


def wait_for(pred, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def clone_state(daemon: Daemon, source: str, clone: str) -> dict:
    for c in daemon.json("status", source)["clones"]:
        if c["name"] == clone:
            return c
    raise AssertionError(f"no clone {clone}")


def wait_clone_state(daemon: Daemon, source: str, clone: str, state: str, timeout=120):
    return wait_for(lambda: clone_state(daemon, source, clone)["state"] == state,
                    timeout, what=f"{clone} {state}")


def differing_extents(a: bytes, b: bytes, extent: int) -> set[int]:
    return {i // extent for i in range(0, len(a), extent) if a[i:i + extent] != b[i:i + extent]}


def whole(h: nbd.NBD, size: int) -> bytes:
    """Every byte of an export, read through a libnbd handle in 8 MiB pieces."""
    out = bytearray()
    for off in range(0, size, 8 * MiB):
        out += h.pread(min(8 * MiB, size - off), off)
    return bytes(out)


def restore_status(daemon: Daemon, source: str) -> dict | None:
    return daemon.json("status", source)["restore"]


def wait_restore_done(daemon: Daemon, source: str, timeout: float = 120):
    return wait_for(lambda: (restore_status(daemon, source) or {}).get("state") == "done",
                    timeout, what=f"restore of {source} done")


def synchronize_and_fracture(daemon: Daemon, source: str = "src", clone: str = "c1",
                             remote: str | None = None) -> None:
    """Create ``clone`` of ``source`` (behind the NBD URI ``remote`` if
    given), wait until it is synchronized, and fracture it."""
    daemon.cli("clone", "create", source, clone, *(["--remote", remote] if remote else []))
    wait_clone_state(daemon, source, clone, "synchronized")
    daemon.cli("clone", "fracture", clone)


def fractured_clone(daemon: Daemon, size: int, data: int, source: str = "src",
                    clone: str = "c1"):
    """``source`` of ``size`` bytes with ``data`` random bytes at its start,
    and ``clone`` synchronized then fractured: returns a handle on the source."""
    daemon.cli("create", source, "--size", str(size))
    h = daemon.connect(source)
    h.pwrite(os.urandom(data), 0)
    h.flush()
    synchronize_and_fracture(daemon, source, clone)
    return h


def fractured_then_damaged(daemon: Daemon, rng, size: int = SIZE,
                           remote: str | None = None) -> tuple[bytes, nbd.NBD]:
    """The restore scenario: ``src`` with data, clone ``c1`` synchronized and
    fractured, then ``src`` damaged (writes and trims).  Returns (the clone's
    content = what a restore must bring back, a handle on ``src``).  With
    ``remote`` (an NBD URI) the clone lives behind that export."""
    daemon.cli("create", "src", "--size", str(size))
    src = daemon.connect("src")
    for off in range(0, size, MiB):
        if rng.random() < 0.8:
            src.pwrite(rng.randbytes(MiB), off)
    synchronize_and_fracture(daemon, "src", "c1", remote)
    for _ in range(60):  # damage: differences to restore
        off = rng.randrange(0, size - 3 * EXT) & ~4095
        if rng.random() < 0.7:
            src.pwrite(rng.randbytes(rng.choice([4096, EXT, 3 * EXT])), off)
        else:
            src.trim(EXT, off & ~(EXT - 1))
    clone_data = whole(daemon.connect("c1"), size)
    assert whole(src, size) != clone_data
    return clone_data, src


# -- the group committer over a real database (test_commit, test_review8) -------

NBITS = 64


class Maps:
    """A committer over a real database in ``state_dir`` and two maps."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.md = Metadata(state_dir)
        self.lock = threading.RLock()
        self.committer = Committer(self.md, self.lock)
        self.delta = Bitmap(NBITS, key=("c1", "delta"))
        self.protected = Bitmap(NBITS, key=("src", "protected"))
        with self.lock:
            for bm in (self.delta, self.protected):
                self.committer.register(bm)

    def in_db(self, owner: str = "c1", kind: str = "delta") -> set[int]:
        return read_bitmap(self.state_dir, owner, kind)

    def set_durably(self, bm: Bitmap, *bits: int) -> None:
        with self.lock:
            batches = [self.committer.request(bm, i) for i in bits]
        self.committer.commit_now()
        for b in batches:
            if b is not None:
                b.wait()

    def power_cut(self, lazy) -> bytes:
        """For the ``lazy_maps`` fixture's maps (a volume file ``fd`` at
        ``path`` on the lazy mount): cut the power, mount again, open the
        volume and the database again; the volume's first 8 KiB as the cut
        left them."""
        os.close(self.fd)
        self.md.close()
        lazy.power_cut()
        lazy.mount()
        self.fd = os.open(self.path, os.O_RDWR)
        self.md = Metadata(self.state_dir)
        with open(self.path, "rb") as f:
            return f.read(8192)

    def close(self) -> None:
        self.md.close()


def fsync_path(path: str) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
