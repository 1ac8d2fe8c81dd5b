"""Cheap checks of the install scripts' package lists.

The real check is a run in a fresh Debian 12 root (too slow for the suite):
    debootstrap --variant=minbase bookworm ROOT http://deb.debian.org/debian
    copy the tree to ROOT/src, mount proc on ROOT/proc,
    chroot ROOT bash -c 'cd /src && bash scripts/install'
"""
from __future__ import annotations

import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What `pip install --no-build-isolation` of this project imports from the
# system, by build backend.  Debian 12's setuptools (66) has no bdist_wheel
# of its own: without python3-wheel pip fails with "invalid command 'bdist_wheel'".
NO_ISOLATION_NEEDS = {"setuptools.build_meta": {"python3-setuptools", "python3-wheel"}}


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def apt_packages(script: str) -> set[str]:
    """The words of the script's bash package arrays (``pkgs=(...)``,
    ``PACKAGES=(...)``), comments left out."""
    words: set[str] = set()
    for body in re.findall(r"^\s*(?:pkgs|PACKAGES)=\((.*?)\)", script, re.S | re.M):
        for line in body.splitlines():
            words.update(line.split("#", 1)[0].split())
    return words


def build_needs() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        backend = tomllib.load(f)["build-system"]["build-backend"]
    assert backend in NO_ISOLATION_NEEDS, f"add the Debian packages {backend} needs"
    return NO_ISOLATION_NEEDS[backend] | {"python3-venv"}


def test_apt_packages_parses_a_multiline_array():
    script = "x\npkgs=(a b  # c d\n     e)\nPACKAGES=(f\n  # g\n  h)\n"
    assert apt_packages(script) == {"a", "b", "e", "f", "h"}


def test_install_lists_what_pip_without_build_isolation_needs():
    script = read("scripts/install")
    assert "--no-build-isolation" in script
    missing = build_needs() - apt_packages(script)
    assert not missing, f"scripts/install does not install {sorted(missing)}"


def test_setup_lists_what_its_pip_install_needs():
    script = read("scripts/setup")
    needs = build_needs() if "--no-build-isolation" in script else {"python3-venv"}
    missing = needs - apt_packages(script)
    assert not missing, f"scripts/setup does not install {sorted(missing)}"
