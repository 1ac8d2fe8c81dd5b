"""`lunclone serve`: build nbdkit's command line and exec it.

The daemon is nbdkit itself running our plugin in the foreground; this
module only finds the plugin file, checks the state directory (free, its
database ours, read-only) and prepares the run directory, so that every
refusal is one clear line before nbdkit starts.  The engine repeats these
checks inside nbdkit as a second line of defence.
"""
from __future__ import annotations

import grp
import os
import shutil
import socket
import sys
from collections.abc import Mapping

import lunclone
from .errors import Busy, InvalidArgument, LuncloneError
from .metadata import check_state_dir
from .volume import make_dirs

PLUGIN_NAME = "lunclone_plugin.py"


def plugin_path() -> str:
    """The plugin file: $LUNCLONE_PLUGIN, the source tree, or the installed copy."""
    env = os.environ.get("LUNCLONE_PLUGIN")
    pkg = os.path.dirname(os.path.abspath(lunclone.__file__))
    candidates = ([env] if env else []) + [
        os.path.join(pkg, "..", "..", "nbd_plugin", PLUGIN_NAME),
        os.path.join(sys.prefix, "share", "lunclone", "nbd_plugin", PLUGIN_NAME),
        os.path.join("/usr/share/lunclone/nbd_plugin", PLUGIN_NAME),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return os.path.normpath(path)
    raise LuncloneError(f"cannot find {PLUGIN_NAME}; set LUNCLONE_PLUGIN to its path")


def check_state_dir_free(state_dir: str) -> None:
    """Refuse early, with the engine's own message, if a daemon holds the lock."""
    from .engine import LOCK_NAME, lock_state_dir
    path = os.path.join(state_dir, LOCK_NAME)
    if not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        lock_state_dir(fd, state_dir)
    finally:
        os.close(fd)


def make_dir(path: str, mode: int, what: str) -> None:
    """mkdir -p, or one line naming the directory and the reason."""
    try:
        make_dirs(path, mode)
    except OSError as e:
        raise InvalidArgument(f"cannot use {path} as the {what}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidArgument(f"cannot use {path} as the {what}: not writable")


def check_run_dir_free(run_dir: str) -> None:
    path = os.path.join(run_dir, "control.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        return  # absent or stale: ours to replace
    finally:
        sock.close()
    raise Busy(f"run directory {run_dir} is in use by a running lunclone daemon; "
               "stop it first or use another --run-dir")


def tls_args(tcp: str | None, tls_psk: str | None, tls_certificates: str | None,
             insecure: bool) -> list[str]:
    """nbdkit's TLS options; TCP without TLS only when asked for by name."""
    if not tcp:
        if tls_psk or tls_certificates:
            raise InvalidArgument("--tls-psk and --tls-certificates need --tcp")
        return []
    if tls_psk and tls_certificates:
        raise InvalidArgument("give --tls-psk or --tls-certificates, not both")
    if tls_psk:
        if not os.path.isfile(tls_psk):
            raise InvalidArgument(f"PSK file {tls_psk} does not exist; make one with "
                                  "'psktool -u NAME -p FILE'")
        return ["--tls=require", f"--tls-psk={os.path.abspath(tls_psk)}"]
    if tls_certificates:
        if not os.path.isdir(tls_certificates):
            raise InvalidArgument(f"certificate directory {tls_certificates} does not exist")
        return ["--tls=require", f"--tls-certificates={os.path.abspath(tls_certificates)}"]
    if not insecure:
        raise InvalidArgument("--tcp serves volumes over the network: give --tls-psk FILE or "
                              "--tls-certificates DIR, or --insecure for plain TCP")
    return []


def nbdkit_argv(state_dir: str, run_dir: str, tcp: str | None, verbose: bool,
                group: str | None = None, tls: list[str] | None = None,
                remote: dict[str, object] | None = None) -> list[str]:
    nbd_socket = os.path.join(run_dir, "nbd.sock")
    argv = [shutil.which("nbdkit") or "/usr/sbin/nbdkit", "--foreground"]
    if tcp:
        host, _, port = tcp.rpartition(":")
        if not port.isdigit():
            raise InvalidArgument(f"--tcp {tcp!r}: use HOST:PORT, e.g. 127.0.0.1:10809")
        argv += ["--ipaddr", host or "0.0.0.0", "--port", port, *(tls or [])]
    else:
        argv += ["--unix", nbd_socket]
    if verbose:
        argv.append("--verbose")
    argv += ["python", plugin_path(), f"state_dir={state_dir}", f"run_dir={run_dir}",
             f"socket={nbd_socket}"]
    if tcp:
        argv += [f"tcp={tcp}", f"tls={'1' if tls else '0'}"]
    if group:
        argv.append(f"control_group={group}")
    for key, value in (remote or {}).items():  # plugin keys; None: the engine's default
        if value is not None:
            argv.append(f"{key}={value}")
    return argv


SYSTEM_BIN = "/usr/bin"  # where the python3 of nbdkit's libpython lives
# Variables that point an interpreter at another Python's files; the
# embedded one must find the system's standard library and site-packages.
MISLEADING = ("PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONPLATLIBDIR",
              "PYTHONEXECUTABLE", "VIRTUAL_ENV")


def nbdkit_env(environ: Mapping[str, str]) -> dict[str, str]:
    """nbdkit's environment, the same whatever the caller's Python.

    nbdkit embeds the system's libpython, whose interpreter takes its
    prefix from the first ``python3`` on PATH (or from PYTHONHOME): a pyenv,
    conda or venv Python first there gives it another standard library and
    no system site-packages (no ``nbd``).  So: /usr/bin first, the variables
    above dropped, no user site-packages, our package first on PYTHONPATH
    (the embedded interpreter does not see a venv)."""
    env = {k: v for k, v in environ.items() if k not in MISLEADING}
    rest = [p for p in env.get("PATH", "/usr/sbin:/sbin:/bin").split(os.pathsep)
            if p and os.path.normpath(p) != SYSTEM_BIN]
    env["PATH"] = os.pathsep.join([SYSTEM_BIN, *rest])
    env["PYTHONNOUSERSITE"] = "1"
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(lunclone.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    return env


def exec_daemon(state_dir: str, run_dir: str, tcp: str | None = None,
                verbose: bool = False, group: str | None = None,
                tls_psk: str | None = None, tls_certificates: str | None = None,
                insecure: bool = False, remote: dict[str, object] | None = None) -> None:
    tls = tls_args(tcp, tls_psk, tls_certificates, insecure)
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise InvalidArgument(f"no group named {group!r}") from None
    state_dir = os.path.abspath(state_dir)
    run_dir = os.path.abspath(run_dir)
    make_dir(state_dir, 0o700, "state directory")
    make_dir(run_dir, 0o755, "run directory")
    check_state_dir_free(state_dir)
    check_state_dir(state_dir)
    check_run_dir_free(run_dir)
    for stale in ("nbd.sock", "control.sock"):
        path = os.path.join(run_dir, stale)
        if os.path.exists(path):
            os.unlink(path)
    argv = nbdkit_argv(state_dir, run_dir, tcp, verbose, group, tls, remote)
    env = nbdkit_env(os.environ)
    if shutil.which(argv[0]) is None and not os.path.exists(argv[0]):
        raise LuncloneError("nbdkit is not installed; run scripts/setup or "
                            "apt-get install nbdkit nbdkit-plugin-python")
    os.execve(argv[0], argv, env)
