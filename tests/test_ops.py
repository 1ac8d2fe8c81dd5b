"""Operations: units, attach/detach, metrics, TLS, control socket modes."""
import glob
import grp
import os
import secrets
import shutil
import stat
import subprocess
import time

import nbd
import pytest

from blockdev import missing_prerequisite
from lunclone.attach import kernel_nbd_missing
from helpers import LUNCLONE, ROOT, Daemon, MiB, free_port, wait_clone_state


def test_systemd_units_verify():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    units = sorted(glob.glob(os.path.join(ROOT, "systemd", "*")))
    assert len(units) >= 4
    # The units name /usr/bin/lunclone, which scripts/install provides; point
    # verify at a temporary copy naming this checkout's lunclone instead.
    tmp = os.path.join("/tmp", f"lcunits-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    try:
        for u in units:
            text = open(u).read().replace("/usr/bin/lunclone", LUNCLONE)
            with open(os.path.join(tmp, os.path.basename(u)), "w") as f:
                f.write(text)
        names = [os.path.join(tmp, os.path.basename(u)) for u in units]
        names = [n.replace("@.service", "@vol1.service") if n.endswith("@.service") else n
                 for n in names]
        if os.path.exists(os.path.join(tmp, "lunclone-attach@.service")):
            shutil.copy(os.path.join(tmp, "lunclone-attach@.service"),
                        os.path.join(tmp, "lunclone-attach@vol1.service"))
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], capture_output=True, text=True)
        problems = [l for l in (p.stderr + p.stdout).splitlines()
                    if "lunclone" in l and "Failed to" not in l.split(":")[0]]
        assert p.returncode == 0, p.stderr + p.stdout
        assert not problems, problems
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_metrics_timer_cannot_cancel_a_stop_of_the_daemon():
    """lunclone-metrics.service, started by its timer every 15 s, must not
    put a job on lunclone.service: a Requisite= (or Requires=, BindsTo=)
    adds one, which replaces a pending stop job, and `systemctl stop
    lunclone` fails with "Job for lunclone.service canceled" (seen in the
    trixie VM).  Ordering alone (After=) and a condition add no job."""
    text = open(os.path.join(ROOT, "systemd", "lunclone-metrics.service")).read()
    deps = [line for line in text.splitlines()
            if line.split("=")[0].strip() in ("Requires", "Requisite", "BindsTo", "Wants",
                                              "PartOf", "Upholds")]
    assert not deps, f"the metrics unit puts a job on the daemon: {deps}"
    assert "After=lunclone.service" in text


def test_attach_mkfs_mount_detach(daemon, workdir):
    why = missing_prerequisite()
    if why:
        pytest.skip(why)
    daemon.cli("create", "vol", "--size", "64M")
    attached = daemon.cli("attach", "vol")
    dev = attached.stdout.strip()
    assert dev.startswith("/dev/")
    if kernel_nbd_missing():   # the fallback says what it lacks and what it costs
        assert "no kernel NBD module" in attached.stderr
        assert "a daemon restart will fail its I/O" in attached.stderr
    st = daemon.json("status", "vol")
    assert [(a["device"], a["state"]) for a in st["attached"]] == [(dev, "attached")]
    mnt = os.path.join(workdir, "mnt")
    os.makedirs(mnt)
    payload = os.urandom(MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    subprocess.run(["mount", dev, mnt], check=True)
    with open(os.path.join(mnt, "f.bin"), "wb") as f:
        f.write(payload)
    busy = daemon.cli("detach", dev, check=False)
    assert busy.returncode != 0 and "mounted" in busy.stderr
    subprocess.run(["umount", mnt], check=True)
    daemon.cli("detach", dev)
    # The data is on the volume: read the filesystem through libnbd.
    h = daemon.connect("vol")
    image = h.pread(64 * MiB, 0)
    assert payload[:4096] in image
    p = daemon.cli("detach", dev, check=False)
    assert p.returncode != 0 and "not attached by lunclone" in p.stderr


def test_attach_unknown_volume(daemon):
    p = daemon.cli("attach", "nope", check=False)
    assert p.returncode != 0 and "no volume named" in p.stderr


def test_metrics_parse(daemon):
    prom = pytest.importorskip("prometheus_client.parser")
    daemon.cli("create", "src", "--size", "4M")
    h = daemon.connect("src")
    for k in range(200):
        h.pwrite(b"x" * 4096, (k % 64) * 4096)
        h.pread(4096, 0)
    daemon.cli("clone", "create", "src", "c1")
    wait_clone_state(daemon, "src", "c1", "synchronized")
    daemon.cli("clone", "fracture", "c1")
    daemon.cli("restore", "src", "--from", "c1", "--wait")
    text = daemon.cli("metrics").stdout
    fams = {f.name: f for f in prom.text_string_to_metric_families(text)}
    req = {(s.labels["volume"], s.labels["op"]): s.value
           for s in fams["lunclone_requests"].samples if s.name == "lunclone_requests_total"}
    assert req[("src", "write")] >= 200 and req[("src", "read")] >= 200
    assert "lunclone_request_latency_seconds" in fams
    states = {s.labels["state"]: s.value for s in fams["lunclone_clone_state"].samples}
    assert states["fractured"] == 1
    assert any(s.labels["state"] == "done" and s.value == 1
               for s in fams["lunclone_restore_state"].samples)


def test_tcp_requires_tls_and_refuses_client_without_key(workdir):
    d = Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run"))
    port = free_port()
    plain = subprocess.run([LUNCLONE, "serve", "--state-dir", d.state_dir, "--run-dir",
                            d.run_dir, "--tcp", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=30)
    assert plain.returncode != 0 and "--insecure" in plain.stderr
    psk = os.path.join(workdir, "keys.psk")
    with open(psk, "w") as f:
        f.write(f"alice:{secrets.token_hex(32)}\n")
    os.chmod(psk, 0o600)
    log = open(d.log_path, "ab")
    d.proc = subprocess.Popen([LUNCLONE, "serve", "--state-dir", d.state_dir, "--run-dir",
                               d.run_dir, "--tcp", f"127.0.0.1:{port}", "--tls-psk", psk],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not d._answers():
            assert time.monotonic() < deadline and d.proc.poll() is None, d.log()
            time.sleep(0.05)
        d.cli("create", "v", "--size", "4M")
        assert d.json("status", "v")["export"] == f"nbds://127.0.0.1:{port}/v"
        bare = nbd.NBD()
        with pytest.raises(nbd.Error):
            bare.connect_uri(f"nbd://127.0.0.1:{port}/v")
        other = os.path.join(workdir, "other.psk")
        with open(other, "w") as f:
            f.write(f"alice:{secrets.token_hex(32)}\n")
        wrong = nbd.NBD()
        wrong.set_uri_allow_local_file(True)
        with pytest.raises(nbd.Error):
            wrong.connect_uri(f"nbds://alice@127.0.0.1:{port}/v?tls-psk-file={other}")
        good = nbd.NBD()
        good.set_uri_allow_local_file(True)
        good.connect_uri(f"nbds://alice@127.0.0.1:{port}/v?tls-psk-file={psk}")
        good.pwrite(b"tls!" * 1024, 0)
        assert good.pread(4, 0) == b"tls!"
        del good, bare, wrong
    finally:
        assert d.stop() == 0


def test_control_socket_group_mode(workdir):
    group = grp.getgrgid(0).gr_name
    d = Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run"))
    log = open(d.log_path, "ab")
    d.proc = subprocess.Popen([LUNCLONE, "serve", "--state-dir", d.state_dir, "--run-dir",
                               d.run_dir, "--group", group], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not d._answers():
            assert time.monotonic() < deadline and d.proc.poll() is None, d.log()
            time.sleep(0.05)
        st = os.stat(os.path.join(d.run_dir, "control.sock"))
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 0
        assert stat.S_IMODE(os.stat(d.run_dir).st_mode) == 0o755
    finally:
        assert d.stop() == 0
    p = subprocess.run([LUNCLONE, "serve", "--state-dir", d.state_dir, "--run-dir", d.run_dir,
                        "--group", "no-such-group-x"], capture_output=True, text=True)
    assert p.returncode != 0 and "no group named" in p.stderr
