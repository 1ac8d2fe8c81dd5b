"""Stand-in storage systems for remote clones: real nbdkit servers on Unix
sockets, started and stopped by the tests.

``NbdkitFile``       nbdkit's file plugin (optionally with filters): the
                     clone's bytes are in a plain file the test can read.
``WritebackServer``  nbdkit + writeback_plugin.py: writes stay in memory
                     until a flush on their connection, steered by hold files.
"""
from __future__ import annotations

import os
import subprocess

from helpers import SIZE, wait_for

PLUGIN = os.path.join(os.path.dirname(__file__), "writeback_plugin.py")


class UnixNbdkit:
    """An nbdkit on a Unix socket (``argv`` says which plugin): started and
    killed as a storage system that dies, its stale socket removed."""

    sock: str
    proc: subprocess.Popen | None

    def argv(self) -> list[str]:
        raise NotImplementedError

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(["nbdkit", "--foreground", "--unix", self.sock,
                                      *self.argv()])
        wait_for(lambda: os.path.exists(self.sock), 10, what="remote nbdkit socket")
        return self

    def stop(self) -> None:
        """SIGKILL: the storage system dies, its connections with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


class NbdkitFile(UnixNbdkit):
    """nbdkit's file plugin on a Unix socket: a stand-in storage system."""

    def __init__(self, path: str, sock: str, size: int = SIZE, fill: bytes | None = None,
                 filters: tuple[str, ...] = ()):
        self.path, self.sock, self.filters = path, sock, filters
        self.proc: subprocess.Popen | None = None
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.truncate(size)
                if fill is not None:
                    f.write(fill * (size // len(fill)))

    def argv(self) -> list[str]:
        return [*(f"--filter={f}" for f in self.filters), "file", self.path]


    def content(self, length: int = SIZE) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(length)


class WritebackServer(UnixNbdkit):
    """nbdkit + writeback_plugin.py on a Unix socket, steered by ``ctl``."""

    def __init__(self, workdir: str, name: str = "wb", size: int = SIZE, flush: bool = True):
        self.path = os.path.join(workdir, f"{name}.img")
        self.sock = os.path.join(workdir, f"{name}.sock")
        self.ctl = os.path.join(workdir, f"{name}.ctl")
        self.flush = flush
        os.makedirs(self.ctl, exist_ok=True)
        with open(self.path, "wb") as f:
            f.truncate(size)
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        return ["python", PLUGIN, f"file={self.path}", f"ctl={self.ctl}",
                *([] if self.flush else ["flush=0"])]

    def hold(self, tag) -> None:
        open(os.path.join(self.ctl, f"hold-{tag}"), "w").close()

    def release(self, tag) -> None:
        os.unlink(os.path.join(self.ctl, f"hold-{tag}"))

    def wait_held(self, tag) -> None:
        wait_for(lambda: os.path.exists(os.path.join(self.ctl, f"held-{tag}")), 20,
                 what=f"the server holding {tag}")

    def content(self, offset: int = 0, length: int = SIZE) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)
