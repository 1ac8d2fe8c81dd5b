"""The test VM: build a cached Debian image (12 "bookworm" or 13 "trixie")
with lunclone installed from its Debian package (built from the working
tree, as scripts/build-deb builds it from HEAD; for trixie the package is
built inside the trixie root, so the build is shown on Debian 13 too),
boot it under qemu (TCG, no network), collect what the guest reports.

Cache (outside the repository, ``$LUNCLONE_VM_CACHE`` or
/var/cache/lunclone-vm):
    base-<hash of suite + package list>/root  debootstrap --variant=minbase
    image-<hash of base + project>/           disk.raw, vmlinuz, initrd.img
The base is rebuilt when the package list changes, the image when the
project's files change.  The guest reports over its serial console, one
``LUNCLONE-STEP {json}`` line per step; a guest that hangs is killed at the
time bound and its console log is kept.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("LUNCLONE_VM_CACHE", "/var/cache/lunclone-vm")
MIRROR = "http://deb.debian.org/debian"
RELEASES = ("bookworm", "trixie")
PACKAGES = sorted("""
systemd-sysv udev kmod nbd-client nbdkit nbdkit-plugin-python python3 python3-venv
python3-click python3-setuptools python3-pip python3-libnbd python3-pyroute2 libnbd-bin e2fsprogs fio
linux-image-amd64 initramfs-tools procps util-linux coreutils
""".split())
# trixie also builds the package (scripts/build-deb's tools) and runs the
# unit and nbdkit tests in its root (tests/vm/test_trixie.py): their tools,
# all from Debian 13's own packages.
TRIXIE_EXTRA = sorted("""
build-essential debhelper dh-python help2man pybuild-plugin-pyproject python3-all lintian
fakeroot git groff-base python3-pytest python3-pytest-asyncio python3-pytest-timeout
python3-prometheus-client python3-hypothesis python3-jsonschema python3-fusepy fuse3
strace tmux qemu-utils iproute2 gnutls-bin prometheus prometheus-node-exporter
""".split())


def packages(release: str) -> list[str]:
    return PACKAGES + (TRIXIE_EXTRA if release == "trixie" else [])


def default_release() -> str:
    """``$LUNCLONE_VM_RELEASE`` (scripts/vm --release), bookworm by default."""
    release = os.environ.get("LUNCLONE_VM_RELEASE", "bookworm")
    if release not in RELEASES:
        raise SystemExit(f"unknown release {release!r}: one of {', '.join(RELEASES)}")
    return release
# What the package is built from (debian/, and what debian/ installs), and the guest's steps.
PROJECT_FILES = ["pyproject.toml", "daemon", "nbd_plugin", "systemd", "debian", "docs", "contrib",
                 "scripts/build_man.py", "scripts/lunclone-completion.bash", "README.md",
                 "CHANGELOG.md", "tests/vm/guest", "tests/vm/image.py"]
STEP_MARK = "LUNCLONE-STEP "


class BuildError(RuntimeError):
    pass


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def project_hash() -> str:
    """Of the files the image takes from the project, as they are on disk."""
    h = hashlib.sha256()
    for top in PROJECT_FILES:
        path = os.path.join(ROOT, top)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
            if "__pycache__" not in d and not f.endswith(".pyc"))
        for f in files:
            h.update(os.path.relpath(f, ROOT).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def _run(argv: list[str], what: str, **kw) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise BuildError(f"{what} failed ({p.returncode}): {(p.stderr or p.stdout)[-3000:]}")


def build_base(release: str = "bookworm") -> str:
    """The debootstrapped root of ``release``, built once per package list.
    (bookworm's key is its package list alone, as before trixie came.)"""
    key = " ".join(packages(release)) + ("" if release == "bookworm" else f" @{release}")
    base = os.path.join(CACHE, f"base-{_hash(key.encode())}")
    root = os.path.join(base, "root")
    if os.path.exists(os.path.join(base, "done")):
        return root
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    t0 = time.monotonic()
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
          release, root, MIRROR], "debootstrap", timeout=1800)
    extra = sorted(set(packages(release)) - set(PACKAGES))
    if extra:  # apt's resolver, not debootstrap's (which misses some of lintian's)
        _mount_for_chroot(root)
        try:
            _run(["chroot", root, "apt-get", "install", "-y", "--no-install-recommends", *extra],
                 "apt-get install of the extra packages", timeout=1800,
                 env=dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin",
                          DEBIAN_FRONTEND="noninteractive"))
            _run(["chroot", root, "apt-get", "clean"], "apt-get clean")
        finally:
            _umount_for_chroot(root)
    open(os.path.join(base, "done"), "w").write(f"{time.monotonic() - t0:.0f}\n")
    return root


def build_image(release: str = "bookworm") -> str:
    """The image directory (disk.raw, vmlinuz, initrd.img), built if needed."""
    base_root = build_base(release)
    img = os.path.join(CACHE, f"image-{_hash(base_root.encode(), project_hash().encode())}")
    if os.path.exists(os.path.join(img, "done")):
        return img
    shutil.rmtree(img, ignore_errors=True)
    root = os.path.join(img, "root")
    os.makedirs(img)
    t0 = time.monotonic()
    _run(["cp", "-a", base_root, root], "copy of the base")
    _customize(root)
    shutil.copy(build_deb(img, root if release == "trixie" else None),
                os.path.join(root, "tmp", "lunclone.deb"))
    # For the upgrade scenario: this package and the previous commit's.
    kept = os.path.join(root, "var", "lib", "lunclone-vmtest")
    os.makedirs(kept)
    shutil.copy(os.path.join(root, "tmp", "lunclone.deb"), os.path.join(kept, "new.deb"))
    shutil.copy(build_previous_deb(img), os.path.join(kept, "previous.deb"))
    _mount_for_chroot(root)
    try:
        # As an admin installs it.  The base holds every dependency, so apt
        # resolves them from what is installed and needs no network (the
        # Recommends, fuse3 for the no-nbd fallback, are not in the base).
        _run(["chroot", root, "apt-get", "install", "-y",
              "--no-install-recommends", "/tmp/lunclone.deb"], "apt-get install ./lunclone.deb",
             env=dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin",
                      DEBIAN_FRONTEND="noninteractive"))
        os.unlink(os.path.join(root, "tmp", "lunclone.deb"))
    finally:
        _umount_for_chroot(root)
    kernel = sorted(glob.glob(os.path.join(root, "boot", "vmlinuz-*")))
    initrd = sorted(glob.glob(os.path.join(root, "boot", "initrd.img-*")))
    if not kernel or not initrd:
        raise BuildError("no kernel or initrd in the image")
    shutil.copy(kernel[-1], os.path.join(img, "vmlinuz"))
    shutil.copy(initrd[-1], os.path.join(img, "initrd.img"))
    _run(["mkfs.ext4", "-q", "-F", "-L", "lunclone-vm", "-d", root,
          os.path.join(img, "disk.raw"), "3G"], "mkfs.ext4 -d")
    shutil.rmtree(root)
    for tmp in ("src", "prev"):
        shutil.rmtree(os.path.join(img, tmp), ignore_errors=True)
    open(os.path.join(img, "release"), "w").write(release + "\n")
    open(os.path.join(img, "done"), "w").write(f"{time.monotonic() - t0:.0f}\n")
    return img


def build_deb(workdir: str, chroot: str | None = None) -> str:
    """The .deb of the working tree's PROJECT_FILES (dpkg-buildpackage -b
    in a copy, with the system's PATH, as scripts/build-deb does for HEAD);
    with ``chroot``, built inside that root (its release's tools)."""
    src = os.path.join(chroot, "tmp", "build", "lunclone") if chroot else \
        os.path.join(workdir, "src", "lunclone")
    os.makedirs(src)
    for top in PROJECT_FILES:
        path = os.path.join(ROOT, top)
        dst = os.path.join(src, top)
        if os.path.isdir(path):
            shutil.copytree(path, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(path, dst)
    if chroot is None:
        return _dpkg_buildpackage(src)
    _mount_for_chroot(chroot)
    try:
        _run(["chroot", chroot, "sh", "-c", "cd /tmp/build/lunclone && "
              "dpkg-buildpackage -b -us -uc"], "dpkg-buildpackage in the chroot",
             env=dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin", LC_ALL="C.UTF-8"))
    finally:
        _umount_for_chroot(chroot)
    debs = glob.glob(os.path.join(os.path.dirname(src), "lunclone_*_all.deb"))
    if len(debs) != 1:
        raise BuildError(f"dpkg-buildpackage made {debs}")
    kept = os.path.join(workdir, os.path.basename(debs[0]))
    shutil.copy(debs[0], kept)
    shutil.rmtree(os.path.dirname(src))
    return kept


def build_previous_deb(workdir: str) -> str:
    """The .deb of the previous commit (HEAD~1), versioned below this one
    (``~prev``), for the upgrade scenario; the working tree's, so versioned,
    if HEAD~1 has no debian/ yet."""
    src = os.path.join(workdir, "prev", "lunclone")
    os.makedirs(src)
    has = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", "HEAD~1:debian/control"],
                         capture_output=True).returncode == 0
    if has:
        archive = subprocess.run(["git", "-C", ROOT, "archive", "HEAD~1"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    else:
        for top in PROJECT_FILES:
            _run(["cp", "-a", os.path.join(ROOT, top), os.path.join(src, top)]
                 if os.path.isdir(os.path.join(ROOT, top)) else
                 ["install", "-D", os.path.join(ROOT, top), os.path.join(src, top)], "copy")
    changelog = os.path.join(src, "debian", "changelog")
    text = open(changelog).read()
    first, _, rest = text.partition("\n")
    open(changelog, "w").write(first.replace(") ", "~prev) ", 1) + "\n" + rest)
    return _dpkg_buildpackage(src)


def _dpkg_buildpackage(src: str) -> str:
    _run(["dpkg-buildpackage", "-b", "-us", "-uc"], "dpkg-buildpackage", cwd=src,
         env=dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin"))
    debs = glob.glob(os.path.join(os.path.dirname(src), "lunclone_*_all.deb"))
    if len(debs) != 1:
        raise BuildError(f"dpkg-buildpackage made {debs}")
    return debs[0]


def _customize(root: str) -> None:
    with open(os.path.join(root, "etc", "fstab"), "w") as f:
        f.write("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    with open(os.path.join(root, "etc", "hostname"), "w") as f:
        f.write("lunclone-vm\n")
    with open(os.path.join(root, "etc", "modules-load.d", "nbd.conf"), "w") as f:
        f.write("nbd\n")
    guest = os.path.join(ROOT, "tests", "vm", "guest")
    dst = os.path.join(root, "usr", "local", "lib", "lunclone-vmtest")
    shutil.copytree(guest, dst)
    unit = os.path.join(root, "etc", "systemd", "system", "lunclone-vmtest.service")
    with open(unit, "w") as f:
        f.write("[Unit]\nDescription=lunclone VM test\nAfter=multi-user.target\n"
                "[Service]\nType=oneshot\nStandardOutput=tty\nStandardError=tty\n"
                "TTYPath=/dev/ttyS0\nExecStart=/bin/bash /usr/local/lib/lunclone-vmtest/run\n"
                "[Install]\nWantedBy=multi-user.target\n")
    wants = os.path.join(root, "etc", "systemd", "system", "multi-user.target.wants")
    os.makedirs(wants, exist_ok=True)
    link = os.path.join(wants, "lunclone-vmtest.service")
    if not os.path.lexists(link):
        os.symlink("/etc/systemd/system/lunclone-vmtest.service", link)
    # No getty on the console: the test owns it.
    for g in glob.glob(os.path.join(root, "etc", "systemd", "system", "getty.target.wants", "*")):
        os.unlink(g)
    masked = os.path.join(root, "etc", "systemd", "system", "serial-getty@ttyS0.service")
    if not os.path.lexists(masked):
        os.symlink("/dev/null", masked)


def _mount_for_chroot(root: str) -> None:
    for fs, opts in (("proc", ["-t", "proc", "proc"]), ("sys", ["-t", "sysfs", "sys"]),
                     ("dev", ["--bind", "/dev"])):
        subprocess.run(["mount", *opts, os.path.join(root, fs)], check=True)


def _umount_for_chroot(root: str) -> None:
    for fs in ("dev", "sys", "proc"):
        subprocess.run(["umount", "-l", os.path.join(root, fs)])


def qemu_missing() -> str | None:
    """Why qemu cannot run here, or None: it must start and stay up a moment."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    p = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults",
                          "-display", "none", "-monitor", "none", "-serial", "none", "-S"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        p.wait(1.0)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return None
    return f"qemu-system-x86_64 cannot run here: {p.stderr.read().strip()[-300:]}"


def _vcpus(img: str) -> str:
    """2, but 1 for trixie: its 6.12 kernel under TCG can oops at boot with 2."""
    try:
        release = open(os.path.join(img, "release")).read().strip()
    except FileNotFoundError:
        release = "bookworm"
    return "1" if release == "trixie" else "2"


def _qemu_argv(img: str, test: str, disk: str, log: str, mem: str, append: str) -> list[str]:
    return ["qemu-system-x86_64", "-machine", "q35", "-cpu", "max", "-smp", _vcpus(img), "-m", mem,
            "-display", "none", "-nodefaults", "-no-reboot", "-nic", "none",
            "-serial", f"file:{log}", "-kernel", os.path.join(img, "vmlinuz"),
            "-initrd", os.path.join(img, "initrd.img"),
            "-append", f"root=/dev/vda rw console=ttyS0 panic=-1 lunclone.test={test} {append}",
            "-drive", f"file={disk},format=qcow2,if=virtio"]


def boot(img: str, test: str, workdir: str, mem: str = "1024", timeout: float = 600,
         disk: str | None = None, append: str = "", name: str | None = None
         ) -> tuple[list[dict], str]:
    """Boot the image with ``lunclone.test=TEST``; returns (steps, console log).

    ``disk``: a qcow2 overlay to boot from (kept across boots); by default a
    fresh one in ``workdir``.  ``append``: more of the kernel command line
    (the guest's scenario reads its parameters there).  ``name``: of the
    console log, TEST by default."""
    if disk is None:
        disk = os.path.join(workdir, f"{test}.qcow2")
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
              os.path.join(img, "disk.raw"), disk], "qemu-img create")
    log = os.path.join(workdir, f"{name or test}.console.log")
    argv = _qemu_argv(img, test, disk, log, mem, append)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"the guest hung past {timeout:.0f} s; console log kept in {log}")
    text = open(log, errors="replace").read()
    steps = [json.loads(line[line.index(STEP_MARK) + len(STEP_MARK):])
             for line in text.splitlines() if STEP_MARK in line]
    steps.append({"step": "boot-to-poweroff", "ok": True, "s": round(time.monotonic() - t0, 1)})
    return steps, log


def boot_and_cut(img: str, test: str, workdir: str, disk: str, append: str, name: str,
                 marker: str, delay: float, timeout: float = 600) -> str:
    """Boot from ``disk`` and SIGKILL qemu ``delay`` seconds after the
    console shows ``marker``: a power cut of the host, as far as the guest
    can tell (its page cache and what qemu had not written are lost).
    Returns the console log; raises if the marker never came."""
    log = os.path.join(workdir, f"{name}.console.log")
    if os.path.exists(log):
        os.unlink(log)
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(_qemu_argv(img, test, disk, log, "1024", append))
    try:
        while not _console_has(log, marker):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"no {marker!r} on the console; log kept in {log}")
            time.sleep(0.1)
        time.sleep(delay)
    finally:
        proc.kill()
        proc.wait()
    return log


def _console_has(log: str, marker: str) -> bool:
    try:
        with open(log, errors="replace") as f:
            return marker in f.read()
    except FileNotFoundError:
        return False


def runs_dir(release: str) -> str:
    """Where a release's console logs and disks are kept."""
    d = os.path.join(CACHE, "runs", *([] if release == "bookworm" else [release]))
    os.makedirs(d, exist_ok=True)
    return d


def main(argv: list[str]) -> int:
    release = default_release()
    if argv[:1] == ["--release"] and len(argv) > 1:
        release, argv = argv[1], argv[2:]
        if release not in RELEASES:
            print(f"unknown release {release!r}: one of {', '.join(RELEASES)}", file=sys.stderr)
            return 2
    if not argv or argv[0] not in ("build", "boot"):
        print(__doc__)
        return 2
    img = build_image(release)
    if argv[0] == "build":
        print(img)
        return 0
    work = runs_dir(release)
    steps, log = boot(img, argv[1], work, *(argv[2:3] or []), timeout=float(
        os.environ.get("LUNCLONE_VM_TIMEOUT", "420")))
    for s in steps:
        print(json.dumps(s))
    print(f"console log: {log}")
    return 0 if all(s.get("ok") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
