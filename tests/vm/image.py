"""The test VM: build a cached Debian 12 image with lunclone installed from
its Debian package (built from the working tree, as scripts/build-deb
builds it from HEAD), boot it under qemu (TCG, no network), collect what
the guest reports.

Cache (outside the repository, ``$LUNCLONE_VM_CACHE`` or
/var/cache/lunclone-vm):
    base-<hash of the package list>/root     debootstrap --variant=minbase
    image-<hash of packages + project>/      disk.raw, vmlinuz, initrd.img
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
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
PACKAGES = sorted("""
systemd-sysv udev kmod nbd-client nbdkit nbdkit-plugin-python python3 python3-venv
python3-click python3-setuptools python3-pip python3-libnbd python3-pyroute2 libnbd-bin e2fsprogs fio
linux-image-amd64 initramfs-tools procps util-linux coreutils
""".split())
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


def build_base() -> str:
    base = os.path.join(CACHE, f"base-{_hash(' '.join(PACKAGES).encode())}")
    root = os.path.join(base, "root")
    if os.path.exists(os.path.join(base, "done")):
        return root
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    t0 = time.monotonic()
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, root,
          MIRROR], "debootstrap", timeout=1800)
    open(os.path.join(base, "done"), "w").write(f"{time.monotonic() - t0:.0f}\n")
    return root


def build_image() -> str:
    """The image directory (disk.raw, vmlinuz, initrd.img), built if needed."""
    base_root = build_base()
    img = os.path.join(CACHE, f"image-{_hash(base_root.encode(), project_hash().encode())}")
    if os.path.exists(os.path.join(img, "done")):
        return img
    shutil.rmtree(img, ignore_errors=True)
    root = os.path.join(img, "root")
    os.makedirs(img)
    t0 = time.monotonic()
    _run(["cp", "-a", base_root, root], "copy of the base")
    _customize(root)
    shutil.copy(build_deb(img), os.path.join(root, "tmp", "lunclone.deb"))
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
    open(os.path.join(img, "done"), "w").write(f"{time.monotonic() - t0:.0f}\n")
    return img


def build_deb(workdir: str) -> str:
    """The .deb of the working tree's PROJECT_FILES (dpkg-buildpackage -b
    in a copy, with the system's PATH, as scripts/build-deb does for HEAD)."""
    src = os.path.join(workdir, "src", "lunclone")
    os.makedirs(src)
    for top in PROJECT_FILES:
        path = os.path.join(ROOT, top)
        dst = os.path.join(src, top)
        if os.path.isdir(path):
            shutil.copytree(path, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(path, dst)
    return _dpkg_buildpackage(src)


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


def _qemu_argv(img: str, test: str, disk: str, log: str, mem: str, append: str) -> list[str]:
    return ["qemu-system-x86_64", "-machine", "q35", "-cpu", "max", "-smp", "2", "-m", mem,
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


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "boot"):
        print(__doc__)
        return 2
    img = build_image()
    if argv[0] == "build":
        print(img)
        return 0
    work = os.path.join(CACHE, "runs")
    os.makedirs(work, exist_ok=True)
    steps, log = boot(img, argv[1], work, *(argv[2:3] or []), timeout=float(
        os.environ.get("LUNCLONE_VM_TIMEOUT", "420")))
    for s in steps:
        print(json.dumps(s))
    print(f"console log: {log}")
    return 0 if all(s.get("ok") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
