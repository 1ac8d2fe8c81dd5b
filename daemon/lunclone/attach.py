"""Attach a volume as a block device (CLI side).

With the kernel NBD module: /dev/nbdX through the kernel's netlink
interface, with one or more connections and a supervisor process that
reconnects the device when the daemon restarts (kernel_attach.py).
Without it (build machines, containers): ``nbdfuse`` exposes the export
as a file and a loop device makes it a block device; a daemon restart then
fails I/O, and attach says so.  What was made is recorded in
``RUN_DIR/attach/`` so ``detach`` and ``status`` can find it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from .errors import Busy, InvalidArgument, LuncloneError, NotFound

DEFAULT_CONNECTIONS = 1
MAX_CONNECTIONS = 16


def _run(argv: list[str], what: str) -> str:
    if shutil.which(argv[0]) is None:
        raise LuncloneError(f"{argv[0]} is not installed; run scripts/setup or "
                            f"apt-get install {_PACKAGE.get(argv[0], argv[0])}")
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise LuncloneError(f"{what} failed: {msg[-1] if msg else 'exit ' + str(p.returncode)}")
    return p.stdout.strip()


_PACKAGE = {"nbdfuse": "libnbd-bin", "losetup": "util-linux", "fusermount3": "fuse3",
            "modprobe": "kmod"}


def kernel_nbd_missing() -> str | None:
    """Why the kernel's NBD client cannot be used here, or None."""
    if not os.path.exists("/sys/module/nbd") and (
            shutil.which("modprobe") is None
            or subprocess.run(["modprobe", "nbd"], capture_output=True).returncode != 0
            or not os.path.exists("/sys/module/nbd")):
        return "no kernel NBD module (modprobe nbd failed)"
    from .netlink_nbd import IMPORT_ERROR
    if IMPORT_ERROR is not None:
        return f"pyroute2 is missing ({IMPORT_ERROR}; apt-get install python3-pyroute2)"
    return None


def _record_path(run_dir: str, device: str) -> str:
    return os.path.join(run_dir, "attach", os.path.basename(device) + ".json")


def _write_record(run_dir: str, rec: dict) -> None:
    path = _record_path(run_dir, rec["device"])
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)


@contextlib.contextmanager
def _attach_lock(run_dir: str) -> Iterator[int]:
    """One attach at a time per run directory: find, connect and record
    are one step (two attaches of a volume would make two devices).
    Yields the lock's fd: a forked child must close it, or it holds the lock."""
    fd = os.open(os.path.join(run_dir, "attach", ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _load_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def records(run_dir: str) -> list[dict]:
    """What lunclone attached from this run directory."""
    d = os.path.join(run_dir, "attach")
    found = (_load_record(os.path.join(d, entry))
             for entry in (sorted(os.listdir(d)) if os.path.isdir(d) else [])
             if entry.endswith(".json"))
    return [rec for rec in found if rec is not None]


def attachments(run_dir: str) -> dict[str, list[dict]]:
    """By volume: the devices attached from this run directory and their
    state (``status`` shows them).  A kernel device is "attached" while the
    kernel has its configuration (NBD_CMD_STATUS) under our identifier."""
    out: dict[str, list[dict]] = {}
    for rec in records(run_dir):
        item = {"device": rec["device"], "kind": rec["kind"],
                "connections": rec.get("connections", 1),
                "supervised": _alive(rec.get("supervisor") or rec.get("pid"),
                                     rec.get("supervisor_start"))}
        item["state"] = "attached" if _still_attached(rec) else "gone"
        out.setdefault(rec["name"], []).append(item)
    return out


def _still_attached(rec: dict) -> bool:
    if rec["kind"] != "netlink":
        return os.path.exists(f"/sys/block/{os.path.basename(rec['device'])}/loop")
    from . import netlink_nbd as nl
    index = _device_index(rec["device"])
    try:
        configured = any(c for i, c in nl.status(index) if i == index)
    except (nl.NbdUnavailable, nl.NbdError):
        configured = False
    return configured and nl.backend_of(index) == rec["backend"]


def attach(run_dir: str, name: str, device: str | None = None,
           connections: int = DEFAULT_CONNECTIONS, foreground: bool = False,
           ready: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> str:
    """Attach volume ``name``; ``ready(device)`` is called once it is usable.

    Kernel path: the supervisor then runs in this process (``foreground``,
    for the systemd unit) or in a child that outlives it.  Fallback: the
    fuse and loop device, and ``warn`` says what it lacks."""
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise InvalidArgument(f"--connections must be 1 to {MAX_CONNECTIONS}, not {connections}")
    os.makedirs(os.path.join(run_dir, "attach"), mode=0o755, exist_ok=True)
    why = kernel_nbd_missing()
    if why is not None:
        if device:
            raise InvalidArgument(f"{why}: attach picks a loop device itself; omit DEVICE")
        warn(f"{why}: attaching through nbdfuse and a loop device instead; "
             "a daemon restart will fail its I/O")
        dev, rec = _attach_fuse_loop(run_dir, name, os.path.join(run_dir, "nbd.sock"))
        _write_record(run_dir, rec)
        ready(dev)
        return dev
    return _attach_kernel(run_dir, name, device, connections, foreground, ready)


def _device_index(device: str) -> int:
    base = os.path.basename(device)
    if not (base.startswith("nbd") and base[3:].isdigit()):
        raise InvalidArgument(f"{device} is not an NBD device (/dev/nbdN)")
    return int(base[3:])


def _attach_kernel(run_dir: str, name: str, device: str | None, connections: int,
                   foreground: bool, ready: Callable[[str], None]) -> str:
    from . import kernel_attach as ka
    backend = ka.backend_identifier(ka.served_state_dir(run_dir), name)
    with _attach_lock(run_dir) as lock_fd:
        index = ka.find_device(backend)
        if index is not None:
            rec = _read_record(run_dir, f"/dev/nbd{index}")
            if not foreground or (rec and _alive(rec.get("supervisor"),
                                                 rec.get("supervisor_start"))):
                raise Busy(f"{name} is attached already as /dev/nbd{index}; "
                           f"'lunclone detach /dev/nbd{index}' first")
            connections = rec["connections"] if rec else connections   # the unit takes it over
        else:
            index = ka.connect(run_dir, name, backend, connections,
                               _device_index(device) if device else None)
        dev = f"/dev/nbd{index}"
        rec = {"kind": "netlink", "name": name, "device": dev, "backend": backend,
               "connections": connections}
        sup = ka.Supervisor(run_dir, name, index, backend, connections)
        pid = os.getpid() if foreground else _spawn_supervisor(run_dir, sup, lock_fd)
        _write_record(run_dir, dict(rec, supervisor=pid, supervisor_start=_proc_start(pid)))
    if foreground:
        logging.basicConfig(level=logging.INFO, format="%(message)s")   # to the journal
        sup.run(ready=lambda: ready(dev))
    else:
        ready(dev)
    return dev


def _spawn_supervisor(run_dir: str, sup, lock_fd: int) -> int:
    """A child in its own session that outlives the CLI; logs to
    RUN_DIR/attach/nbdN.log."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    try:
        os.close(lock_fd)
        os.setsid()
        logfile = os.path.join(run_dir, "attach", f"nbd{sup.index}.log")
        fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                            format="%(asctime)s %(message)s")
        sup.run()
        code = 0
    except BaseException:
        logging.exception("supervisor of /dev/nbd%d failed", sup.index)
        code = 1
    os._exit(code)


def _proc_start(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): with the pid,
    it names one process, so a reused pid is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int | None, start: str | None = None) -> bool:
    if not pid:
        return False
    now = _proc_start(pid)
    return now is not None and (start is None or now == start)


def _read_record(run_dir: str, device: str) -> dict | None:
    return _load_record(_record_path(run_dir, device))


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
    rec = _read_record(run_dir, device)
    if rec is None:
        raise NotFound(f"{device} was not attached by lunclone "
                       f"(no {_record_path(run_dir, device)})")
    _check_unused(device)
    if rec["kind"] == "netlink":
        _detach_kernel(rec)
    else:
        _run(["losetup", "-d", device], f"losetup -d {device}")
        subprocess.run(["fusermount3", "-u", rec["mount"]], capture_output=True)
        if not _wait_gone(rec["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec["pid"], signal.SIGTERM)
    os.unlink(_record_path(run_dir, device))


def _check_unused(device: str) -> None:
    """Detaching a device in use would fail its I/O: refuse."""
    if _mounted(device):
        raise Busy(f"{device} is mounted; unmount it first")
    holders = os.path.join("/sys/block", os.path.basename(device), "holders")
    users = os.listdir(holders) if os.path.isdir(holders) else []
    if users:
        raise Busy(f"{device} is in use by {', '.join(sorted(users))} "
                   "(LVM, dm-crypt or md); stop that first")


def _detach_kernel(rec: dict) -> None:
    """Stop the supervisor first (for good), so it cannot reconnect what
    we end."""
    from . import netlink_nbd as nl
    pid = rec.get("supervisor")
    if pid and pid != os.getpid() and _alive(pid, rec.get("supervisor_start")):
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid):
            os.kill(pid, signal.SIGKILL)       # e.g. stuck in a handshake with a hung daemon
            _wait_gone(pid)
    index = _device_index(rec["device"])
    if nl.backend_of(index) == rec["backend"]:
        try:
            nl.disconnect(index)
        except nl.NbdError as e:
            raise LuncloneError(str(e)) from None


def _mounted(device: str) -> bool:
    real = os.path.realpath(device)
    with open("/proc/mounts") as f:
        return any(os.path.realpath(line.split()[0]) == real for line in f if line.startswith("/"))


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    """Whether ``pid`` exited within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
