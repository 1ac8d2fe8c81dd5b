import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from helpers import Daemon, short_tmpdir  # noqa: E402
from ceph import ceph_cluster  # noqa: E402,F401  (a module-scoped Ceph cluster fixture)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="run the long modes (crash points, big models)")


def pytest_configure(config):
    """--long for code that cannot take the fixture (tests/test_model.py's
    settings are fixed at import)."""
    if config.getoption("--long", default=False):
        os.environ["LUNCLONE_LONG"] = "1"


@pytest.fixture
def long_mode(request) -> bool:
    return request.config.getoption("--long")


@pytest.fixture
def workdir():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(workdir):
    d = Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run")).start()
    yield d
    rc = d.stop()
    assert rc == 0, f"daemon exit {rc}: {d.log()}"


@pytest.fixture
def small_fs(workdir):
    """A tmpfs of a few MiB: sparse files, holes and copy_file_range work on it."""
    mnt = os.path.join(workdir, "small")
    os.makedirs(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    yield mnt
    subprocess.run(["umount", "-l", mnt])


@pytest.fixture
def small_daemon(small_fs, workdir):
    d = Daemon(os.path.join(small_fs, "state"), os.path.join(workdir, "run")).start()
    yield d
    d.stop()


@pytest.fixture
def live(workdir):
    """The real engine in this process (``live.LiveEngine``); fault points
    are disarmed after the test."""
    from live import LiveEngine
    from lunclone import faults
    eng = LiveEngine(workdir)
    yield eng
    faults.disarm()
    try:
        eng.stop()
    except Exception:
        pass


@pytest.fixture
def lazy():
    """A mounted LazyFS (``lazyfs.py``) in a short temporary directory."""
    from lazyfs import LazyFS, unavailable
    why = unavailable()
    if why:
        pytest.skip(f"LazyFS cannot run here: {why}")
    d = short_tmpdir("lz")
    fs = LazyFS(os.path.join(d, "disk"), os.path.join(d, "mnt")).mount()
    yield fs
    fs.unmount()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def lazy_daemon(lazy):
    """A daemon (not started) whose whole state directory is the lazy mount;
    killed and its run directory removed after the test."""
    run = short_tmpdir("lzr")
    d = Daemon(lazy.mountpoint, run)
    yield d
    d.kill()
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def lazy_maps(lazy):
    """The group committer (``helpers.Maps``) with its database on LazyFS,
    and a volume file there holding b"o" * 8192, durable (``m.fd``)."""
    import contextlib
    from helpers import Maps, sync_dir
    from lunclone import faults
    state = os.path.join(lazy.mountpoint, "state")
    os.makedirs(state)
    m = Maps(state)
    path = os.path.join(lazy.mountpoint, "vol.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, b"o" * 8192, 0)
    os.fsync(fd)
    for d in (state, lazy.mountpoint):  # the new files' names are durable too
        sync_dir(d)
    m.fd, m.path = fd, path
    yield m
    faults.disarm()
    with contextlib.suppress(OSError):
        os.close(m.fd)
    m.close()
