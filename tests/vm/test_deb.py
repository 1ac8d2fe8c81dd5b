"""The Debian package (issue 18, item 1): scripts/build-deb builds it from
the committed tree and refuses a dirty one; lintian reports nothing; it
installs into a fresh Debian 12 root (the VM suite's debootstrap base, so
no network is needed: its packages are lunclone's dependencies) with its
units enabled, its man pages and completion; remove keeps the state
directory, purge removes only what the package made."""
import glob
import os
import shutil
import subprocess

import pytest

from tests.vm import image

ROOT = image.ROOT
pytestmark = pytest.mark.timeout(1500)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """build-deb in a clone of the repository at HEAD: (the .deb, the clone)."""
    for tool in ("dpkg-buildpackage", "lintian", "help2man", "git"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/setup installs it")
    clone = str(tmp_path_factory.mktemp("deb") / "lunclone")
    r = run(["git", "clone", "-q", "--local", ROOT, clone])
    assert r.returncode == 0, r.stderr
    r = run(["bash", "scripts/build-deb"], cwd=clone)
    assert r.returncode == 0, r.stdout + r.stderr
    debs = glob.glob(os.path.join(clone, "build", "deb", "lunclone_*_all.deb"))
    assert len(debs) == 1, r.stdout
    return debs[0], clone


def test_build_deb_refuses_a_dirty_tree(deb):
    _, clone = deb
    with open(os.path.join(clone, "README.md"), "a") as f:
        f.write("\nan uncommitted line\n")
    try:
        r = run(["bash", "scripts/build-deb"], cwd=clone)
        assert r.returncode == 1 and "uncommitted changes" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        run(["git", "checkout", "README.md"], cwd=clone)


def test_lintian_reports_nothing(deb):
    path, _ = deb
    changes = glob.glob(os.path.join(os.path.dirname(path), "*.changes"))
    r = run(["lintian", "--fail-on", "error,warning", *changes])
    tags = [ln for ln in r.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert r.returncode == 0 and not tags, r.stdout + r.stderr


def test_install_remove_purge_in_a_fresh_root(deb, tmp_path):
    path, _ = deb
    root = str(tmp_path / "root")
    r = run(["cp", "-a", image.build_base(), root])
    assert r.returncode == 0, r.stderr
    shutil.copy(path, os.path.join(root, "tmp", "lunclone.deb"))
    image._mount_for_chroot(root)
    try:
        def chroot(*argv):
            return run(["chroot", root, *argv], env=dict(os.environ, PATH="/usr/sbin:/usr/bin:"
                                                         "/sbin:/bin", DEBIAN_FRONTEND="noninteractive"))
        r = chroot("dpkg", "-i", "/tmp/lunclone.deb")
        assert r.returncode == 0, r.stdout + r.stderr
        for f in ("usr/bin/lunclone", "usr/share/lunclone/nbd_plugin/lunclone_plugin.py",
                  "lib/systemd/system/lunclone.service", "usr/share/man/man8/lunclone.8.gz",
                  "usr/share/man/man8/lunclone-restore.8.gz",
                  "usr/share/bash-completion/completions/lunclone",
                  "usr/share/doc/lunclone/status.schema.json.gz", "etc/lunclone",
                  "etc/systemd/system/multi-user.target.wants/lunclone.service",
                  "etc/systemd/system/timers.target.wants/lunclone-metrics.timer"):
            assert os.path.lexists(os.path.join(root, f)), f
        assert not os.path.lexists(os.path.join(
            root, "etc/systemd/system/multi-user.target.wants/lunclone-attach@.service"))
        r = chroot("lunclone", "restore", "--help")
        assert r.returncode == 0 and "--from CLONE" in r.stdout, r.stderr
        r = chroot("/usr/bin/python3", "-c", "import lunclone.serve as s; print(s.plugin_path())")
        assert r.stdout.strip() == "/usr/share/lunclone/nbd_plugin/lunclone_plugin.py", r.stderr
        # A state directory with data, as the daemon leaves it.
        state = os.path.join(root, "var", "lib", "lunclone")
        os.makedirs(os.path.join(state, "volumes"))
        open(os.path.join(state, "volumes", "db.img"), "w").write("volume data")
        r = chroot("dpkg", "-r", "lunclone")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not os.path.exists(os.path.join(root, "usr/bin/lunclone"))
        assert os.path.exists(os.path.join(state, "volumes", "db.img"))
        r = chroot("dpkg", "-P", "lunclone")
        assert r.returncode == 0, r.stdout + r.stderr
        assert open(os.path.join(state, "volumes", "db.img")).read() == "volume data"
        assert not os.path.exists(os.path.join(root, "etc/lunclone"))
        assert not os.path.lexists(os.path.join(
            root, "etc/systemd/system/multi-user.target.wants/lunclone.service"))
    finally:
        image._umount_for_chroot(root)
