"""Build lunclone's man pages from the CLI's own --help, so they cannot
drift from it: help2man (Debian's help2man package) reads each command's
help; this script names the pages, keeps each example on its own line and
adds SEE ALSO.

    python scripts/build_man.py [--out DIR]      # default build/man

Pages (section 8, system administration): lunclone(8), and
lunclone-COMMAND(8) for every command and lunclone-GROUP-COMMAND(8) for
the commands of a group (clone, restore), as git names its pages.  The
CLI run is this tree's (a ``lunclone`` wrapper on PATH for help2man), so
a package build needs nothing installed but click and help2man.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(cmd, path: list[str]) -> Iterator[tuple[list[str], object]]:
    """(path, command) for the command and every visible one below it."""
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        if not sub.hidden:
            yield from commands(sub, path + [name])


def page_name(path: list[str]) -> str:
    return "-".join(["lunclone", *path])


def one_example_a_line(roff: str) -> str:
    """help2man makes the EXAMPLES section one paragraph: break each line."""
    head, sep, tail = roff.partition(".SH EXAMPLES\n")
    if not sep:
        return roff
    body, sep2, rest = tail.partition("\n.SH ")
    lines = [ln + "\n.br" if ln and not ln.startswith(".") else ln for ln in body.split("\n")]
    return head + sep + "\n".join(lines) + (sep2 + rest if sep2 else "")


def build(out: str) -> list[str]:
    sys.path.insert(0, os.path.join(ROOT, "daemon"))
    from lunclone import __version__
    from lunclone.cli import main
    bindir = tempfile.mkdtemp(prefix="lunclone-man")
    wrapper = os.path.join(bindir, "lunclone")
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.argv[0] = \"lunclone\"; "
                f"sys.path.insert(0, \"{os.path.join(ROOT, 'daemon')}\"); "
                "from lunclone.cli import run; run()' \"$@\"\n")
    os.chmod(wrapper, 0o755)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"], COLUMNS="80")
    os.makedirs(out, exist_ok=True)
    every = list(commands(main, []))
    written = []
    for path, cmd in every:
        name = page_name(path)
        roff = subprocess.run(
            ["help2man", "--no-info", "--section", "8", "--source", "lunclone",
             "--version-string", __version__, "--manual", "lunclone",
             "--name", cmd.get_short_help_str(limit=80), " ".join(["lunclone", *path])],
            env=env, capture_output=True, text=True, check=True).stdout
        roff = re.sub(r"^\.TH \S+ ", f".TH {name.upper()} ", roff, count=1, flags=re.M)
        # NAME as whatis (lintian) wants it: the page's own name
        roff = re.sub(r"^(\.SH NAME\n)(.*?) \\- ", lambda m: f"{m.group(1)}{name} \\- ", roff,
                      count=1, flags=re.M)
        roff = one_example_a_line(roff)
        related = [page_name(p) for p, _ in every if p != path and
                   (p[:len(path)] == path or p == path[:len(p)] or len(p) == 1 and not path)]
        if related:
            roff += ".SH \"SEE ALSO\"\n" + ",\n".join(
                f".BR {r} (8)" for r in sorted(set(related))) + "\n"
        target = os.path.join(out, f"{name}.8")
        with open(target, "w") as f:
            f.write(roff)
        written.append(target)
    os.unlink(wrapper)
    os.rmdir(bindir)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "build", "man"))
    for path in build(p.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
