"""``lunclone status NAME --map`` (issue 18, item 4) drawn in a real
terminal: tmux runs the CLI, ``capture-pane`` reads what an admin sees,
and the grid is checked against the daemon's maps."""
import random
import re
import shlex
import subprocess
import time

import pytest

from helpers import (LUNCLONE, fractured_then_damaged, read_bitmap, wait_for,
                     wait_restore_done, which_or_skip)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
COLUMNS, LINES = 100, 30
WIDTH = COLUMNS - 1
CELLS = WIDTH * min(LINES - 4, 32)


@pytest.fixture
def tmux(workdir):
    """Run a command in a detached tmux session of COLUMNS x LINES; yields
    a function (command, env) -> the pane's text (with escapes) once the
    command has ended."""
    which_or_skip(pytest, "tmux")
    sock = f"{workdir}/tmux.sock"
    sessions = []

    def run(command: str, env: str = "", timeout: float = 60.0) -> str:
        name = f"s{len(sessions)}"
        sessions.append(name)
        script = f"{env} {command}; echo '<<ended>>'; sleep 600"
        subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-s", name, "-x", str(COLUMNS),
                        "-y", str(LINES), "bash", "-c", script], check=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["tmux", "-S", sock, "capture-pane", "-p", "-e", "-t", name],
                                 capture_output=True, text=True, check=True).stdout
            if "<<ended>>" in out:
                return out.split("<<ended>>")[0]
            time.sleep(0.1)
        raise AssertionError(f"tmux: {command} did not end")
    yield run
    subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)


def grid_of(text: str) -> tuple[str, str, str]:
    """(header, the grid's cells in order, legend) of a drawn map."""
    lines = [ANSI.sub("", ln) for ln in text.rstrip("\n").splitlines() if ln.strip()]
    assert all(len(ln) <= WIDTH for ln in lines[1:-1]), "a row wider than the terminal"
    return lines[0], "".join(lines[1:-1]), lines[-1]


def test_restore_map_in_a_terminal_is_the_daemons_maps(daemon, tmux):
    clone_data, src = fractured_then_damaged(daemon, random.Random(8))
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    src.pwrite(b"h" * 4096, 0)  # a host write: protected
    daemon.cli("restore", "pause", "src")  # the picture holds still

    def drawn_is_stored() -> bool:  # once a copy that was in flight is committed
        src.flush()  # a flush waits for the full commit
        m = daemon.json("status", "src", "--map")
        pending = read_bitmap(daemon.state_dir, "src", "pending")
        return {i for i, ch in enumerate(m["cells"]) if ch == "#"} == \
            {i // m["extents_per_cell"] for i in pending}
    wait_for(drawn_is_stored, 10, what="the paused restore's maps committed")
    cmd = f"{shlex.quote(LUNCLONE)} status src --map --run-dir {shlex.quote(daemon.run_dir)}"
    coloured = tmux(cmd)
    plain = tmux(cmd, env="NO_COLOR=1")
    assert "\x1b[" in coloured and "\x1b[" not in plain  # colours only without NO_COLOR
    head, cells, legend = grid_of(coloured)
    assert grid_of(plain) == (head, cells, legend)
    assert head.startswith("src: restore map, ") and "pending" in legend
    assert daemon.json("status", "src", "--map")["cells"] == cells and len(cells) <= CELLS
    assert cells[0] == "w" and "#" in cells
    piped = daemon.cli("status", "src", "--map").stdout  # not a terminal: no colours
    assert "\x1b[" not in piped


def test_watch_until_done_ends_with_the_restore(daemon, tmux):
    fractured_then_damaged(daemon, random.Random(9))
    daemon.cli("restore", "src", "--from", "c1", "--rate", "1M")
    out = tmux(f"{shlex.quote(LUNCLONE)} status src --map --watch --until-done --interval 0.2"
               f" --run-dir {shlex.quote(daemon.run_dir)}")
    wait_restore_done(daemon, "src")
    assert "the restore from c1 is done: no extent pending" in ANSI.sub("", out)


def test_clone_map_is_where_it_differs(daemon, tmux):
    fractured_then_damaged(daemon, random.Random(10))
    out = tmux(f"{shlex.quote(LUNCLONE)} status c1 --map --run-dir "
               f"{shlex.quote(daemon.run_dir)}")
    head, cells, legend = grid_of(out)
    assert head.startswith("c1: difference map") and "may differ" in legend
    per = daemon.json("status", "c1", "--map")["extents_per_cell"]
    delta = read_bitmap(daemon.state_dir, "c1", "delta")
    assert {i for i, ch in enumerate(cells) if ch == "#"} == {i // per for i in delta}


def test_map_refusals(daemon):
    daemon.cli("create", "v", "--size", "1M")
    r = daemon.cli("status", "--map", check=False)
    assert r.returncode == 2 and "--map needs a volume NAME" in r.stderr
    r = daemon.cli("status", "nope", "--map", check=False)
    assert r.returncode == 1 and "no volume named 'nope'" in r.stderr
    assert "no map to draw" in daemon.cli("status", "v", "--map").stdout
