"""Time `slimm --help` and every subcommand's `--help`, each in a fresh process (what a user waits
for), and print a Markdown table. A benchmark, not a test: the numbers depend on the machine.

    python -m benchmarks.cli_help [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time


def commands() -> list[str]:
    """ "" (plain `slimm --help`) and every subcommand the parser has."""
    from slimm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return ["", *sub.choices]


GOAL_S = 1.0  # issue 16: every help under a second


def time_help(command: str, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (user + system) seconds of each run. On a loaded machine the wall clock
    includes waiting for a core; the CPU time is what the command itself costs."""
    argv = [sys.executable, "-m", "slimm", *([command] if command else []), "--help"]
    wall, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        wall.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cli_help", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per command (default 5)")
    args = p.parse_args(argv)
    print(f"| command | wall s, median | wall s, max | CPU s, median | under {GOAL_S:.0f} s |")
    print("| --- | ---: | ---: | ---: | --- |")
    for command in commands():
        wall, cpu = time_help(command, args.repeats)
        med = statistics.median(wall)
        name = f"`slimm {command + ' ' if command else ''}--help`"
        print(
            f"| {name} | {med:.2f} | {max(wall):.2f} | {statistics.median(cpu):.2f} | {'yes' if med < GOAL_S else 'no'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
