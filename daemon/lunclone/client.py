"""The CLI's side of the control protocol (blocking, one socket)."""
from __future__ import annotations

import json
import os
import socket

from . import protocol
from .errors import DaemonUnavailable, from_json

DEFAULT_RUN_DIR = "/run/lunclone"


def run_dir_default() -> str:
    return os.environ.get("LUNCLONE_RUN_DIR", DEFAULT_RUN_DIR)


class Client:
    def __init__(self, run_dir: str, timeout: float | None = None):
        """``timeout``: seconds for each connect, send and answer (None: no
        bound; some commands wait long on purpose)."""
        self.path = os.path.join(run_dir, "control.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except FileNotFoundError:
            self.sock.close()
            raise DaemonUnavailable(
                f"no lunclone daemon at {self.path}; start it with "
                f"'lunclone serve --run-dir {run_dir}' or 'systemctl start lunclone'") from None
        except ConnectionRefusedError:
            self.sock.close()
            raise DaemonUnavailable(
                f"the lunclone daemon at {self.path} is not running (stale socket); "
                "start it with 'lunclone serve' or 'systemctl start lunclone'") from None
        except PermissionError:
            self.sock.close()
            raise DaemonUnavailable(
                f"permission denied on {self.path}; run as root or as a member of "
                "the daemon's --group") from None
        self.file = self.sock.makefile("rb")

    def call(self, cmd: str, **args):
        args = {k: v for k, v in args.items() if v is not None}
        self.sock.sendall(protocol.encode({"cmd": cmd, "args": args}))
        line = self.file.readline()
        if not line:
            raise DaemonUnavailable("the lunclone daemon closed the connection; see its log")
        reply = json.loads(line)
        if "error" in reply:
            raise from_json(reply["error"])
        return reply["ok"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
