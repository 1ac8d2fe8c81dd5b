"""mkfs.ext4 + mount + files through nbdfuse and a loop device."""
import hashlib
import os
import subprocess

import pytest

from blockdev import FuseLoop, missing_prerequisite


@pytest.fixture
def fs_ok():
    why = missing_prerequisite()
    if why:
        pytest.skip(why)


def test_ext4_roundtrip(daemon, workdir, fs_ok):
    daemon.cli("create", "fs", "--size", "64M")
    mnt = os.path.join(workdir, "mnt")
    os.makedirs(mnt)
    payload = os.urandom(3 << 20)
    with FuseLoop(daemon.uri("fs"), workdir) as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
        subprocess.run(["mount", dev, mnt], check=True)
        try:
            with open(os.path.join(mnt, "data.bin"), "wb") as f:
                f.write(payload)
            os.makedirs(os.path.join(mnt, "dir"))
            with open(os.path.join(mnt, "dir", "note.txt"), "w") as f:
                f.write("hello lunclone\n")
        finally:
            subprocess.run(["umount", mnt], check=True)
    # Mount again from a fresh client: the files are on the volume.
    with FuseLoop(daemon.uri("fs"), workdir) as dev:
        subprocess.run(["fsck.ext4", "-n", dev], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "ro", dev, mnt], check=True)
        try:
            got = open(os.path.join(mnt, "data.bin"), "rb").read()
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert open(os.path.join(mnt, "dir", "note.txt")).read() == "hello lunclone\n"
        finally:
            subprocess.run(["umount", mnt], check=True)
