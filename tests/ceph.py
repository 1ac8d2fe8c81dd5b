"""A throw-away single-node Ceph cluster for tests, from Debian 12's packages.

One ceph-mon and one ceph-osd on memstore (RAM), no mgr, no cephx, the mon
on 127.0.0.1, every file (conf, mon store, osd dir, logs, sockets, pid
files) under one work directory.  RBD images are served over NBD by
qemu-nbd (qemu-block-extra's rbd driver), on a Unix socket or TCP.

    from ceph import CephCluster, ceph_cluster   # ceph_cluster: pytest fixture

    def test_remote(ceph_cluster):
        ceph_cluster.create_image("clone", 64 << 20)
        srv = ceph_cluster.serve_nbd("clone", sock)   # nbd+unix:///?socket=sock

Data lives in the OSD's memory: it survives qemu-nbd restarts, not stop().
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Iterator

import pytest

from helpers import free_port

BINARIES = ("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rbd", "qemu-nbd")
QEMU_MODULE_DIRS = ("/usr/lib/x86_64-linux-gnu/qemu", "/usr/lib/qemu", "/usr/lib64/qemu")


class CephError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def ceph_available() -> str | None:
    """None if a cluster can be started here, else a one-line reason."""
    for b in BINARIES:
        if shutil.which(b) is None:
            return f"{b} not installed (apt-get install ceph-mon ceph-osd ceph-common qemu-utils)"
    if not _qemu_has_rbd():
        return "qemu has no rbd block driver (apt-get install qemu-block-extra)"
    return None


def _qemu_has_rbd() -> bool:
    for d in QEMU_MODULE_DIRS:
        if glob.glob(os.path.join(d, "block-rbd.so")):
            return True
    if shutil.which("qemu-img"):  # a build with rbd compiled in lists it here
        try:
            out = subprocess.run(["qemu-img", "--help"], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        for line in out.splitlines():
            if line.startswith("Supported formats:"):
                return "rbd" in line.split()
    return False


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode(errors="replace")
    except OSError as e:
        return f"<{path}: {e.strerror}>"
    return "\n".join(data.splitlines()[-lines:])


_libc = None


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if the test process dies (no leaked daemons).

    Linux ties this to the *thread* that forked: start the cluster from the
    main thread (pytest fixtures do)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class CephCluster:
    """Single-node Ceph (1 mon + 1 memstore osd) in `workdir`, plus qemu-nbd servers."""

    def __init__(self, workdir: str, *, pool: str = "rbd", pg_num: int = 8,
                 memstore_bytes: int = 3 << 30, extra_conf: dict[str, object] | None = None,
                 die_with_parent: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.pool = pool
        self.pg_num = pg_num
        self.memstore_bytes = memstore_bytes
        self.extra_conf = dict(extra_conf or {})
        self.conf = os.path.join(self.workdir, "ceph.conf")
        self.log_dir = os.path.join(self.workdir, "log")
        self.run_dir = os.path.join(self.workdir, "run")
        self.fsid = str(uuid.uuid4())
        self.mon_port = 0
        self.osd_id: int | None = None
        self.osd_uuid = str(uuid.uuid4())
        self.mon: subprocess.Popen | None = None
        self.osd: subprocess.Popen | None = None
        self.servers: list[subprocess.Popen] = []
        self._nservers = 0
        self.timings: dict[str, float] = {}
        self._preexec = _die_with_parent if die_with_parent else None
        self._atexit = False

    # ----------------------------------------------------------------- conf
    @property
    def mon_addr(self) -> str:
        return f"v2:127.0.0.1:{self.mon_port}"

    def _write_conf(self) -> None:
        w = self.workdir
        glob_opts: dict[str, object] = {
            "fsid": self.fsid,
            "mon_host": f"[{self.mon_addr}]",
            "public_addr": "127.0.0.1",
            "cluster_addr": "127.0.0.1",
            "ms_bind_msgr1": "false",          # msgr2 only: one port per daemon
            "auth_cluster_required": "none",
            "auth_service_required": "none",
            "auth_client_required": "none",
            "keyring": f"{w}/keyring",         # never read (auth none); keeps /etc/ceph out
            "run_dir": self.run_dir,
            "pid_file": f"{self.run_dir}/$name.pid",
            "admin_socket": f"{self.run_dir}/$name.$pid.asok",
            "log_file": f"{self.log_dir}/$name.log",
            "mon_cluster_log_file": f"{self.log_dir}/$cluster.$channel.log",
            "crash_dir": f"{w}/crash",
            "mon_data": f"{w}/mon/$cluster-$id",
            "osd_data": f"{w}/osd/$cluster-$id",
            "client_mount_timeout": 30,
            # a SIGKILLed client's watch (every open rbd image has one) goes
            # after 10 s, not 30: `rbd rm`, exclusive-lock takeover wait for it
            "osd_client_watch_timeout": 10,
            "objecter_tick_interval": 1,       # clients ping their watches each tick
            "rados_mon_op_timeout": 60,
            # the mon: fast paxos rounds (OSD boot, pool and PG creation
            # each wait for one), no disk-space or redundancy nagging
            "paxos_propose_interval": 0.05,
            "mon_data_avail_crit": 1,
            "mon_data_avail_warn": 2,
            "mon_allow_pool_size_one": "true",
            "mon_allow_pool_delete": "true",
            "mon_warn_on_pool_no_redundancy": "false",
            "mon_max_pg_per_osd": 1000,
            # pools: one replica, few PGs, no autoscaler (there is no mgr)
            "osd_pool_default_size": 1,
            "osd_pool_default_min_size": 1,
            "osd_pool_default_pg_num": self.pg_num,
            "osd_pool_default_pgp_num": self.pg_num,
            "osd_pool_default_pg_autoscale_mode": "off",
            "osd_crush_chooseleaf_type": 0,
            # the OSD: in RAM, 2 cores
            "osd_objectstore": "memstore",
            "memstore_device_bytes": self.memstore_bytes,
            "osd_crush_initial_weight": 1,
            "osd_op_num_shards": 2,
            "osd_op_num_threads_per_shard": 1,
            "osd_fast_shutdown": "true",
            "osd_fast_shutdown_notify_mon": "false",  # else SIGTERM waits 5 s for the mon
        }
        glob_opts.update(self.extra_conf)
        lines = ["[global]"] + [f"{k} = {v}" for k, v in glob_opts.items()]
        # daemons: predictable socket names; clients (ceph, rbd, qemu-nbd): per pid
        lines += ["", "[mon]", f"admin_socket = {self.run_dir}/$name.asok",
                  "ms_bind_retry_count = 1           # one bind attempt: a taken port fails now, start() retries",
                  "", "[osd]", f"admin_socket = {self.run_dir}/$name.asok",
                  "", "[client]", f"admin_socket = {self.run_dir}/$name.$pid.asok",
                  f"log_file = {self.log_dir}/client.log", ""]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines))

    # -------------------------------------------------------------- helpers
    def _popen(self, args: list[str], logname: str) -> subprocess.Popen:
        with open(os.path.join(self.log_dir, logname), "ab") as log:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=self._preexec,
                                    cwd=self.workdir)

    def _run(self, args: list[str], timeout: float = 60, log: str | None = None) -> str:
        try:
            p = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                               cwd=self.workdir)
        except subprocess.TimeoutExpired as e:
            raise CephError(f"{' '.join(args)}: timed out after {timeout}s"
                            + self._log_tails(log)) from e
        if p.returncode != 0:
            raise CephError(f"{' '.join(args)}: exit {p.returncode}\n{p.stderr.strip()}"
                            + self._log_tails(log))
        return p.stdout

    def ceph(self, *args: str, timeout: float = 60) -> str:
        """Run the `ceph` CLI against this cluster; returns stdout."""
        return self._run(["ceph", "-c", self.conf, "--connect-timeout", str(int(timeout)),
                          *args], timeout=timeout + 5, log="mon.a.log")

    def rbd(self, *args: str, timeout: float = 60) -> str:
        """Run the `rbd` CLI against this cluster; returns stdout."""
        return self._run(["rbd", "-c", self.conf, *args], timeout=timeout, log="osd.0.log")

    def _log_tails(self, *names: str | None) -> str:
        out = []
        for n in names:
            if n:
                p = os.path.join(self.log_dir, n)
                out.append(f"\n--- tail of {p}:\n{_tail(p)}")
        return "".join(out)

    def _asok(self, name: str, command: dict) -> dict | None:
        """One admin-socket command straight over the socket; None if not there yet."""
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        try:
            s.connect(os.path.join(self.run_dir, f"{name}.asok"))
            s.sendall(json.dumps(command).encode() + b"\0")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return None
        finally:
            s.close()
        if len(data) < 4:
            return None
        try:
            return json.loads(data[4:4 + int.from_bytes(data[:4], "big")])
        except ValueError:
            return None

    def _wait(self, what: str, ready, proc: subprocess.Popen | None, log: str,
              timeout: float, interval: float = 0.02) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                raise CephError(f"{what}: process exited {proc.returncode}"
                                + self._log_tails(log, log.split(".")[0] + ".out"))
            if time.monotonic() > deadline:
                raise CephError(f"{what}: not ready after {timeout}s"
                                + self._log_tails(log, log.split(".")[0] + ".out"))
            time.sleep(interval)

    # ---------------------------------------------------------------- start
    def start(self, timeout: float = 60) -> "CephCluster":
        t0 = time.monotonic()
        for d in ("mon/ceph-a", "log", "run", "crash"):
            os.makedirs(os.path.join(self.workdir, d), exist_ok=True)
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        try:
            self._start_mon(timeout)
            t1 = time.monotonic()
            self.timings["mon"] = t1 - t0
            self._start_osd(timeout)
            t2 = time.monotonic()
            self.timings["osd"] = t2 - t1
            self._create_pool(timeout)
            self.timings["pool"] = time.monotonic() - t2
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _start_mon(self, timeout: float) -> None:
        mon_data = os.path.join(self.workdir, "mon", "ceph-a")
        for attempt in range(3):  # the free port can be taken before the mon binds it
            shutil.rmtree(mon_data, ignore_errors=True)
            os.makedirs(mon_data)
            self.mon_port = free_port()
            self._write_conf()
            monmap = os.path.join(self.workdir, "monmap")
            self._run(["monmaptool", "--create", "--clobber", "--fsid", self.fsid,
                       "--addv", "a", f"[{self.mon_addr}]", monmap], timeout=30)
            self._run(["ceph-mon", "-c", self.conf, "-i", "a", "--mkfs", "--monmap", monmap],
                      timeout=30, log="mon.a.log")
            self.mon = self._popen(["ceph-mon", "-c", self.conf, "-i", "a", "-f"], "mon.out")
            try:
                self._wait("ceph-mon in quorum", self._mon_leads, self.mon, "mon.a.log",
                           timeout)
                return
            except CephError:
                if attempt < 2 and self.mon.poll() is not None and \
                        "unable to bind" in _tail(os.path.join(self.log_dir, "mon.a.log")):
                    self.mon = None
                    continue
                raise

    def _mon_leads(self) -> bool:
        st = self._asok("mon.a", {"prefix": "mon_status"})
        return bool(st) and st.get("state") == "leader"

    def _start_osd(self, timeout: float) -> None:
        out = self.ceph("osd", "new", self.osd_uuid, timeout=timeout).strip()
        self.osd_id = int(out)
        osd_data = os.path.join(self.workdir, "osd", f"ceph-{self.osd_id}")
        os.makedirs(osd_data, exist_ok=True)
        name = f"osd.{self.osd_id}"
        # --osd-uuid must be the one given to `osd new`, or the OSD never boots
        self._run(["ceph-osd", "-c", self.conf, "-i", str(self.osd_id), "--mkfs",
                   "--osd-uuid", self.osd_uuid], timeout=timeout, log=f"{name}.log")
        self.osd = self._popen(["ceph-osd", "-c", self.conf, "-i", str(self.osd_id), "-f"],
                               "osd.out")

        def up() -> bool:  # the OSD says "active" once it sees itself up in the osdmap
            st = self._asok(name, {"prefix": "status"})
            return bool(st) and st.get("state") == "active"

        self._wait(f"{name} up", up, self.osd, f"{name}.log", timeout)

    def _create_pool(self, timeout: float) -> None:
        self.ceph("osd", "pool", "create", self.pool, str(self.pg_num), str(self.pg_num),
                  "replicated", timeout=timeout)
        # writes the pool's rbd_info object: returns once the PGs are active
        self.rbd("pool", "init", self.pool, timeout=timeout)

    # ---------------------------------------------------------------- images
    def image_spec(self, image: str) -> str:
        """qemu's filename for `image` (rbd:POOL/IMAGE:conf=CONF)."""
        return f"rbd:{self.pool}/{image}:conf={self.conf}"

    def create_image(self, name: str, size: int,
                     features: str = "layering,exclusive-lock,object-map,fast-diff") -> None:
        """`rbd create` of `size` bytes in the pool.

        qemu's rbd driver answers block_status (NBD base:allocation) only
        with fast-diff (which needs object-map and exclusive-lock); without
        it everything reads as allocated data.  The price: a SIGKILLed
        qemu-nbd keeps the lock until its watch times out (10 s here), so
        use kill_server(), which also frees the lock.  features="layering":
        no locks, no holes in block_status."""
        self.rbd("create", f"{self.pool}/{name}", "--size", f"{size}B",
                 "--image-feature", features)

    def image_size(self, name: str) -> int:
        return int(json.loads(self.rbd("info", "--format", "json",
                                       f"{self.pool}/{name}"))["size"])

    def _qemu_nbd(self, image: str, where: list[str], cache: str, extra: list[str],
                  timeout: float, ready=lambda: True) -> subprocess.Popen:
        if self.mon is None:
            raise CephError("cluster not started")
        self._nservers += 1
        n = self._nservers
        pid_file = os.path.join(self.run_dir, f"qemu-nbd.{n}.pid")
        log_path = os.path.join(self.log_dir, f"qemu-nbd.{image}.{n}.out")
        args = ["qemu-nbd", "--format=raw", "--shared=8", "--persistent",
                f"--cache={cache}", "--discard=unmap", f"--pid-file={pid_file}",
                *where, *extra, self.image_spec(image)]
        proc = self._popen(args, os.path.basename(log_path))
        proc.log_path = log_path  # type: ignore[attr-defined]
        proc.image = image  # type: ignore[attr-defined]
        self.servers.append(proc)
        # qemu-nbd binds its socket *before* opening the image and writes the
        # pid file after the export is set up, just before its main loop
        deadline = time.monotonic() + timeout
        while True:
            try:
                written = os.path.getsize(pid_file) > 0
            except OSError:
                written = False
            if written and ready():
                return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                state = (f"exited {proc.returncode}" if proc.poll() is not None
                         else f"not ready after {timeout}s")
                self.stop_server(proc, 0.5)
                raise CephError(f"qemu-nbd {state}\n--- {log_path}:\n{_tail(log_path)}"
                                + self._log_tails("client.log"))
            time.sleep(0.01)

    def serve_nbd(self, image: str, socket_path: str, *, cache: str = "writeback",
                  extra_args: list[str] = (), timeout: float = 30) -> subprocess.Popen:
        """qemu-nbd serving the image on a Unix socket; returns once it serves.

        Several clients at once (--shared=8), stays up when they leave
        (--persistent), NBD TRIM and WRITE_ZEROES deallocate (--discard=unmap).
        cache=writeback (qemu-nbd's default) turns librbd's cache on; an NBD
        FLUSH becomes rbd_flush, which returns once the OSD has the data, and
        FUA writes are flushed too.  cache=none: librbd cache off, every write
        is on the OSD before its reply (FLUSH then has nothing to do)."""
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        return self._qemu_nbd(image, ["--socket", socket_path], cache, list(extra_args),
                              timeout, lambda: os.path.exists(socket_path))

    def stop_server(self, proc: subprocess.Popen, grace: float = 1.0) -> None:
        """SIGTERM (qemu-nbd flushes and closes the image), SIGKILL after `grace`."""
        self._kill([proc], grace, resend=True)
        if proc in self.servers:
            self.servers.remove(proc)

    def kill_server(self, proc: subprocess.Popen) -> None:
        """SIGKILL qemu-nbd (a crash: librbd's unflushed cache is lost), then
        blocklist the image's leftover watchers, so that the next qemu-nbd
        gets the exclusive lock and `rbd rm` works at once instead of after
        osd_client_watch_timeout.  Only when no other server has that image."""
        proc.kill()
        proc.wait()
        if proc in self.servers:
            self.servers.remove(proc)
        image = getattr(proc, "image", None)
        if image is None or any(getattr(p, "image", None) == image and p.poll() is None
                                for p in self.servers):
            return
        self.break_watchers(image)

    def break_watchers(self, image: str) -> list[str]:
        """Blocklist every client watching `image` (call when none is alive)."""
        st = json.loads(self.rbd("status", "--format", "json", f"{self.pool}/{image}"))
        addrs = [w["address"] for w in st.get("watchers", [])]
        for a in addrs:
            self.ceph("osd", "blocklist", "add", a)
        return addrs

    # ----------------------------------------------------------------- stop
    @staticmethod
    def _kill(procs: list[subprocess.Popen | None], grace: float, resend: bool = False) -> None:
        """SIGTERM, wait up to `grace` s, then SIGKILL.

        resend: SIGTERM again every 50 ms -- qemu-nbd loses a SIGTERM that
        arrives before its main loop starts (it sets state = RUNNING there)."""
        live = [p for p in procs if p is not None and p.poll() is None]
        deadline = time.monotonic() + grace
        sent = 0.0
        while live:
            now = time.monotonic()
            if now >= deadline:
                break
            if sent == 0.0 or (resend and now - sent >= 0.05):
                for p in live:
                    try:
                        p.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                sent = now
            time.sleep(0.005)
            live = [p for p in live if p.poll() is None]
        for p in live:
            p.kill()
        for p in procs:
            if p is not None:
                p.wait()

    def stop(self) -> float:
        """Stop qemu-nbd servers, then the OSD, then the mon. Returns seconds taken."""
        t0 = time.monotonic()
        # servers first: closing an rbd image needs the OSD
        self._kill(self.servers, 1.0, resend=True)
        self.servers = []
        self._kill([self.osd], 1.0)   # fast shutdown: _exit at once
        self._kill([self.mon], 1.0)
        self.osd = self.mon = None
        if self._atexit:
            atexit.unregister(self.stop)
            self._atexit = False
        self.timings["stop"] = time.monotonic() - t0
        return self.timings["stop"]

    def __enter__(self) -> "CephCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def ceph_cluster(tmp_path_factory) -> Iterator[CephCluster]:
    """A started CephCluster for the module (skips when Ceph is not installed).

    Lives in a short /tmp/lcceph* directory (Unix socket paths < 108 bytes),
    removed afterwards unless LUNCLONE_KEEP_CEPH is set."""
    reason = ceph_available()
    if reason:
        pytest.skip(reason)
    workdir = tempfile.mkdtemp(prefix="lcceph", dir="/tmp")
    cluster = CephCluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        took = cluster.stop()
        print(f"\nceph_cluster teardown {took:.3f}s")
        if not os.environ.get("LUNCLONE_KEEP_CEPH"):
            shutil.rmtree(workdir, ignore_errors=True)
