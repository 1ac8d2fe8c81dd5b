"""Faults injected for real: a full filesystem, a clone that returns EIO,
damaged or missing volume files, admins racing each other.  The daemon
stops the affected operation, says why, loses nothing and serves the rest."""
import os
import re
import shutil
import subprocess
import time

import nbd
import pytest

from helpers import LUNCLONE, MiB, fractured_clone, wait_clone_state, wait_for, whole


def fill_up(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\xff" * size)


def test_write_on_full_disk_gets_enospc_and_loses_nothing(small_daemon):
    d = small_daemon
    d.cli("create", "v", "--size", "128M")
    h = d.connect("v")
    acked = []
    with pytest.raises(nbd.Error) as e:
        for k in range(128):
            data = bytes([k + 1]) * MiB
            h.pwrite(data, k * MiB)
            h.flush()
            acked.append(k)
    assert e.value.errno == "ENOSPC", e.value
    del e  # its traceback holds the handle, and nbdkit waits for its clients
    assert len(acked) > 10
    for k in acked:
        assert h.pread(MiB, k * MiB) == bytes([k + 1]) * MiB
    # Space freed by trimming: writes go on.
    for k in acked[: len(acked) // 2]:
        h.trim(MiB, k * MiB)
    h.pwrite(b"\x42" * MiB, 100 * MiB)
    h.flush()
    del h
    d.stop()
    d.start()
    h = d.connect("v")
    assert h.pread(MiB, 100 * MiB) == b"\x42" * MiB
    k = acked[-1]
    assert h.pread(MiB, k * MiB) == bytes([k + 1]) * MiB


def test_sync_on_full_disk_stops_then_resumes(small_daemon, small_fs):
    d = small_daemon
    d.cli("create", "src", "--size", "64M")
    h = d.connect("src")
    h.pwrite(os.urandom(20 * MiB), 0)
    h.flush()
    filler = os.path.join(small_fs, "filler")
    fill_up(filler, 20 * MiB)
    d.cli("clone", "create", "src", "c1")
    err = wait_for(lambda: d.json("status", "src")["clones"][0]["error"], 60,
                   what="the sync to stop on ENOSPC")
    assert "No space" in err or "space" in err
    assert d.json("status", "src")["clones"][0]["state"] == "synchronizing"
    os.unlink(filler)
    d.cli("clone", "sync", "c1")
    wait_clone_state(d, "src", "c1", "synchronized")
    assert whole(d.connect("c1"), 64 * MiB) == whole(h, 64 * MiB)


def test_restore_on_full_disk_pauses_then_resumes(small_daemon, small_fs):
    d = small_daemon
    h = fractured_clone(d, 32 * MiB, 16 * MiB)
    h.trim(16 * MiB, 0)  # the source loses its data
    h.flush()
    clone_data = whole(d.connect("c1"), 32 * MiB)
    free = shutil.disk_usage(small_fs).free
    filler = os.path.join(small_fs, "filler")
    fill_up(filler, free - 2 * MiB)
    d.cli("restore", "src", "--from", "c1")
    r = wait_for(lambda: (d.json("status", "src")["restore"] or {}).get("error"), 60,
                 what="the restore to pause on ENOSPC")
    status = d.json("status", "src")["restore"]
    assert status["state"] == "paused" and "space" in r
    # what the LuncloneRestorePausedOnError and ...NearlyFull alerts read
    metrics = d.cli("metrics").stdout
    assert 'lunclone_restore_error{source="src",clone="c1"} 1' in metrics
    avail = float(re.search(r"^lunclone_state_dir_avail_bytes (\S+)$", metrics, re.M).group(1))
    size = float(re.search(r"^lunclone_state_dir_size_bytes (\S+)$", metrics, re.M).group(1))
    assert avail / size < 0.10
    # The host still reads the clone's data everywhere: a read of an extent
    # not copied yet takes it from the clone and needs no space.
    assert h.pread(MiB, 15 * MiB) == clone_data[15 * MiB:16 * MiB]
    os.unlink(filler)
    d.cli("restore", "resume", "src")
    wait_for(lambda: d.json("status", "src")["restore"]["state"] == "done", 60)
    assert whole(h, 32 * MiB) == clone_data


def test_clone_read_errors_pause_restore_and_fail_only_those_requests(daemon, workdir):
    """The clone is served by nbdkit's error filter through nbdfuse; reads
    fail while a trigger file exists."""
    from blockdev import missing_prerequisite
    why = missing_prerequisite()
    if why:
        pytest.skip(why)
    d = daemon
    h = fractured_clone(d, 16 * MiB, 16 * MiB)
    h.pwrite(os.urandom(12 * MiB), 0)  # 12 MiB to restore
    h.flush()
    clone_data = whole(d.connect("c1"), 16 * MiB)
    del h
    assert d.stop() == 0
    # Put the clone's file behind nbdkit --filter=error and nbdfuse.
    real = os.path.join(workdir, "c1-real.img")
    shutil.move(d.volume_path("c1"), real)
    trigger = os.path.join(workdir, "fail-now")
    sock = os.path.join(workdir, "err.sock")
    srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "--filter=error", "file", real,
                            "error=EIO", "error-pread-rate=100%", f"error-file={trigger}"])
    fuse = os.path.join(workdir, "errfuse")
    os.makedirs(fuse)
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    fp = subprocess.Popen(["nbdfuse", fuse, f"nbd+unix:///?socket={sock}"])
    try:
        wait_for(lambda: os.path.exists(os.path.join(fuse, "nbd")), 15)
        os.symlink(os.path.join(fuse, "nbd"), d.volume_path("c1"))
        d.start()
        open(trigger, "w").close()
        d.cli("restore", "src", "--from", "c1")
        err = wait_for(lambda: (d.json("status", "src")["restore"] or {}).get("error"), 60,
                       what="the restore to pause on EIO")
        assert d.json("status", "src")["restore"]["state"] == "paused" and "error" in err
        h = d.connect("src")
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, 0)  # pending: needs the clone
        assert e.value.errno == "EIO"
        del e
        assert h.pread(4096, 14 * MiB) == clone_data[14 * MiB:14 * MiB + 4096]  # not pending
        h.pwrite(b"new" * 1000, 15 * MiB)  # other requests are served
        os.unlink(trigger)
        d.cli("restore", "resume", "src")
        wait_for(lambda: d.json("status", "src")["restore"]["state"] == "done", 60)
        expect = bytearray(clone_data)
        expect[15 * MiB:15 * MiB + 3000] = b"new" * 1000
        assert whole(h, 16 * MiB) == bytes(expect)
        del h
        d.stop()
    finally:
        subprocess.run(["fusermount3", "-u", fuse])
        try:
            fp.wait(10)
        except subprocess.TimeoutExpired:  # busy under load: detach it lazily
            subprocess.run(["fusermount3", "-uz", fuse])
            fp.wait(30)
        srv.terminate()
        srv.wait(10)


def test_missing_or_wrong_size_volume_files_refused_others_served(daemon):
    d = daemon
    for name in ("gone", "short", "fine"):
        d.cli("create", name, "--size", "4M")
    d.connect("fine").pwrite(b"ok" * 100, 0)
    assert d.stop() == 0
    os.unlink(d.volume_path("gone"))
    os.truncate(d.volume_path("short"), 1 * MiB)
    d.start()
    st = {v["name"]: v for v in d.json("list")}
    assert "missing" in st["gone"]["error"] or "No such file" in st["gone"]["error"]
    assert "expected" in st["short"]["error"]
    assert st["fine"]["error"] is None
    assert d.connect("fine").pread(4, 0) == b"okok"
    with pytest.raises(nbd.Error):
        d.connect("short")
    assert os.path.getsize(d.volume_path("short")) == 1 * MiB  # never rewritten
    p = d.cli("status", "gone", check=False)
    assert p.returncode == 0 and "ERROR" in p.stdout


def test_clone_whose_source_vanished(daemon):
    d = daemon
    d.cli("create", "src", "--size", "4M")
    d.cli("clone", "create", "src", "c1")
    wait_clone_state(d, "src", "c1", "synchronized")
    d.cli("create", "other", "--size", "4M")
    assert d.stop() == 0
    os.unlink(d.volume_path("src"))
    d.start()
    st = {v["name"]: v for v in d.json("list")}
    assert st["src"]["error"] and st["c1"]["error"]
    assert "source" in st["c1"]["error"]
    assert d.connect("other").get_size() == 4 * MiB


def test_concurrent_restores_exactly_one_wins(daemon):
    d = daemon
    h = fractured_clone(d, 16 * MiB, 8 * MiB)
    h.pwrite(os.urandom(8 * MiB), 0)
    procs = [subprocess.Popen([LUNCLONE, "restore", "src", "--from", "c1", "--rate", "1M",
                               "--run-dir", d.run_dir], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 1], results
    loser = [r for r in results if r[2] == 1][0]
    assert "already being restored" in loser[1]
    d.cli("restore", "rate", "src", "0")
    wait_for(lambda: d.json("status", "src")["restore"]["state"] == "done", 60)


@pytest.mark.parametrize("name", ["a/b", "..", "a\0b", "x" * 300, "-rf", "a b"])
def test_hostile_names(daemon, name):
    p = subprocess.run([LUNCLONE, "create", name, "--size", "1M", "--run-dir", daemon.run_dir],
                       capture_output=True, text=True) if "\0" not in name else None
    if p is None:  # argv cannot carry NUL: send it over the control socket
        import json
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.path.join(daemon.run_dir, "control.sock"))
        s.sendall(json.dumps({"cmd": "create", "args": {"name": name, "size": "1M"}}).encode()
                  + b"\n")
        reply = json.loads(s.makefile().readline())
        s.close()
        assert reply["error"]["code"] == "invalid"
    else:
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert daemon.json("list") == []
    assert os.listdir(os.path.join(daemon.state_dir, "volumes")) == []
