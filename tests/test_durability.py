"""Durability of names: every file or directory the daemon creates or
removes in its state directory is followed by an fsync of the directory
that holds the name, before the command that made it is answered.

Without it a power cut can lose a new volume (or the whole ``volumes/``
directory) or bring back a deleted one, though its data was fsynced.  The
real daemon runs under ``strace -f -y``; the trace gives the order of the
name changes, the directory fsyncs and the control replies.
"""
from __future__ import annotations

import os
import re
import shutil
import signal

import pytest

from helpers import Daemon

TRACED = ("mkdir,mkdirat,open,openat,unlink,unlinkat,rename,renameat,renameat2,"
          "fsync,fdatasync,sendto")
# SQLite's own side files: it dir-syncs the WAL it creates; the -shm index is
# rebuilt at open, and the WAL it removes at a clean close was checkpointed.
SQLITE_SIDE = ("-wal", "-shm", "-journal")

_LINE = re.compile(r"^(\d+) +(.*)$")  # strace pads the pid to 5 columns
_CALL = re.compile(r"^(\w+)\((.*)\) += (-?\d+)")
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD_PATH = re.compile(r"^\d+<(.*)>$")


class Call:
    def __init__(self, name: str, args: str, ret: int, start: int, end: int):
        self.name, self.args, self.ret, self.start, self.end = name, args, ret, start, end

    def path_args(self) -> list[str]:
        return [os.path.normpath(s) for s in _STR.findall(self.args)]

    def fd_path(self) -> str | None:
        m = _FD_PATH.match(self.args.split(",")[0].strip())
        return os.path.normpath(m.group(1)) if m else None


def parse(trace: str) -> list[Call]:
    """One Call per syscall; an <unfinished ...> call starts at its first line
    and ends at its 'resumed' line."""
    calls, pending = [], {}
    for i, line in enumerate(trace.splitlines()):
        m = _LINE.match(line)
        if not m:
            continue
        pid, rest = m.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (i, rest[:-len("<unfinished ...>")].rstrip())
            continue
        start = i
        r = re.match(r"^<\.\.\. \w+ resumed>(.*)$", rest)
        if r and pid in pending:
            start, head = pending.pop(pid)
            rest = head + r.group(1)
        c = _CALL.match(rest)
        if c:
            calls.append(Call(c.group(1), c.group(2), int(c.group(3)), start, i))
    return calls


def name_changes(calls: list[Call], state_dir: str) -> list[tuple[Call, str]]:
    """(call, path) of each name made or removed at or under ``state_dir``."""
    seen_create: set[str] = set()
    out = []
    for c in calls:
        if c.ret < 0:
            continue
        paths = [p for p in c.path_args()
                 if (p == state_dir or p.startswith(state_dir + "/"))
                 and not p.endswith(SQLITE_SIDE)]
        if not paths:
            continue
        if c.name in ("mkdir", "mkdirat", "unlink", "unlinkat"):
            out.append((c, paths[-1]))
        elif c.name.startswith("rename"):
            out.extend((c, p) for p in paths)
        elif c.name in ("open", "openat") and "O_CREAT" in c.args and paths[-1] not in seen_create:
            seen_create.add(paths[-1])  # the state dir starts empty: the first O_CREAT creates
            out.append((c, paths[-1]))
    return out


def unsynced(calls: list[Call], state_dir: str) -> list[str]:
    """Name changes with no fsync of their directory after them and before
    the next control reply (or the end of the trace)."""
    replies = [c.start for c in calls
               if c.name == "sendto" and ('{\\"ok\\"' in c.args or '{\\"error\\"' in c.args)]
    syncs = [(c.start, c.fd_path()) for c in calls if c.name in ("fsync", "fdatasync")]
    bad = []
    for c, path in name_changes(calls, state_dir):
        parent = os.path.dirname(path)
        deadline = min((r for r in replies if r > c.end), default=float("inf"))
        if not any(c.end < s < deadline and p == parent for s, p in syncs):
            bad.append(f"{c.name} {path}: no fsync of {parent} before the reply")
    return bad


@pytest.fixture
def traced_daemon(workdir):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    trace = os.path.join(workdir, "trace")
    # the state directory does not exist yet: `serve` makes it
    d = Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run"),
               prefix=["strace", "-f", "-qq", "-y", "-s", "48", "-o", trace,
                       "-e", f"trace={TRACED}"])
    d.start(timeout=60)
    yield d, trace
    if d.proc.poll() is None:
        stop_traced(d)


def stop_traced(d: Daemon) -> int:
    """SIGTERM the daemon itself (strace's child), as systemd would; strace
    exits with it."""
    with open(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children") as f:
        for pid in f.read().split():
            os.kill(int(pid), signal.SIGTERM)
    return d.proc.wait(timeout=60)


def test_names_in_the_state_dir_are_durable_before_the_reply(traced_daemon):
    d, trace = traced_daemon
    d.cli("create", "gone", "--size", "4M")
    d.cli("create", "kept", "--size", "4M")
    d.cli("clone", "create", "kept", "kc")
    d.cli("clone", "delete", "kc")
    d.cli("delete", "gone")
    assert stop_traced(d) == 0, d.log()
    with open(trace) as f:
        text = f.read()
    calls = parse(text)
    state = os.path.normpath(d.state_dir)
    changes = [p for _, p in name_changes(calls, state)]
    # the trace saw what the test did (else the check below proves nothing)
    for p in ("volumes", "lock", "lunclone.db", "volumes/gone.img", "volumes/kc.img"):
        assert os.path.join(state, p) in changes, (p, changes, len(text), text[:600])
    assert sum(c.name.startswith("unlink") and p.endswith("gone.img")
               for c, p in name_changes(calls, state)) == 1
    bad = unsynced(calls, state)
    assert not bad, "\n".join(bad)
