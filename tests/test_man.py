"""Man pages and --help (issue 18, item 2): built from the CLI's own help
by scripts/build_man.py (help2man), rendered by man's own formatter;
every command's help ends with examples."""
import os
import shlex
import subprocess
import sys

import click
import pytest

from helpers import LUNCLONE, which_or_skip
from lunclone.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def visible(cmd, path=()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        if not sub.hidden:
            yield from visible(sub, path + (name,))


def help_of(*path: str) -> str:
    return subprocess.run([LUNCLONE, *path, "--help"], capture_output=True, text=True,
                          check=True, env=dict(os.environ, COLUMNS="80")).stdout


def resolve(line: str):
    """The command an example runs and the options it gives (its first
    command, before a comment, ';', '&&' or '>')."""
    words = []
    for w in shlex.split(line.split("#")[0])[1:]:
        if w in (";", "&&", ">"):
            break
        words.append(w)
    cmd = main
    while isinstance(cmd, click.Group) and words:
        name = words[0] if words[0] in cmd.commands else "start"  # restore SOURCE --from
        cmd = cmd.commands[name]
        if name == words[0]:
            words.pop(0)
    return cmd, [w.split("=")[0] for w in words if w.startswith("--")]


def test_every_help_ends_with_real_examples():
    """Two or three examples (one where there is one way to use it), each
    running a real command with options it has."""
    for path, cmd in visible(main):
        text = help_of(*path)
        head, sep, examples = text.rpartition("\nExamples:\n")
        assert sep, f"lunclone {' '.join(path)} --help has no examples"
        lines = [ln.strip() for ln in examples.splitlines() if ln.strip()]
        assert 1 <= len(lines) <= 3 and all(ln.startswith("lunclone ") for ln in lines), lines
        for line in lines:
            ran, opts = resolve(line)
            known = {o for p in ran.params for o in p.opts}
            assert set(opts) <= known, (line, set(opts) - known)
            if isinstance(cmd, click.Group) and path:  # a group's examples use its commands
                assert ran is cmd or ran in cmd.commands.values(), line
            elif path:
                assert ran is cmd, (line, path)


def test_restore_help_shows_the_start_options():
    text = help_of("restore")
    for opt in ("--from CLONE", "--rate LIMIT", "--unprotected", "--wait", "--dry-run"):
        assert opt in text, opt
    assert "lunclone restore SOURCE --from CLONE" in text.splitlines()[0]
    assert {"pause", "rate", "resume"} <= {ln.split()[0] for ln in text.split("Commands:")[1]
                                           .split("Examples:")[0].splitlines() if ln.strip()}


def test_man_pages_render_with_every_option_and_example(tmp_path):
    which_or_skip(pytest, "help2man", "man")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_man.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for path, cmd in visible(main):
        page = tmp_path / ("-".join(("lunclone",) + path) + ".8")
        assert page.exists(), page
        rendered = subprocess.run(["man", "-l", "-P", "cat", str(page)], capture_output=True,
                                  text=True, check=True, env=dict(os.environ, MANWIDTH="100"))
        text = rendered.stdout
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert p.opts[-1] in text, (page.name, p.opts)
        assert "EXAMPLES" in text and "SEE ALSO" in text, page.name
        warnings = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                                  capture_output=True, text=True).stderr
        assert not warnings, (page.name, warnings)
    restore = (tmp_path / "lunclone-restore.8").read_text()
    assert restore.startswith(".\\\" DO NOT MODIFY") and ".TH LUNCLONE-RESTORE \"8\"" in restore
