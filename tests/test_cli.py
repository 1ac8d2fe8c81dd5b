"""The CLI and daemon contract: bad input, one line, nothing changed."""
import json
import os
import stat
import subprocess

import pytest

from helpers import LUNCLONE, Daemon


def one_error_line(p):
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def state_snapshot(daemon):
    vols = sorted(os.listdir(os.path.join(daemon.state_dir, "volumes")))
    return vols, daemon.json("list")


@pytest.mark.parametrize("args,words", [
    (["create", "a/b", "--size", "1M"], "invalid name"),
    (["create", "..", "--size", "1M"], "invalid name"),
    (["create", "x" * 300, "--size", "1M"], "invalid name"),
    (["create", "v2", "--size", "0"], "greater than zero"),
    (["create", "v2", "--size", "1000"], "multiple of 4096"),
    (["create", "v2", "--size", "lots"], "cannot parse size"),
    (["create", "v2", "--size", "1M", "--extent-size", "3K"], "power of two"),
    (["create", "v2", "--size", "1M", "--extent-size", "2M"], "power of two"),
    (["create", "v1", "--size", "1M"], "exists already"),
    (["delete", "nope"], "no volume named"),
    (["status", "nope"], "no volume named"),
])
def test_bad_input_one_line_nothing_changed(daemon, args, words):
    daemon.cli("create", "v1", "--size", "1M")
    before = state_snapshot(daemon)
    line = one_error_line(daemon.cli(*args, check=False))
    assert words in line
    assert state_snapshot(daemon) == before


def test_no_daemon_says_how_to_start(workdir):
    p = subprocess.run([LUNCLONE, "list", "--run-dir", workdir], capture_output=True, text=True)
    line = one_error_line(p)
    assert "lunclone serve" in line


def test_status_json_contract(daemon):
    daemon.cli("create", "v", "--size", "8M", "--extent-size", "4K")
    s = daemon.json("status", "v")
    for key in ("name", "size", "extent_size", "export", "clones", "restore"):
        assert key in s
    assert s["size"] == 8 << 20 and s["extent_size"] == 4096
    assert s["export"] == daemon.uri("v") and s["restore"] is None and s["clones"] == []
    assert [v["name"] for v in daemon.json("list")] == ["v"]
    human = daemon.cli("status").stdout
    assert "v:" in human and "export" in human


def test_sparse_file_and_delete(daemon):
    daemon.cli("create", "big", "--size", "10G")
    st = os.stat(daemon.volume_path("big"))
    assert st.st_size == 10 << 30 and st.st_blocks == 0
    daemon.cli("delete", "big")
    assert not os.path.exists(daemon.volume_path("big"))
    assert daemon.json("list") == []


def test_delete_refused_while_connected(daemon):
    daemon.cli("create", "v", "--size", "1M")
    h = daemon.connect("v")
    line = one_error_line(daemon.cli("delete", "v", check=False))
    assert "connection" in line
    del h


def test_second_daemon_on_same_state_dir_refused(daemon, workdir):
    other_run = os.path.join(workdir, "run2")
    p = subprocess.run([LUNCLONE, "serve", "--state-dir", daemon.state_dir,
                        "--run-dir", other_run], capture_output=True, text=True, timeout=30)
    line = one_error_line(p)
    assert "in use by another lunclone daemon" in line


def test_sigterm_clean_shutdown_removes_sockets(daemon):
    daemon.cli("create", "v", "--size", "1M")
    mode = stat.S_IMODE(os.stat(os.path.join(daemon.run_dir, "control.sock")).st_mode)
    assert mode == 0o600
    assert daemon.stop() == 0
    assert not os.path.exists(os.path.join(daemon.run_dir, "control.sock"))
    assert not os.path.exists(daemon.nbd_socket)
    daemon.start()  # and it comes back with its volume
    assert [v["name"] for v in daemon.json("list")] == ["v"]


def test_restart_after_sigkill_removes_stale_sockets(daemon):
    daemon.cli("create", "v", "--size", "1M")
    daemon.kill()
    assert os.path.exists(daemon.nbd_socket)
    daemon.start()
    assert daemon.connect("v").get_size() == 1 << 20


def test_corrupt_database_refuses_to_start(workdir):
    state = os.path.join(workdir, "state")
    os.makedirs(state)
    with open(os.path.join(state, "lunclone.db"), "wb") as f:
        f.write(b"not a database at all" * 100)
    d = Daemon(state, os.path.join(workdir, "run"))
    with pytest.raises(RuntimeError) as e:
        d.start()
    assert "not a lunclone metadata database" in str(e.value)


def test_damaged_map_pages_refuse_to_start_in_one_line(workdir):
    """Header, schema and meta intact, the maps' b-tree page overwritten:
    serve's quick look passes, the engine's quick_check refuses in one
    line, and the file is left as it was."""
    import sqlite3
    d = Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run")).start()
    d.cli("create", "v", "--size", "1M")
    assert d.stop() == 0
    path = os.path.join(d.state_dir, "lunclone.db")
    db = sqlite3.connect(path)
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name='bitmaps'").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek(4096 * (root - 1))
        f.write(b"\xa5" * 4096)
    before = open(path, "rb").read()
    with pytest.raises(RuntimeError) as e:
        d.start()
    lines = [ln for ln in str(e.value).splitlines() if "lunclone.db" in ln]
    assert len(lines) == 1 and "corrupt" in lines[0], str(e.value)
    assert open(path, "rb").read() == before


def test_control_socket_survives_bad_requests(daemon):
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(daemon.run_dir, "control.sock"))
    f = s.makefile("rb")
    for bad in (b"not json\n", b'{"cmd": 5}\n', b'{"cmd": "create", "args": {"bogus": 1}}\n',
                b'{"cmd": "nope"}\n'):
        s.sendall(bad)
        assert "error" in json.loads(f.readline())
    s.sendall(b'{"cmd": "list"}\n')
    assert json.loads(f.readline()) == {"ok": []}
    s.close()
