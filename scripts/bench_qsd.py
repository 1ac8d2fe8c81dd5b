"""The qemu peer of a scattered restore: ``block-stream`` in qemu-storage-daemon.

Set-up (untimed), chosen so that block-stream copies exactly the changed
extents and nothing else: the clone's raw file is the read-only backing
node of a qcow2 overlay (64 KiB clusters, the extent size) in which every
unchanged extent is a zero cluster (metadata only: "allocated" in the
overlay, so the stream skips it) and every changed extent is unallocated
(it reads through to the clone, so the stream copies it from there).
Two layouts of the overlay's data:

- in place (``data_file``): the overlay keeps its data in an external raw
  data file, an allocated copy of the volume, at the guest's offsets, so
  the stream writes each changed extent where it belongs, as the restore
  and the raw loop do;
- plain qcow2: new clusters are appended to the qcow2 file, so the
  stream's writes land one after another at its end.

Timed: the QMP ``block-stream`` command until its BLOCK_JOB_COMPLETED
event, then an fdatasync of the files it wrote (what the raw loop and the
restore make durable too).  QMP is spoken with the standard library (JSON
lines over the Unix socket): no package needed.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

QSD = "qemu-storage-daemon"


def make_overlay(path: str, base: str, size: int, changed: list[int], extent: int,
                 in_place: bool = False) -> None:
    """A qcow2 over ``base`` whose unallocated clusters are exactly ``changed``;
    ``in_place``: with an external data file, given to ``timed_block_stream``
    (``qemu-img create`` would truncate the real one: a sparse stand-in is
    named in the header and removed)."""
    stand_in = path + ".stand-in"
    for p in (path, stand_in):
        if os.path.exists(p):
            os.unlink(p)
    opts = f"cluster_size={extent}" + (f",data_file={stand_in}" if in_place else "")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts,
                    "-b", base, "-F", "raw", path, str(size)], check=True)
    cmds, pos = [], 0
    for i in [*changed, size // extent]:  # zero clusters between the changed extents
        if i * extent > pos:
            cmds.append(f"write -z {pos} {i * extent - pos}")
        pos = (i + 1) * extent
    if cmds:  # commands on stdin: one qemu-io however many ranges
        subprocess.run(["qemu-io", "-f", "qcow2", path], input="\n".join(cmds) + "\nquit\n",
                       text=True, check=True, stdout=subprocess.DEVNULL)
    if in_place:
        os.unlink(stand_in)
    os.sync()


class Qmp:
    """QMP over a Unix socket: one JSON object per line each way."""

    def __init__(self, path: str, timeout: float = 600):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        self._recv()  # the greeting
        self.execute("qmp_capabilities")

    def _recv(self) -> dict:
        line = self.file.readline()
        if not line:
            raise RuntimeError("qemu-storage-daemon closed its QMP socket")
        return json.loads(line)

    def execute(self, cmd: str, **arguments) -> dict:
        self.file.write(json.dumps({"execute": cmd, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._recv()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise RuntimeError(f"QMP {cmd}: {msg['error']}")
            elif "return" in msg:
                return msg["return"]

    def event(self, name: str, **match) -> dict:
        """The next event ``name`` whose data has ``match``."""
        while True:
            msg = self.events.pop(0) if self.events else self._recv()
            data = msg.get("data", {})
            if msg.get("event") == name and all(data.get(k) == v for k, v in match.items()):
                return msg

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def timed_block_stream(overlay: str, base: str, work: str, data_file: str | None = None) -> float:
    """Start qemu-storage-daemon on the overlay, time block-stream to its end
    (plus the fdatasync of the files written), stop the daemon."""
    sock = os.path.join(work, "qsd.qmp")
    if os.path.exists(sock):
        os.unlink(sock)
    node = {"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": overlay},
            "backing": {"driver": "raw", "node-name": "base", "read-only": True,
                        "file": {"driver": "file", "filename": base, "locking": "off"}}}
    if data_file:
        node["data-file"] = {"driver": "file", "filename": data_file}
    proc = subprocess.Popen([QSD, "--blockdev", json.dumps(node),
                             "--chardev", f"socket,id=qmp0,path={sock},server=on,wait=off",
                             "--monitor", "chardev=qmp0"])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not start")
            time.sleep(0.01)
        qmp = Qmp(sock)
        fds = [os.open(p, os.O_RDONLY) for p in (overlay, data_file) if p]
        try:
            t0 = time.monotonic()
            qmp.execute("block-stream", **{"job-id": "stream", "device": "top"})
            done = qmp.event("BLOCK_JOB_COMPLETED", device="stream")
            for fd in fds:
                os.fdatasync(fd)
            took = time.monotonic() - t0
        finally:
            for fd in fds:
                os.close(fd)
        if done["data"].get("error"):
            raise RuntimeError(f"block-stream failed: {done['data']['error']}")
        qmp.execute("quit")
        qmp.close()
        proc.wait(timeout=30)
        return took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.exists(sock):
            os.unlink(sock)
