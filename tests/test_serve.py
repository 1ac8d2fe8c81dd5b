"""`lunclone serve` start-up: every refusal is one line, never a traceback."""
import fcntl
import glob
import os
import sqlite3
import subprocess
import sys

import pytest

from helpers import LUNCLONE, ROOT, Daemon


def serve(state: str, run: str, *extra: str, env: dict | None = None):
    return subprocess.run([LUNCLONE, "serve", "--state-dir", state, "--run-dir", run, *extra],
                          capture_output=True, text=True, timeout=60, env=env)


def refused_in_one_line(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1, p.stderr
    return lines[0]


def garbage_db(state: str) -> None:
    with open(os.path.join(state, "lunclone.db"), "wb") as f:
        f.write(b"not a database at all" * 100)


def foreign_db(state: str) -> None:
    db = sqlite3.connect(os.path.join(state, "lunclone.db"))
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.commit()
    db.close()


@pytest.mark.parametrize("damage,words", [
    (garbage_db, "not a lunclone metadata database"),
    (foreign_db, "not a lunclone metadata database"),
])
def test_damaged_database_refused_in_one_line(workdir, damage, words):
    state = os.path.join(workdir, "state")
    os.makedirs(state)
    damage(state)
    before = sorted(os.listdir(state))
    line = refused_in_one_line(serve(state, os.path.join(workdir, "run")))
    assert words in line
    assert sorted(os.listdir(state)) == before  # nothing written beside it


def test_engine_refusal_is_one_line_too(workdir):
    """The engine's own check, behind `serve`'s: nbdkit run directly."""
    from lunclone.serve import plugin_path
    state = os.path.join(workdir, "state")
    os.makedirs(state)
    garbage_db(state)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "daemon"), PATH="/usr/bin:/usr/sbin:/bin")
    p = subprocess.run(["nbdkit", "--foreground", "--unix", os.path.join(workdir, "nbd.sock"),
                        "python", plugin_path(), f"state_dir={state}",
                        f"run_dir={os.path.join(workdir, 'run')}"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert "not a lunclone metadata database" in refused_in_one_line(p)


def test_locked_state_dir_refused_in_one_line(workdir):
    state = os.path.join(workdir, "state")
    os.makedirs(state)
    fd = os.open(os.path.join(state, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        line = refused_in_one_line(serve(state, os.path.join(workdir, "run")))
    finally:
        os.close(fd)
    assert "in use by another lunclone daemon (pid 4242)" in line


@pytest.mark.parametrize("args,words", [
    (["--remote-depth", "0"], "--remote-depth"),
    (["--bogus"], "no such option"),
    (["--tcp", "localhost", "--insecure"], "HOST:PORT"),
    (["--tcp", "127.0.0.1:10809"], "--tls-psk"),
    (["--group", "no-such-group-here"], "no group named"),
    (["--state-dir", "/etc/passwd"], "/etc/passwd"),
    (["--run-dir", "/proc/no-such-dir"], "/proc/no-such-dir"),
])
def test_bad_option_refused_in_one_line(workdir, args, words):
    p = serve(os.path.join(workdir, "state"), os.path.join(workdir, "run"), *args)
    assert words.lower() in refused_in_one_line(p).lower()


def test_missing_volume_file_served_with_error(workdir):
    d = Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run")).start()
    try:
        d.cli("create", "gone", "--size", "1M")
        d.cli("create", "kept", "--size", "1M")
        assert d.stop() == 0
        os.unlink(d.volume_path("gone"))
        d.start()
        vols = {v["name"]: v for v in d.json("list")}
        assert "No such file" in vols["gone"]["error"]
        assert vols["kept"]["error"] is None
        h = d.connect("kept")
        h.pwrite(b"x" * 4096, 0)
        assert h.pread(4096, 0) == b"x" * 4096
        del h
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.log()


# -- the caller's Python environment does not reach nbdkit's interpreter ----

PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"  # nbdkit's libpython


def fake_python_prefix(workdir: str) -> str:
    """A bin/ with a `python3` whose prefix looks like a Python of our version
    (the landmark lib/pythonX.Y/os.py) but holds no usable standard library."""
    prefix = os.path.join(workdir, "otherpython")
    os.makedirs(os.path.join(prefix, "lib", PYVER, "lib-dynload"))
    open(os.path.join(prefix, "lib", PYVER, "os.py"), "w").close()
    os.makedirs(os.path.join(prefix, "bin"))
    exe = os.path.join(prefix, "bin", "python3")
    with open(exe, "w") as f:
        f.write("#!/bin/sh\nexit 1\n")
    os.chmod(exe, 0o755)
    return os.path.join(prefix, "bin")


def pyenv_bin(workdir: str) -> str:
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(os.path.join(root, "versions", PYVER[6:] + ".*", "bin")))
    if not found:
        pytest.skip(f"no pyenv {PYVER} here")
    return found[-1]


def serves_a_volume(d: Daemon) -> None:
    try:
        d.start()
        d.cli("create", "v", "--size", "1M")
        h = d.connect("v")
        h.pwrite(b"z" * 8192, 4096)
        assert h.pread(8192, 4096) == b"z" * 8192
        del h
    finally:
        assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("other", [fake_python_prefix, pyenv_bin])
def test_serve_with_another_python_first_in_path(workdir, monkeypatch, other):
    monkeypatch.setenv("PATH", other(workdir) + os.pathsep + os.environ["PATH"])
    serves_a_volume(Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run")))


def test_serve_ignores_python_home_and_venv_variables(workdir):
    """PYTHONHOME would kill any Python started with it, the `lunclone` CLI's
    own too; the CLI runs here with -E (as a launcher immune to it would), so
    the variables still reach `serve`, which must not pass them to nbdkit."""
    bogus = os.path.join(workdir, "bogus")
    launcher = ("import sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[2:]; "
                "from lunclone.cli import run; run()")
    prefix = ["env", f"PYTHONHOME={bogus}", f"PYTHONSTARTUP={bogus}/startup.py",
              f"VIRTUAL_ENV={bogus}", f"PYTHONUSERBASE={bogus}", f"PYTHONPLATLIBDIR={bogus}",
              sys.executable, "-E", "-c", launcher, os.path.join(ROOT, "daemon")]
    serves_a_volume(Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run"),
                           prefix=prefix))
