"""Time `slimm --help` and every subcommand's `--help`, each in a fresh process (what a user waits
for), and print a Markdown table. A benchmark, not a test: the numbers depend on the machine.

    python -m benchmarks.cli_help [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = ("", "generate", "export", "convert", "operators", "bench", "demo-checkpoint")
GOAL_S = 1.0  # issue 16: every help under a second


def time_help(command: str, repeats: int) -> list[float]:
    argv = [sys.executable, "-m", "slimm", *([command] if command else []), "--help"]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cli_help", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per command (default 5)")
    args = p.parse_args(argv)
    print(f"| command | median s | max s | under {GOAL_S:.0f} s |")
    print("| --- | ---: | ---: | --- |")
    for command in COMMANDS:
        times = time_help(command, args.repeats)
        med = statistics.median(times)
        name = f"`slimm {command + ' ' if command else ''}--help`"
        print(f"| {name} | {med:.2f} | {max(times):.2f} | {'yes' if med < GOAL_S else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
