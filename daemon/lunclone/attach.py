"""Attach a volume as a block device (CLI side).

With the kernel NBD module: ``nbd-client`` onto /dev/nbdX, through a small
nbdkit proxy with the retry filter, so that a daemon restart pauses the
filesystem's I/O instead of failing it.  Without it (build
machines, containers): ``nbdfuse`` exposes the export as a file and a loop
device makes it a block device.  What was made is recorded in
``RUN_DIR/attach/`` so ``detach`` can undo it.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import time

from .errors import Busy, InvalidArgument, LuncloneError, NotFound


def _run(argv: list[str], what: str) -> str:
    if shutil.which(argv[0]) is None:
        raise LuncloneError(f"{argv[0]} is not installed; run scripts/setup or "
                            f"apt-get install {_PACKAGE.get(argv[0], argv[0])}")
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise LuncloneError(f"{what} failed: {msg[-1] if msg else 'exit ' + str(p.returncode)}")
    return p.stdout.strip()


_PACKAGE = {"nbd-client": "nbd-client", "nbdfuse": "libnbd-bin", "losetup": "util-linux",
            "fusermount3": "fuse3", "modprobe": "kmod"}


def kernel_nbd_available() -> bool:
    if os.path.exists("/sys/module/nbd"):
        return True
    if shutil.which("modprobe") is None:
        return False
    return subprocess.run(["modprobe", "nbd"], capture_output=True).returncode == 0 and \
        os.path.exists("/sys/module/nbd")


def _free_nbd_device() -> str:
    for path in sorted(glob.glob("/sys/block/nbd*"), key=lambda p: int(p[14:])):
        if not os.path.exists(os.path.join(path, "pid")):
            return "/dev/" + os.path.basename(path)
    raise Busy("every /dev/nbdX is in use; detach one or load nbd with more nbds_max")


def _record_path(run_dir: str, device: str) -> str:
    return os.path.join(run_dir, "attach", os.path.basename(device) + ".json")


def attach(run_dir: str, name: str, device: str | None = None) -> str:
    sock = os.path.join(run_dir, "nbd.sock")
    os.makedirs(os.path.join(run_dir, "attach"), mode=0o755, exist_ok=True)
    if kernel_nbd_available():
        dev = device or _free_nbd_device()
        if os.path.exists(f"/sys/block/{os.path.basename(dev)}/pid"):
            raise Busy(f"{dev} is busy; pick another device or 'lunclone detach {dev}'")
        proxy = _start_retry_proxy(run_dir, name, sock, os.path.basename(dev))
        try:
            _run(["nbd-client", "-unix", proxy, "-N", name, "-timeout", "300", dev],
                 f"nbd-client {dev}")
        except BaseException:
            _stop_proxy(run_dir, os.path.basename(dev))
            raise
        rec = {"kind": "nbd", "name": name, "device": dev}
    else:
        if device:
            raise InvalidArgument("no kernel NBD module here: attach picks a loop device itself; "
                                  "omit DEVICE")
        dev, rec = _attach_fuse_loop(run_dir, name, sock)
    with open(_record_path(run_dir, dev), "w") as f:
        json.dump(rec, f)
    return dev


def _start_retry_proxy(run_dir: str, name: str, sock: str, devname: str) -> str:
    """nbdkit's nbd plugin with the retry filter between the kernel client
    and the daemon: a daemon restart cuts the proxy's connection, not the
    kernel's; the proxy reconnects and retries, so the filesystem above
    sees a pause, not an I/O error."""
    base = os.path.join(run_dir, "attach", devname)
    proxy, pidfile = base + ".sock", base + ".pid"
    for stale in (proxy, pidfile):
        if os.path.exists(stale):
            os.unlink(stale)
    _run(["nbdkit", "--unix", proxy, "--pidfile", pidfile, "--filter=retry",
          "nbd", f"socket={sock}", f"export={name}",
          "retries=60", "retry-delay=1", "retry-exponential=no"], "nbdkit retry proxy")
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile):
        if time.monotonic() > deadline:
            raise LuncloneError("the retry proxy did not start")
        time.sleep(0.05)
    return proxy


def _stop_proxy(run_dir: str, devname: str) -> None:
    pidfile = os.path.join(run_dir, "attach", devname + ".pid")
    try:
        pid = int(open(pidfile).read().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _wait_gone(pid)
    for path in (pidfile, pidfile[:-4] + ".sock"):
        if os.path.exists(path):
            os.unlink(path)


def _attach_fuse_loop(run_dir: str, name: str, sock: str) -> tuple[str, dict]:
    mnt = os.path.join(run_dir, "attach", f"fuse-{name}")
    if os.path.ismount(mnt):
        raise Busy(f"{name} is attached already (see 'losetup -l'); detach it first")
    os.makedirs(mnt, exist_ok=True)
    if shutil.which("nbdfuse") is None:
        raise LuncloneError("nbdfuse is not installed; apt-get install libnbd-bin")
    proc = subprocess.Popen(["nbdfuse", mnt, f"nbd+unix:///{name}?socket={sock}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    node = os.path.join(mnt, "nbd")
    deadline = time.monotonic() + 15
    while not os.path.exists(node):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise LuncloneError(f"nbdfuse failed: {err[-1] if err else 'exit ' + str(proc.returncode)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise LuncloneError("nbdfuse did not come up in 15 s")
        time.sleep(0.05)
    dev = _run(["losetup", "--find", "--show", node], "losetup")
    return dev, {"kind": "fuse-loop", "name": name, "device": dev, "mount": mnt, "pid": proc.pid}


def detach(run_dir: str, device: str) -> None:
    path = _record_path(run_dir, device)
    try:
        with open(path) as f:
            rec = json.load(f)
    except FileNotFoundError:
        raise NotFound(f"{device} was not attached by lunclone (no {path})") from None
    if _mounted(device):
        raise Busy(f"{device} is mounted; unmount it first")
    if rec["kind"] == "nbd":
        _run(["nbd-client", "-d", device], f"nbd-client -d {device}")
        _stop_proxy(run_dir, os.path.basename(device))
    else:
        _run(["losetup", "-d", device], f"losetup -d {device}")
        subprocess.run(["fusermount3", "-u", rec["mount"]], capture_output=True)
        _wait_gone(rec["pid"])
    os.unlink(path)


def _mounted(device: str) -> bool:
    real = os.path.realpath(device)
    with open("/proc/mounts") as f:
        return any(os.path.realpath(line.split()[0]) == real for line in f if line.startswith("/"))


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
