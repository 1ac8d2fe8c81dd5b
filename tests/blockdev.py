"""A volume as a real block device without the kernel NBD module:
nbdfuse exposes the export as a file, a loop device makes it a block device."""
from __future__ import annotations

import os
import shutil
import subprocess
import time


def missing_prerequisite() -> str | None:
    """Why a filesystem test cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel or container)"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing (no loop devices)"
    for tool in ("nbdfuse", "losetup", "mkfs.ext4", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/setup)"
    if os.geteuid() != 0:
        return "loop devices and mount need root"
    return None


class FuseLoop:
    """nbdfuse MOUNTDIR URI, then losetup on MOUNTDIR/nbd."""

    def __init__(self, uri: str, workdir: str):
        self.uri = uri
        self.mountdir = os.path.join(workdir, "fuse")
        self.proc: subprocess.Popen | None = None
        self.loop: str | None = None

    def __enter__(self) -> str:
        os.makedirs(self.mountdir, exist_ok=True)
        self.proc = subprocess.Popen(["nbdfuse", self.mountdir, self.uri])
        node = os.path.join(self.mountdir, "nbd")
        deadline = time.monotonic() + 15
        while not os.path.exists(node):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdfuse did not mount")
            time.sleep(0.05)
        self.loop = subprocess.check_output(
            ["losetup", "--find", "--show", "--direct-io=off", node], text=True).strip()
        return self.loop

    def __exit__(self, *exc) -> None:
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False)
        subprocess.run(["fusermount3", "-u", self.mountdir], check=False)
        if self.proc:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
