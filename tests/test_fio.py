"""fio's NBD engine against lunclone, with verification."""
import shutil

import pytest

from fio import run_fio


def test_fio_verify_crc32c(daemon):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (run scripts/setup)")
    daemon.cli("create", "f", "--size", "64M")
    res = run_fio(daemon.uri("f"), rw="randwrite", bs="4k", size="32M", iodepth=16,
                  verify="crc32c")
    job = res["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0
