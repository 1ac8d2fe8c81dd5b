"""The control command ``wait`` (a long poll on a volume's jobs) and the
CLI's ``--wait`` / ``--watch --until-done`` built on it: they return when
the job ends, not by polling; a restore that pauses on an error ends
``restore --wait`` with one error line."""
import os
import shutil
import subprocess
import threading
import time

import pytest

from helpers import LUNCLONE, MiB, fractured_clone, restore_status, wait_for, whole
from lunclone.client import Client
from lunclone.errors import InvalidArgument, NotFound


def slow_restore(daemon) -> None:
    """``src`` with 8 MiB to restore from ``c1``, started at 64 KiB/s (two minutes)."""
    h = fractured_clone(daemon, 16 * MiB, 8 * MiB)
    h.pwrite(os.urandom(8 * MiB), 0)
    h.flush()
    del h
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")


def timed_wait(daemon, **args) -> tuple[dict, float]:
    with Client(daemon.run_dir) as c:
        t0 = time.monotonic()
        v = c.call("wait", **args)
        return v, time.monotonic() - t0


def test_wait_returns_at_its_timeout_while_the_job_runs_and_at_the_end(daemon):
    slow_restore(daemon)
    v, took = timed_wait(daemon, name="src", timeout=0.5)
    assert v["restore"]["state"] == "running" and took >= 0.45
    assert v["name"] == "src" and "clones" in v  # the status of the volume
    answer = {}

    def waiter():
        answer["v"], answer["took"] = timed_wait(daemon, name="src", timeout=30)
    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # the job still runs: the wait holds
    daemon.cli("restore", "rate", "src", "0")  # unlimited: it ends in well under a second
    t.join(40)
    assert answer["v"]["restore"]["state"] == "done"
    assert answer["took"] < 10  # the end, not the 30 s timeout
    # No job runs: answered at once.
    v, took = timed_wait(daemon, name="src", timeout=30)
    assert v["restore"]["state"] == "done" and took < 10


def test_wait_on_a_clones_sync(daemon):
    daemon.cli("create", "src", "--size", "16M")
    h = daemon.connect("src")
    h.pwrite(os.urandom(8 * MiB), 0)
    h.flush()
    del h
    daemon.cli("clone", "create", "src", "c1")
    v = wait_for(lambda: (lambda s: s if s["clones"][0]["state"] == "synchronized" else None)(
        timed_wait(daemon, name="src", timeout=30)[0]), 60, what="c1 synchronized")
    assert v["clones"][0]["delta_extents"] == 0


def test_restore_wait_exits_zero_when_done(daemon):
    slow_restore(daemon)
    p = daemon.cli("restore", "src", "--from", "c1", "--wait", check=False)
    assert p.returncode == 1 and "already being restored" in p.stderr  # refused, one line
    assert len(p.stderr.strip().splitlines()) == 1
    daemon.cli("restore", "rate", "src", "0")
    daemon.cli("status", "src", "--watch", "--until-done")
    assert restore_status(daemon, "src")["state"] == "done"
    daemon.cli("clone", "create", "src", "c2", "--wait")
    assert [c["state"] for c in daemon.json("status", "src")["clones"]] == \
        ["fractured", "synchronized"]
    # A second restore, waited for.
    h = daemon.connect("src")
    h.pwrite(os.urandom(2 * MiB), 0)
    h.flush()
    p = daemon.cli("restore", "src", "--from", "c1", "--wait")
    assert p.returncode == 0 and "done" in p.stderr.strip().splitlines()[-1]
    assert restore_status(daemon, "src")["state"] == "done"
    assert whole(h, 16 * MiB) == whole(daemon.connect("c1"), 16 * MiB)


def test_status_watch_until_done_returns_at_the_end(daemon):
    slow_restore(daemon)
    p = subprocess.Popen([LUNCLONE, "status", "src", "--watch", "--until-done",
                          "--run-dir", daemon.run_dir],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert p.poll() is None  # the restore runs: it watches
        daemon.cli("restore", "rate", "src", "0")
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "done" in err.strip().splitlines()[-1]


def test_restore_wait_fails_with_one_line_when_the_restore_pauses_on_an_error(
        small_daemon, small_fs):
    d = small_daemon
    h = fractured_clone(d, 32 * MiB, 16 * MiB)
    h.trim(16 * MiB, 0)  # the source loses its data: the restore needs space
    h.flush()
    del h
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb") as f:
        f.write(b"\xff" * (shutil.disk_usage(small_fs).free - 2 * MiB))
    p = subprocess.run([LUNCLONE, "restore", "src", "--from", "c1", "--wait",
                        "--run-dir", d.run_dir], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0] == p.stderr.strip().splitlines()[-1], p.stderr
    assert errors[0].startswith("lunclone: error: restore of src paused: copy failed:")
    assert "restore resume src" in errors[0]
    r = restore_status(d, "src")
    assert r["state"] == "paused" and r["error"]
    # The wait command answers at once too: nothing runs until 'restore resume'.
    v, took = timed_wait(d, name="src", timeout=30)
    assert v["restore"]["state"] == "paused" and took < 10
    os.unlink(filler)
    d.cli("restore", "resume", "src")
    d.cli("status", "src", "--watch", "--until-done")
    assert restore_status(d, "src")["state"] == "done"


@pytest.mark.parametrize("args,err,words", [
    (dict(name="nope"), NotFound, "no volume named"),
    (dict(name="a/b"), InvalidArgument, "invalid name"),
    (dict(name=5), InvalidArgument, "invalid name"),
    (dict(name="src", timeout=0), InvalidArgument, "timeout"),
    (dict(name="src", timeout=-1), InvalidArgument, "timeout"),
    (dict(name="src", timeout=61), InvalidArgument, "timeout"),
    (dict(name="src", timeout="1"), InvalidArgument, "timeout"),
    (dict(name="src", timeout=True), InvalidArgument, "timeout"),
    (dict(name="src", timeout=1, bogus=1), InvalidArgument, "bad arguments"),
    (dict(), InvalidArgument, "bad arguments"),
])
def test_wait_bad_arguments_one_line_daemon_unaffected(daemon, args, err, words):
    daemon.cli("create", "src", "--size", "1M")
    before = daemon.json("list")
    with Client(daemon.run_dir) as c:
        with pytest.raises(err) as e:
            c.call("wait", **args)
        assert words in e.value.message and "\n" not in e.value.message
        assert c.call("wait", name="src", timeout=0.1)["name"] == "src"  # the connection goes on
    assert daemon.json("list") == before
