"""Two hosts made of network namespaces, joined by a veth link, for tests that
need a real network: a lunclone daemon on the "client" host, NBD servers on
the "storage" host, TCP and TLS between them, added latency and a link cut.

Everything lives in namespaces created here: the addresses (a /30 of
10.251.0.0/16), the link, the servers and every packet.  Nothing touches the
root namespace's interfaces, addresses or routes.

    with NetworkHosts() as net:
        d = Daemon(state, run, prefix=net.exec_prefix(net.client_ns)).start()
        uri = net.serve_file_tls(img, 10809, psk)     # nbds://lunclone@ADDR:10809/?tls-psk-file=
        net.python(net.client_ns, CODE, uri)         # a script on the client host
        with net.latency(2) as lat:                  # +2 ms round trip
            print(lat.how); use(lat.uri)             # lat.uri, not uri (relay port)
        net.cut(); ...; net.heal()
        d.stop()                                     # before the namespaces go

Namespaces, veth, addresses, link state and netem go through pyroute2.
Processes run in a namespace through ``ip netns exec NS`` (which execs the
command, so the Popen pid is the command itself) in a new session, so that
their whole process group can be killed.
"""
from __future__ import annotations

import errno
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
DELAY_RELAY = os.path.join(HERE, "delay_relay.py")
NETNS_DIR = "/var/run/netns"
SUBNET_BASE = (10, 251)          # 10.251.0.0/16, cut into /30s
PSK_USER = "lunclone"

try:                              # pyroute2 is a test dependency: the import must not break
    import pyroute2               # collection of the other tests when it is missing
    from pyroute2 import IPRoute
    from pyroute2 import netns as pr_netns
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.rtnl import TC_H_ROOT
except ImportError as e:          # pragma: no cover
    pyroute2 = None
    _IMPORT_ERROR = e


def ns_route(ns: str):
    """An IPRoute inside namespace ``ns``: pyroute2 0.9's IPRoute(netns=),
    or, on Debian's 0.7 (bookworm's 0.7.2, trixie's 0.7.7), its NetNS."""
    try:
        return IPRoute(netns=ns, flags=0)
    except TypeError:             # pyroute2 < 0.9
        from pyroute2 import NetNS
        return NetNS(ns, flags=0)


_unavailable: list[str | None] = []


def unavailable_reason() -> str | None:
    """None when NetworkHosts can work here, else why not (for pytest.skip).

    Tries to create (and removes) a throwaway namespace; the answer is cached."""
    if _unavailable:
        return _unavailable[0]
    reason = None
    if pyroute2 is None:
        reason = f"network namespaces: pyroute2 is not installed ({_IMPORT_ERROR})"
    elif sys.platform != "linux":
        reason = f"network namespaces need Linux, this is {sys.platform}"
    elif os.geteuid() != 0:
        reason = f"network namespaces need root (euid is {os.geteuid()})"
    elif shutil.which("ip") is None:
        reason = "network namespaces: the `ip` command (iproute2) is not installed"
    elif shutil.which("nbdkit") is None:
        reason = "network namespaces: nbdkit is not installed"
    else:
        name = f"lcx-{secrets.token_hex(3)}"
        try:
            pr_netns.create(name)
            with ns_route(name) as ipr:
                ipr.link("add", ifname="lcx-a", kind="veth", peer={"ifname": "lcx-b"})
        except Exception as e:
            reason = f"cannot create a network namespace with a veth pair: {e!r}"
        finally:
            try:
                pr_netns.remove(name)
            except OSError:
                pass
    _unavailable.append(reason)
    return reason


def _enter(path: str) -> None:
    """setns(2) for the calling thread: pyroute2 0.9 forks unless told not
    to; Debian's 0.7 has no such argument and never forks."""
    try:
        pr_netns.setns(path, flags=0, fork=False)
    except TypeError:             # pyroute2 < 0.9
        pr_netns.setns(path, flags=0)


def _socket_in(ns: str, family=socket.AF_INET, type=socket.SOCK_STREAM) -> socket.socket:
    """A socket that belongs to namespace ``ns``: made by a short-lived thread
    that enters ``ns`` (setns changes only the calling thread's namespace)."""
    out: dict = {}

    def run():
        try:
            _enter(os.path.join(NETNS_DIR, ns))
            out["sock"] = socket.socket(family, type)
        except BaseException as e:      # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=run, name=f"setns-{ns}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]


def write_psk(path: str, user: str = PSK_USER) -> str:
    """An nbdkit/GnuTLS PSK file ``user:hexkey`` (the format psktool writes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{user}:{secrets.token_hex(32)}\n")
    return path


class Latency:
    """Added round-trip time between client and storage, made by
    :meth:`NetworkHosts.latency`.  Use ``uri`` (not the URI that was served):
    with netem it is the same, with the userspace relay it names the relay's
    port.  ``how`` says which method is in use."""

    def __init__(self, hosts: "NetworkHosts", ms_rtt: float, target_uri: str | None):
        self.hosts = hosts
        self.ms_rtt = float(ms_rtt)
        self.target_uri = target_uri
        self.how = ""                 # "netem" or "userspace relay: kernel has no netem"
        self.detail = ""              # with the relay: netem's error
        self.uri = target_uri
        self.relay_port: int | None = None
        self.port: int | None = urllib.parse.urlsplit(target_uri).port if target_uri else None
        self._proc: subprocess.Popen | None = None
        self._netem_on: list[tuple[str, str]] = []
        self._delay_file: str | None = None
        self.active = False

    # -- netem ---------------------------------------------------------------
    def _netem(self, command: str, ms_rtt: float) -> None:
        us = max(0, int(round(ms_rtt * 1000 / 2)))     # half the round trip each way
        for ns, ifname in ((self.hosts.client_ns, self.hosts.client_if),
                           (self.hosts.storage_ns, self.hosts.storage_if)):
            with ns_route(ns) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                # limit: netem holds every delayed packet in its queue; the
                # default (1000) would drop packets of a fast bulk transfer.
                ipr.tc(command, "netem", index=idx, handle="1:", delay=us, limit=100000)
            if command == "add":
                self._netem_on.append((ns, ifname))

    def _netem_remove(self) -> None:
        for ns, ifname in self._netem_on:
            try:
                with ns_route(ns) as ipr:
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    ipr.tc("del", index=idx, handle="1:", parent=TC_H_ROOT)
            except Exception:
                pass
        self._netem_on.clear()

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> "Latency":
        try:
            self._netem("add", self.ms_rtt)
            self.how = "netem"
        except NetlinkError as e:
            self._netem_remove()
            if e.code not in (errno.ENOENT, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._start_relay(f"netem refused: NetlinkError {e.code} {e}")
        self.active = True
        return self

    def _start_relay(self, detail: str) -> None:
        if self.port is None:
            raise RuntimeError("the kernel has no netem: latency() needs the URI of a "
                               "server started by serve_*(), to put a relay in front of it")
        h = self.hosts
        self._delay_file = os.path.join(h.workdir, f"delay-{secrets.token_hex(3)}")
        with open(self._delay_file, "w") as f:
            f.write(f"{self.ms_rtt / 2}\n")
        log = h._log("relay")
        self._proc = h.popen(
            h.storage_ns,
            [sys.executable, DELAY_RELAY, "--listen", f"{h.storage_addr}:0",
             "--connect", f"{h.storage_addr}:{self.port}",
             "--delay-ms", str(self.ms_rtt / 2), "--delay-file", self._delay_file,
             "--exit-with-parent"],
            stdout=subprocess.PIPE, stderr=log)
        log.close()
        line = _readline(self._proc, 15.0)
        if not line.startswith("ready "):
            raise RuntimeError(f"delay relay did not start: {line!r} {h.read_log('relay')}")
        relay_port = int(line.split()[1])
        self.how = "userspace relay: kernel has no netem"
        self.detail = detail
        self.uri = _replace_port(self.target_uri, relay_port)
        self.relay_port = relay_port

    def set(self, ms_rtt: float) -> None:
        """Change the added round trip (0 is allowed) without reconnecting."""
        self.ms_rtt = float(ms_rtt)
        if self.how == "netem":
            self._netem("change", self.ms_rtt)
        else:
            with open(self._delay_file, "w") as f:
                f.write(f"{self.ms_rtt / 2}\n")
            self._proc.send_signal(signal.SIGHUP)
            line = _readline(self._proc, 10.0)       # the relay acknowledges
            if not line.startswith("delay "):
                raise RuntimeError(f"delay relay did not take the new delay: {line!r} "
                                   f"{self.hosts.read_log('relay')}")

    def stop(self) -> None:
        """Remove the latency.  With the relay, its connections are closed."""
        if not self.active:
            return
        self.active = False
        self._netem_remove()
        if self._proc is not None:
            self.hosts.kill(self._proc)
            self._proc = None

    def __enter__(self) -> "Latency":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _replace_port(uri: str, port: int) -> str:
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"{host}:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline and not buf.endswith(b"\n"):
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


class NetworkHosts:
    """Two network namespaces, ``client_ns`` and ``storage_ns``, joined by a
    veth pair (``client_if`` / ``storage_if``) with ``client_addr`` and
    ``storage_addr`` from a /30 of 10.251.0.0/16.  A context manager: at exit
    every process started here is killed (whole process group), any other
    process left inside the two namespaces is killed too, and the namespaces
    (so the veth) are deleted."""

    def __init__(self, tag: str | None = None):
        """``tag``: 6 hex digits naming the namespaces (default: random)."""
        self.tag = tag or secrets.token_hex(3)
        self.client_ns = f"lcc-{self.tag}"
        self.storage_ns = f"lcs-{self.tag}"
        self.client_if = f"lcc-{self.tag}"[:15]
        self.storage_if = f"lcs-{self.tag}"[:15]
        # A /30 per instance, drawn from the tag: concurrent instances mostly
        # differ (a clash would be harmless: each pair has its own namespaces).
        n = int(self.tag, 16) % (1 << 14)
        base = n * 4
        third, fourth = divmod(base, 256)
        prefix = f"{SUBNET_BASE[0]}.{SUBNET_BASE[1]}.{third}."
        self.client_addr = prefix + str(fourth + 1)
        self.storage_addr = prefix + str(fourth + 2)
        self.prefixlen = 30
        self.workdir = tempfile.mkdtemp(prefix=f"lcnet-{self.tag}-", dir="/tmp")
        self.procs: list[subprocess.Popen] = []
        self.servers: dict[int, subprocess.Popen] = {}
        self.latencies: list[Latency] = []
        self.last_uri: str | None = None
        self._ns_created: list[str] = []
        self.is_cut = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- setup / teardown --------------------------------------------------------
    def _setup(self) -> None:
        if pyroute2 is None:
            raise RuntimeError(unavailable_reason())
        for ns in (self.client_ns, self.storage_ns):
            if os.path.exists(os.path.join(NETNS_DIR, ns)):
                raise RuntimeError(f"network namespace {ns} already exists")
            pr_netns.create(ns)
            self._ns_created.append(ns)
        # The veth is born in the client namespace with its peer in the
        # storage namespace: it never appears in the root namespace.
        with ns_route(self.client_ns) as ipr:
            ipr.link("add", ifname=self.client_if, kind="veth",
                     peer={"ifname": self.storage_if, "net_ns_fd": self.storage_ns})
        for ns, ifname, addr in ((self.client_ns, self.client_if, self.client_addr),
                                 (self.storage_ns, self.storage_if, self.storage_addr)):
            with ns_route(ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=idx, address=addr, prefixlen=self.prefixlen)
                ipr.link("set", index=idx, state="up")
        self._wait_link_up()

    def __enter__(self) -> "NetworkHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for lat in list(self.latencies):
            try:
                lat.stop()
            except Exception:
                pass
        for p in reversed(self.procs):
            self.kill(p)
        # Processes started elsewhere with exec_prefix() (a Daemon, say) and
        # anything they left behind: a namespace lives on, with its veth,
        # while a process is inside it.
        for pid in self._pids_inside():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for ns in self._ns_created:
            try:
                pr_netns.remove(ns)
            except OSError:
                pass
        self._ns_created = []
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _pids_inside(self) -> list[int]:
        inodes = set()
        for ns in self._ns_created:
            try:
                inodes.add(os.stat(os.path.join(NETNS_DIR, ns)).st_ino)
            except OSError:
                pass
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid():
                try:
                    if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                        pids.append(int(d))
                except OSError:
                    pass
        return pids

    # -- processes -----------------------------------------------------------------
    def exec_prefix(self, ns: str) -> list[str]:
        """argv prefix that runs a command in ``ns``, e.g. for Daemon(prefix=...).
        ``ip netns exec`` execs the command: the pid stays the command's."""
        return ["ip", "netns", "exec", ns]

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside ``ns`` in a new session (its own process group);
        it is killed, group and all, at close()."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.exec_prefix(ns) + list(argv), **kw)
        p.own_group = bool(kw["start_new_session"])   # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def run(self, ns: str, argv: list[str], timeout: float = 60.0, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``ns`` to completion (text output captured); on timeout
        its process group is killed and TimeoutExpired raised."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        p = self.popen(ns, argv, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            raise
        finally:
            if p in self.procs and p.poll() is not None:
                self.procs.remove(p)
        cp = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv} in {ns} failed ({p.returncode}): {err}")
        return cp

    def python(self, ns: str, code: str, *args: str, timeout: float = 60.0,
               check: bool = True) -> subprocess.CompletedProcess:
        """Run ``python -c code args...`` in ``ns`` with this interpreter (it has nbd)."""
        return self.run(ns, [sys.executable, "-c", code, *args], timeout=timeout, check=check)

    def kill(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        """SIGTERM the process group of ``p``, SIGKILL it after ``grace`` seconds."""
        pgid = p.pid                       # a new session: the group id is the pid
        own_group = getattr(p, "own_group", False)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                if own_group:
                    os.killpg(pgid, sig)
                elif p.poll() is None:
                    p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if own_group:                      # stragglers of the group
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for f in (p.stdin, p.stdout, p.stderr):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        if p in self.procs:
            self.procs.remove(p)
        for port, sp in list(self.servers.items()):
            if sp is p:
                del self.servers[port]

    def _log(self, name: str):
        return open(os.path.join(self.workdir, f"{name}.log"), "ab")

    def read_log(self, name: str) -> str:
        try:
            with open(os.path.join(self.workdir, f"{name}.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    # -- sockets and probes ----------------------------------------------------------
    def socket(self, ns: str, family=socket.AF_INET, type=socket.SOCK_STREAM) -> socket.socket:
        """A socket of namespace ``ns``, usable from this process (e.g. with
        ``nbd.NBD.connect_socket``)."""
        return _socket_in(ns, family, type)

    def reachable(self, port: int, timeout: float = 1.0, ns: str | None = None,
                  addr: str | None = None) -> bool | None:
        """Connect from the client (default) to storage_addr:port.  True: accepted;
        False: refused (the path works, nothing listens); None: no answer."""
        s = self.socket(ns or self.client_ns)
        s.settimeout(timeout)
        try:
            s.connect((addr or self.storage_addr, port))
            return True
        except ConnectionRefusedError:
            return False
        except OSError:
            return None
        finally:
            s.close()

    def nbd_connect(self, uri: str, ns: str | None = None, timeout: float = 10.0):
        """An ``nbd.NBD`` handle in this process whose connection starts in the
        client namespace (default): the TCP socket is made there, then handed
        to libnbd, which does the TLS handshake.  Close it with ``del h``."""
        import nbd
        parts = urllib.parse.urlsplit(uri)
        query = urllib.parse.parse_qs(parts.query)
        s = self.socket(ns or self.client_ns)
        try:
            s.settimeout(timeout)
            s.connect((parts.hostname, parts.port or 10809))
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            s.close()
            raise
        h = nbd.NBD()
        if parts.scheme == "nbds":
            h.set_tls(nbd.TLS_REQUIRE)
            if "tls-psk-file" in query:
                h.set_tls_psk_file(query["tls-psk-file"][0])
            if parts.username:
                h.set_tls_username(urllib.parse.unquote(parts.username))
        h.set_export_name(urllib.parse.unquote(parts.path.lstrip("/")))
        h.connect_socket(s.detach())
        return h

    def wait_listening(self, port: int, proc: subprocess.Popen | None = None,
                       timeout: float = 20.0, what: str = "server") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited {proc.returncode}: {self.read_log(what)}")
            if self.reachable(port, timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{what} does not accept on {self.storage_addr}:{port}: "
                           f"{self.read_log(what)}")

    # -- servers on the storage host ---------------------------------------------------
    def serve_command(self, argv: list[str], port: int, uri: str, name: str | None = None,
                      ns: str | None = None) -> str:
        """Start any server ``argv`` in the storage namespace, wait until it
        accepts on storage_addr:``port`` and return ``uri``."""
        name = name or f"server-{port}"
        log = self._log(name)
        p = self.popen(ns or self.storage_ns, argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.servers[port] = p
        self.wait_listening(port, p, what=name)
        self.last_uri = uri
        return uri

    def tls_uri(self, port: int, psk_file: str, export: str = "") -> str:
        """libnbd URI of a TLS-PSK export on the storage host.  Because of
        ``tls-psk-file`` libnbd needs ``h.set_uri_allow_local_file(True)``
        before ``h.connect_uri``.  nbdinfo (1.14) does that itself; ``nbdsh -u``
        does not: use ``nbdsh -c 'h.set_uri_allow_local_file(True)' -c
        'h.connect_uri(URI)'``."""
        q = urllib.parse.quote(os.path.abspath(psk_file), safe="/")
        return f"nbds://{PSK_USER}@{self.storage_addr}:{port}/{export}?tls-psk-file={q}"

    def serve_nbdkit_tls(self, plugin_args: list[str], port: int, psk_file: str,
                         extra: list[str] | None = None) -> str:
        """``nbdkit PLUGIN ARGS`` on storage_addr:``port`` with TLS required
        (PSK; the file is written unless it exists).  Returns the client URI."""
        if not os.path.exists(psk_file) or os.path.getsize(psk_file) == 0:
            write_psk(psk_file)
        argv = ["nbdkit", "--foreground", "--exit-with-parent",
                "-i", self.storage_addr, "-p", str(port),
                "--tls=require", f"--tls-psk={os.path.abspath(psk_file)}",
                *(extra or []), *plugin_args]
        return self.serve_command(argv, port, self.tls_uri(port, psk_file),
                                  name=f"nbdkit-{port}")

    def serve_file_tls(self, path: str, port: int, psk_file: str,
                       extra: list[str] | None = None) -> str:
        """Serve the file ``path`` over NBD with TLS-PSK from the storage host."""
        return self.serve_nbdkit_tls(["file", os.path.abspath(path)], port, psk_file, extra)

    def stop_server(self, port: int) -> None:
        p = self.servers.pop(port, None)
        if p is not None:
            self.kill(p)

    # -- latency ------------------------------------------------------------------------
    def latency(self, ms_rtt: float, uri: str | None = None) -> Latency:
        """Add ``ms_rtt`` ms of round trip between client and storage.

        netem (half each way on both veth ends) when the kernel has it: then
        every connection, old and new, is delayed and ``.uri`` is ``uri``.
        Otherwise a userspace delay relay in the storage namespace in front of
        ``uri`` (default: the last served URI): only connections to the
        returned ``.uri`` are delayed.  ``.how`` says which; usable as a context
        manager, ``.stop()`` otherwise (close() stops it too)."""
        lat = Latency(self, ms_rtt, uri or self.last_uri)
        lat.start()
        self.latencies.append(lat)
        return lat

    # -- link cut ------------------------------------------------------------------------
    def _links(self):
        return ((self.client_ns, self.client_if), (self.storage_ns, self.storage_if))

    def _set_link(self, ns: str, ifname: str, state: str) -> None:
        with ns_route(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state=state)

    def link_state(self) -> dict[str, str]:
        out = {}
        for ns, ifname in self._links():
            with ns_route(ns) as ipr:
                link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
                out[ns] = link.get("operstate")
        return out

    def _wait_link_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s == "UP" for s in self.link_state().values()):
                return
            time.sleep(0.02)
        raise RuntimeError(f"veth did not come up: {self.link_state()}")

    def cut(self, both: bool = False) -> None:
        """Cut the link: the storage end of the veth goes down (``both``: the
        client end too).  Packets are dropped silently, so TCP stalls and
        retransmits (with only the storage end down the client keeps its route;
        with ``both`` the client loses it and connects fail at once)."""
        self._set_link(self.storage_ns, self.storage_if, "down")
        if both:
            self._set_link(self.client_ns, self.client_if, "down")
        self.is_cut = True

    def heal(self, timeout: float = 20.0) -> None:
        """Bring both ends up and wait until the client reaches the storage
        address again (a TCP connect is accepted or refused).  A connection
        that lived through the cut resumes on its next retransmission, which
        after a long cut may be seconds away (TCP backoff)."""
        for ns, ifname in self._links():
            self._set_link(ns, ifname, "up")
        self._wait_link_up(timeout)
        # Traffic during the cut leaves the peer's ARP entry INCOMPLETE, and
        # the kernel re-probes only every second: forget it, so that the next
        # packet asks at once.
        for (ns, ifname), peer in zip(self._links(), (self.storage_addr, self.client_addr)):
            with ns_route(ns) as ipr:
                try:
                    ipr.neigh("del", dst=peer, ifindex=ipr.link_lookup(ifname=ifname)[0])
                except NetlinkError:
                    pass
        deadline = time.monotonic() + timeout
        port = next(iter(self.servers), 9)
        while time.monotonic() < deadline:
            # The first SYN or ARP after the link comes back up may be lost
            # (the device's queue is only activated a moment later): probe
            # again soon rather than wait for the 1 s retransmission.
            if self.reachable(port, timeout=0.2) is not None:
                self.is_cut = False
                return
            time.sleep(0.05)
        raise RuntimeError(f"storage {self.storage_addr} unreachable after heal")
