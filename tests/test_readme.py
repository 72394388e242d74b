"""README.md is true: every Python and shell block runs as written, in order, on the demo model, and
the command-line summary names exactly the options the parser has.

A block preceded by `<!-- readme-test: skip REASON -->` is not run (the set-up commands themselves,
which CI runs; commands that need a released checkpoint or the network); the reason is reported.
Blocks run in one scratch directory, in the README's order (a later block may use what an earlier one
wrote), with `examples/` linked in and the venv's `bin` first on PATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, skip reason or None) for every fenced block of README.md."""
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start, body = m.group(1), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((line for line in reversed(lines[: start - 1]) if line.strip()), "")
        skip = SKIP.search(before)
        blocks.append((start, lang, "\n".join(body) + "\n", skip.group(1) if skip else None))
        i += 1
    return blocks


RUNNABLE = [b for b in readme_blocks() if b[1] in ("python", "bash")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, slimm_cache):
    d = tmp_path_factory.mktemp("readme")
    (d / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SLIMM_CACHE"] = str(slimm_cache)  # the demo model's artefacts, shared with the other tests
    env["PYTHONPATH"] = str(ROOT)
    return d, env


@pytest.mark.parametrize("line,lang,code,skip", RUNNABLE, ids=[f"README.md:{b[0]}-{b[1]}" for b in RUNNABLE])
def test_readme_block_runs(workdir, line, lang, code, skip):
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    cwd, env = workdir
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"README.md:{line} ({lang}) failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"


def test_command_line_summary_matches_the_parser():
    """The "Command line" block lists each command with exactly the parser's options."""
    from slimm.cli import build_parser

    text = README.read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    summary: dict[str, set[str]] = {}
    command = None
    global_options: set[str] = set()
    for line in block.splitlines():
        m = re.match(r"\s*slimm ([\w-]+)", line)
        if line.strip().startswith("slimm [--"):  # the global options line
            global_options = set(re.findall(r"(--[\w-]+)", line))
            continue
        if m:
            command = m.group(1)
            summary[command] = set()
        if command:
            summary[command] |= set(re.findall(r"(--[\w-]+)", line))
    parser = build_parser()
    assert global_options == {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {
        "--help"
    }
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(summary) == set(sub.choices), "README's command list differs from the parser's"
    for name, p in sub.choices.items():
        options = {s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        assert summary[name] == options, (
            f"slimm {name}: README lacks {sorted(options - summary[name])}, "
            f"names unknown {sorted(summary[name] - options)}"
        )
