"""Debian 13 "trixie" next to Debian 12 (issue 16, item 5).

- The package is built inside a trixie root with its own dpkg-buildpackage,
  checked by its lintian, and installed there with apt (tests/vm/image.py,
  release "trixie").
- scripts/setup's package list resolves with trixie's apt.
- The VM's main scenario and the reboot in the middle of a restore run in a
  trixie guest: kernel 6.12, systemd 257, nbdkit 1.42, Python 3.13.
- The unit and nbdkit tests run inside the trixie image's root (a chroot
  on an overlay of its disk, so the cached image is never changed) under
  its Python 3.13, with every DeprecationWarning an error, in the tests and
  in every Python process they start (PYTHONWARNINGS: the daemon, nbdkit's
  embedded interpreter, the CLI).  A chroot, not the booted guest: the
  suite needs no kernel of its own, and under TCG it would run ten times
  slower.  Ceph's tests are left out (the one-node cluster is Debian 12's
  Ceph, and a second one would add minutes for nothing about Python), as
  are the VM tests themselves and the SIGKILL, power-cut and link-cut loops
  and the long random model (LEFT_OUT).
"""
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.vm import image, test_vm
from tests.vm.test_vm import check, reboot_mid_restore, say

pytestmark = pytest.mark.timeout(3600)
RELEASE = "trixie"
# What the suite inside the root leaves out, and why (printed with the
# result): a file, or a test (``::``, every parametrization of it).  The
# loops repeat, dozens of times, paths the rest of the suite runs once; on
# Debian 12 they all run, and here they would cost about 5 of the suite's
# 12 minutes for no line of Python the other tests do not run.
LOOPS = "the SIGKILL, power-cut and link-cut loops and the long random model"
LEFT_OUT = {"tests/vm": "the VM tests themselves",
            "tests/test_ceph.py": "Ceph (Debian 12's one-node cluster)",
            "tests/test_ceph_clone.py": "Ceph (Debian 12's one-node cluster)",
            "tests/test_powercut.py": LOOPS,
            "tests/test_crash.py": LOOPS,
            "tests/test_model.py::test_model": LOOPS,
            "tests/test_network.py::test_link_cut_during_restore": LOOPS,
            "tests/test_remote.py::test_remote_lost_then_back": LOOPS,
            "tests/test_remote.py::test_sigkill_during_restore_from_remote": LOOPS,
            "tests/test_undo.py::test_sigkill_during_undo_loses_nothing": LOOPS,
            "tests/test_undo.py::test_sigkill_during_capture_keeps_the_rule": LOOPS}


@pytest.fixture(scope="module")
def trixie_image(request):
    test_vm._config = request.config  # say() prints past pytest's capture
    img = image.build_image(RELEASE)  # a BuildError fails the tests
    base_s = open(os.path.join(os.path.dirname(image.build_base(RELEASE)), "done")).read()
    say(f"\ntrixie image: debootstrap {base_s.strip()} s, project image "
        f"{open(os.path.join(img, 'done')).read().strip()} s when built")
    return img


@pytest.fixture(scope="module")
def qemu():
    why = image.qemu_missing()
    if why:
        pytest.skip(why)


def test_trixie_main_scenario(qemu, trixie_image):
    steps, log = image.boot(trixie_image, "main", image.runs_dir(RELEASE), timeout=900)
    check(steps, log, "package-started", "attach-nbd0", "files-back-while-restoring",
          "wrong-files-seen", "right-files-while-undoing", "right-files-after-undo",
          "fio-verify-during-restore", "writer-goes-on", "no-io-errors", "io-flusher",
          "stopped-cleanly", "done")


def test_trixie_reboot_mid_restore(qemu, trixie_image):
    reboot_mid_restore(trixie_image, image.runs_dir(RELEASE), 600)


class OverlayRoot:
    """The image's disk mounted read-only under a writable overlay, with
    /proc, /sys, /dev and a /tmp on the host's disk: a root to chroot into
    that leaves the cached image as it was."""

    def __init__(self, img: str):
        self.top = tempfile.mkdtemp(prefix="lunclone-trixie-", dir="/var/tmp")
        self.lower, self.upper, self.work, self.root, self.tmp = (
            os.path.join(self.top, d) for d in ("lower", "upper", "work", "root", "tmp"))
        for d in (self.lower, self.upper, self.work, self.root, self.tmp):
            os.makedirs(d)
        os.chmod(self.tmp, 0o1777)
        self.mounts: list[str] = []
        self._mount(["-o", "loop,ro", os.path.join(img, "disk.raw")], self.lower)
        self._mount(["-t", "overlay", "overlay", "-o", f"lowerdir={self.lower},"
                     f"upperdir={self.upper},workdir={self.work}"], self.root)
        for fs, opts in (("proc", ["-t", "proc", "proc"]), ("sys", ["--rbind", "/sys"]),
                         ("dev", ["--rbind", "/dev"]), ("tmp", ["--bind", self.tmp])):
            self._mount(opts, os.path.join(self.root, fs))
            if opts[0] == "--rbind":
                subprocess.run(["mount", "--make-rslave", os.path.join(self.root, fs)], check=True)

    def _mount(self, opts: list[str], where: str) -> None:
        subprocess.run(["mount", *opts, where], check=True)
        self.mounts.append(where)

    def close(self) -> None:
        for where in reversed(self.mounts):
            subprocess.run(["umount", "-R", "-l", where])
        shutil.rmtree(self.top, ignore_errors=True)


def _copy_tree(dst: str) -> None:
    """The working tree's files that the tests read (no .git, no .venv)."""
    shutil.copytree(image.ROOT, dst, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "__pycache__", "*.pyc", ".pytest_cache"))


def test_unit_and_nbdkit_tests_under_python_313(trixie_image):
    """The suite (less LEFT_OUT) in the trixie root, DeprecationWarning an
    error everywhere: nothing deprecated for Python 3.14 remains."""
    root = OverlayRoot(trixie_image)
    try:
        _copy_tree(os.path.join(root.root, "src"))
        ignores = " ".join(f"--deselect={p}" if "::" in p else f"--ignore={p}"
                           for p in LEFT_OUT)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
               "PYTHONWARNINGS": "error::DeprecationWarning", "PYTHONDONTWRITEBYTECODE": "1"}
        p = subprocess.run(
            ["chroot", root.root, "sh", "-c",
             f"cd /src && python3 --version && nbdkit --version && "
             f"python3 -W error::DeprecationWarning -m pytest -p no:cacheprovider -q -ra "
             f"{ignores}"], env=env, capture_output=True, text=True, timeout=3300)
    finally:
        root.close()
    out = p.stdout + p.stderr
    log = os.path.join(image.runs_dir(RELEASE), "suite.log")
    open(log, "w").write(out)
    lines = out.strip().splitlines()
    say(f"\n-- trixie root: {' / '.join(lines[:2])}; left out: "
        f"{', '.join(sorted(set(LEFT_OUT.values())))}\n   {lines[-1] if lines else ''}"
        f"\n   log: {log}")
    for line in lines:
        if line.startswith("SKIPPED"):
            say(f"   {line[:160]}")
    assert p.returncode == 0, f"the suite failed in the trixie root; log {log}"


def _setup_packages() -> list[str]:
    """The package names scripts/setup installs (its PACKAGES array)."""
    text = open(os.path.join(image.ROOT, "scripts", "setup")).read()
    names: list[str] = []
    for line in text[text.index("PACKAGES=(") + len("PACKAGES=("):].splitlines():
        code = line.split("#")[0]
        names += code.split(")")[0].split()
        if ")" in code:
            return names
    raise AssertionError("scripts/setup's PACKAGES=( ... ) has no end")


def test_setup_installs_on_debian_13(trixie_image):
    """scripts/setup's package list resolves on Debian 13: apt-get's
    simulation in the trixie root (its package lists, nothing downloaded)."""
    names = _setup_packages()
    assert "nbdkit" in names and len(names) > 20
    root = OverlayRoot(trixie_image)
    try:
        p = subprocess.run(["chroot", root.root, "apt-get", "install", "--simulate",
                            "--no-install-recommends", *names], capture_output=True, text=True,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"})
    finally:
        root.close()
    assert p.returncode == 0, f"scripts/setup's packages do not resolve on trixie: {p.stderr[-800:]}"
    say(f"\n-- scripts/setup on trixie: {len(names)} packages resolve "
        f"({sum(line.startswith('Inst ') for line in p.stdout.splitlines())} to install)")


def test_lintian_on_debian_13_reports_nothing(trixie_image):
    """The package built in the trixie root (the image keeps it), checked by
    trixie's lintian: no error, no warning."""
    debs = [f for f in os.listdir(trixie_image) if f.startswith("lunclone_") and f.endswith(".deb")]
    assert len(debs) == 1, f"the trixie image keeps no package: {os.listdir(trixie_image)}"
    root = OverlayRoot(trixie_image)
    try:
        shutil.copy(os.path.join(trixie_image, debs[0]), os.path.join(root.root, "tmp"))
        p = subprocess.run(["chroot", root.root, "lintian", "--fail-on", "error,warning",
                            f"/tmp/{debs[0]}"], capture_output=True, text=True,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
                                "HOME": "/root"})
    finally:
        root.close()
    tags = [ln for ln in p.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert p.returncode == 0 and not tags, p.stdout + p.stderr
    say(f"\n-- lintian (Debian 13) on {debs[0]}: no error, no warning")
