"""The real engine in this process: real files, real SQLite, real committer,
jobs on a real asyncio loop, admin commands through the control server's
own command table.  Host requests are made the way nbdkit's worker threads
make them (``Volume.pread``/``pwrite``... from test threads), so a test can
hold one at a chosen point (``Hold``) while jobs and admin commands move.

No nbdkit here: what only nbdkit shows is tested with ``helpers.Daemon``.
"""
from __future__ import annotations

import asyncio
import errno
import inspect
import os
import threading
import time
from typing import Callable

from lunclone.engine import Engine
from lunclone.iopath import Volume

from helpers import EXT, SMALL, MiB  # noqa: F401  (EXT, MiB: tests import them from here)

PENDING = 32  # extents 0..31 differ between source and clone in ``pending_restore``


def pattern(tag: bytes, n: int = SMALL) -> bytes:
    """``tag`` repeated to ``n`` bytes."""
    return (tag * (n // len(tag) + 1))[:n]


def fail_fdatasync_once(monkeypatch, fd: int) -> list[int]:
    """The next ``os.fdatasync`` of ``fd`` raises EIO (a lost write-back, as
    Linux reports it once); the returned list gets ``fd`` when it did."""
    real, hit = os.fdatasync, []

    def failing(f):
        if f == fd and not hit:
            hit.append(f)
            raise OSError(errno.EIO, "injected write-back error")
        return real(f)
    monkeypatch.setattr(os, "fdatasync", failing)
    return hit


class LiveEngine:
    def __init__(self, workdir: str):
        self.state_dir = os.path.join(workdir, "state")
        self.run_dir = os.path.join(workdir, "run")
        os.makedirs(self.run_dir, exist_ok=True)
        self.engine = self._boot()

    def _boot(self) -> Engine:
        eng = Engine(self.state_dir, self.run_dir)
        eng.start()
        return eng

    # -- admin commands, on the loop as the control server runs them -----------
    def cmd(self, _cmd: str, _timeout: float = 60.0, **args):
        fn = self.engine._server.commands[_cmd]

        async def run():
            result = fn(**args)
            if inspect.isawaitable(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(run(), self.engine.loop).result(_timeout)

    def cmd_in_thread(self, _cmd: str, **args) -> "Async":
        return Async(lambda: self.cmd(_cmd, **args))

    def on_loop(self, fn: Callable, timeout: float = 30.0):
        """Run ``fn()`` on the loop thread and return its result."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.engine.loop).result(timeout)

    # -- host side ------------------------------------------------------------
    def volume(self, name: str) -> Volume:
        """A served volume, as a client's connection finds it (its
        family's maps loaded, as nbdkit's open does)."""
        self.engine.families.load_maps_of(name)
        return self.engine.volumes.served[name]

    def read(self, name: str, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.volume(name).pread(buf, offset)
        return bytes(buf)

    def write(self, name: str, data: bytes, offset: int, fua: bool = False) -> None:
        self.volume(name).pwrite(data, offset, fua)

    def whole(self, name: str) -> bytes:
        return self.read(name, 0, self.volume(name).size)

    def file(self, name: str) -> bytes:
        """The bytes of a local volume file, read past the engine."""
        with open(self.engine.volumes.path(name), "rb") as f:
            return f.read()

    # -- states -----------------------------------------------------------------
    def family(self, source: str):
        """A source's family, its maps loaded (as a client or an admin
        command finds it)."""
        fam = self.engine.families.by_source[source]
        self.engine.families.load_maps(fam)
        return fam

    def clone(self, name: str):
        fam, clone = self.engine.families.find_clone(name)
        return clone

    def wait(self, pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_clone(self, name: str, state: str, timeout: float = 30.0) -> None:
        self.wait(lambda: self.clone(name).state == state, timeout, f"{name} {state}")

    def pending_restore(self, paused: bool = False, keep_undo: bool = False) -> bytes:
        """A protected restore of src from its fractured clone c1, extents
        0..PENDING-1 differing, throttled (64K/s) so that they stay pending
        for a while, or ``paused`` at once (only host requests and commits
        touch the maps then), keeping an undo image if ``keep_undo``;
        returns the clone's data."""
        clone_data = pattern(b"clone-")
        self.fractured_clone(data=clone_data)
        self.write("src", pattern(b"old-", PENDING * EXT), 0)
        self.cmd("restore", source="src", clone_name="c1", rate_limit="64K",
                 keep_undo=keep_undo)
        if paused:
            self.cmd("restore_pause", source="src")
        return clone_data

    def fractured_clone(self, source: str = "src", clone: str = "c1", size: int = SMALL,
                        data: bytes | None = None) -> None:
        self.cmd("create", name=source, size=size)
        if data is not None:
            self.write(source, data, 0)
        self.cmd("clone_create", source=source, name=clone)
        self.wait_clone(clone, "synchronized")
        self.cmd("clone_fracture", name=clone)

    def restoring_beside_c2(self) -> None:
        """src with fractured clones c1 and c2 (both its data of "a"), 8
        extents of src changed since, and a restore from c1 running at
        64 KiB/s: c2's map holds only what src changed."""
        self.fractured_clone(data=pattern(b"a"))
        self.cmd("clone_create", source="src", name="c2")
        self.wait_clone("c2", "synchronized")
        self.cmd("clone_fracture", name="c2")
        self.write("src", pattern(b"b", 8 * EXT), 0)
        self.cmd("restore", source="src", clone_name="c1", rate_limit="64K")

    def job_copy(self, i: int, write_back: bool) -> None:
        """The restore job's steps on pending extent ``i`` of src: take,
        copy (``write_back``: written back in the copy's thread), finish."""
        fam = self.family("src")
        r = fam.restore
        with fam.maps_lock:
            runs = fam.take_runs(r.pending, i, 1)
        assert runs == [(i, 1)]
        fam.copy_runs(r.data_source, fam.source.store, runs, write_back=write_back)
        with fam.maps_lock:
            fam.finish_runs(r.pending, runs, fam.source.store, copied=True,
                            src=r.data_source, durable=write_back)

    # -- ends ---------------------------------------------------------------------
    def commit(self) -> None:
        self.engine.committer.commit_now()

    def quiet_committer(self, monkeypatch) -> list[int]:
        """No periodic full commit for a minute (one now); returns the log
        of fdatasync calls from then on."""
        from lunclone import commit
        monkeypatch.setattr(commit, "LAZY_INTERVAL", 60.0)
        self.engine.committer._wake.set()  # its next periodic wake is 60 s away
        time.sleep(0.3)
        self.commit()
        synced: list[int] = []
        real = os.fdatasync

        def recording(fd):
            synced.append(fd)
            return real(fd)
        monkeypatch.setattr(os, "fdatasync", recording)
        return synced

    def stop(self) -> None:
        self.engine.stop()

    def crash(self) -> None:
        """As SIGKILL leaves things (the page cache kept): no final commit,
        no flush; threads stopped, descriptors and the lock dropped."""
        eng = self.engine
        eng.committer.commit_now = lambda *a, **k: None  # no last commit (one in progress ends)
        eng.committer._stop = True
        eng.committer._wake.set()
        if eng.committer._thread:
            eng.committer._thread.join(10)
        eng.loop.call_soon_threadsafe(eng.loop.stop)
        eng._thread.join(30)
        for vol in eng.volumes.served.values():
            vol.close()
        eng.md.close()
        eng.lock.release()
        for path in (eng.control_socket,):
            if os.path.exists(path):
                os.unlink(path)

    def restart(self) -> None:
        self.crash()
        self.engine = self._boot()

    def restart_without(self, *names: str) -> Callable[[], None]:
        """Crash, then start with the files of volumes ``names`` moved away
        (a clone missing at start-up); returns the call that puts them back."""
        self.crash()
        paths = [self.engine.volumes.path(n) for n in names]
        for path in paths:
            os.rename(path, path + ".away")
        self.engine = self._boot()
        return lambda: [os.rename(p + ".away", p) for p in paths]


class Async:
    """Run ``fn`` in a thread; ``result()`` joins and re-raises."""

    def __init__(self, fn: Callable):
        self.box: dict = {}
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.box["result"] = fn()
        except BaseException as e:
            self.box["error"] = e

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = 30.0):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("still running")
        if "error" in self.box:
            raise self.box["error"]
        return self.box.get("result")


class Hold:
    """Hold calls of a module's function at a chosen point.

    ``Hold(monkeypatch, module, "name", when)`` replaces ``module.name`` by
    a wrapper: a call for which ``when(*args)`` is true blocks (``arrived``
    is set) until ``release()``, then runs the real function.  The real
    system call still runs; only its timing is chosen by the test."""

    def __init__(self, monkeypatch, module, name: str, when: Callable[..., bool],
                 before: bool = True):
        self.real = getattr(module, name)
        self.arrived = threading.Event()
        self.released = threading.Event()
        self.when = when
        self.armed = True
        real, hold = self.real, self

        def wrapper(*args, **kwargs):
            if hold.armed and when(*args, **kwargs):
                hold.armed = False
                if before:
                    hold.arrived.set()
                    hold.released.wait(60)
                    return real(*args, **kwargs)
                result = real(*args, **kwargs)
                hold.arrived.set()
                hold.released.wait(60)
                return result
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    def wait_arrived(self, timeout: float = 10.0) -> None:
        assert self.arrived.wait(timeout), "the held call never came"

    def release(self) -> None:
        self.released.set()
