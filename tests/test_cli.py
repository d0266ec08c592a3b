"""The command line: demo tells its story with numbers; stat reads a running arena;
bad arguments get a clear error."""
from __future__ import annotations

import subprocess
import sys

from shmcounter.cli import format_stat


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmcounter.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_demo_ends_with_the_killed_cpus_stock_reclaimed():
    done = run("demo")
    assert done.returncode == 0, done.stderr
    assert "reclaimed {'job': 59}; online CPUs [0]" in done.stdout
    assert done.stdout.rstrip().endswith("  job      192  400   251       96     64     0     0")


def test_stat_of_a_running_arena(arena):
    root = arena.new_counter("root")
    arena.new_counter("a", parent=root, max=1000).charge(5)
    done = run("stat", arena.name)
    assert done.returncode == 0, done.stderr
    assert done.stdout == format_stat(arena) + "\n"
    assert done.stdout.splitlines()[1:] == [
        "counter  usage   max  peak  failcnt  batch  cpu0  cpu1",
        "root         5   max     5        0      0     0     0",
        "  a          5  1000     5        0      0     0     0",
    ]
    arena.counter("a").uncharge(5)


def test_bad_arguments():
    done = run("stat", "shmcounter_nope")
    assert (done.returncode, done.stderr) == (
        2, "shmcounter stat: no shared-memory segment named 'shmcounter_nope'\n")
    done = run("frobnicate")
    assert done.returncode == 2 and "invalid choice: 'frobnicate'" in done.stderr
