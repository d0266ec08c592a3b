"""The command line: demo tells its story with numbers; stat reads a running arena,
once or with --watch; bad arguments get a clear error (exit code 2)."""
from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from shmcounter.memcg import Cgroups
from shmcounter.memcg.stat import format_cgroups
from shmcounter.stat import format_stat

import memcg_tasks


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmcounter.cli", *args],
                          check=False, capture_output=True, text=True, timeout=120)


def test_demo_tells_its_story_with_numbers():
    done = run("demo")
    assert done.returncode == 0, done.stderr
    states = [line.strip() for line in done.stdout.splitlines()
              if line.startswith("   memory.current")]
    assert states == [     # after each step: 1, 10 (CPU 0), 100, 60, 40, 5 (CPU 1), kill
        "memory.current 64 pages, stock 63 + 0 (CPU 0 + CPU 1), failcnt 0, events.max 0",
        "memory.current 64 pages, stock 53 + 0 (CPU 0 + CPU 1), failcnt 0, events.max 0",
        "memory.current 192 pages, stock 53 + 28 (CPU 0 + CPU 1), failcnt 0, events.max 0",
        "memory.current 171 pages, stock 0 + 0 (CPU 0 + CPU 1), failcnt 34, events.max 1",
        "memory.current 200 pages, stock 0 + 0 (CPU 0 + CPU 1), failcnt 107, events.max 23",
        "memory.current 264 pages, stock 0 + 59 (CPU 0 + CPU 1), failcnt 107, events.max 23",
        "memory.current 205 pages, stock 0 + 0 (CPU 0 + CPU 1), failcnt 107, events.max 23",
    ]
    assert "   reclaimed {'job': 59}; online CPUs [0]" in done.stdout.splitlines()
    assert done.stdout.rstrip().endswith(
        "  job   online          839680     1638400      1081344          23           0"
        "           0")


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


def test_stat_shows_the_cgroup_tree(arena):
    cg = Cgroups(arena)
    g = cg.create("a", max=1000)
    assert g.try_charge(5)                  # not a CPU: an exact charge, no stock
    done = run("stat", arena.name)
    assert done.returncode == 0, done.stderr
    assert done.stdout == format_stat(arena) + "\n\n" + format_cgroups(Cgroups(arena)) + "\n"
    g.uncharge(5)


def test_stat_shows_a_v4_tree_with_its_cap_and_its_stock(arena, make_machine):
    cg = Cgroups(arena, variant="v4", stock_cap=True)
    cg.create("a", max=1000)
    m = make_machine(2)
    assert m.run_on(1, memcg_tasks.charge, arena, "a", 5) == [True]    # 59 in its word
    done = run("stat", arena.name)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-4:] == [
        "cgroups: design v4 with the stock cap (E14), memsw off, batch 64; "
        "{'walks': 1, 'evictions': 0, 'overflows': 0, 'flushes': 0}",
        "cgroup  state   memory.current  memory.max  memory.peak  events.max  stock.cpu0  "
        "stock.cpu1",
        "root    online          262144         max       262144           0           0"
        "           0",
        "  a     online          262144     4096000       262144           0           0"
        "          59"]
    m.run_on(1, memcg_tasks.uncharge, arena, "a", 5)


def test_stat_watch_shows_a_view_per_interval(arena):
    arena.new_counter("root").charge(5)
    done = run("stat", arena.name, "--watch", "--interval", "0.05", "--count", "2")
    assert done.returncode == 0, done.stderr
    view = format_stat(arena).splitlines()
    first, second = done.stdout.split("\n\n")        # not a terminal: a blank line between
    for shown in (first, second):
        stamp, *rest = shown.rstrip("\n").splitlines()
        assert re.fullmatch(r"\d\d:\d\d:\d\d, every 0.05 s \(Ctrl-C stops\)", stamp)
        assert rest == view
    arena.counter("root").uncharge(5)


def test_stat_watch_exits_0_on_ctrl_c(arena):
    watcher = subprocess.Popen([sys.executable, "-m", "shmcounter.cli", "stat", arena.name,
                                "--watch", "--interval", "0.05"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert watcher.stdout is not None
    try:
        assert "Ctrl-C stops" in watcher.stdout.readline()     # the first view is up
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
        watcher.wait()
    assert (watcher.returncode, err) == (0, "")


@pytest.mark.parametrize("args, message", [
    (["--count", "2"], "shmcounter stat: error: --interval and --count go with --watch"),
    (["--watch", "--interval", "0"], "shmcounter stat: error: argument --interval: the "
                                     "interval must be a number of seconds in [0.01, 3600], "
                                     "got '0'"),
    (["--watch", "--count", "-1"], "shmcounter stat: error: argument --count: count must be "
                                   "an int in [1, 1000000000], got '-1'"),
])
def test_stat_bad_arguments(args, message):
    done = run("stat", "shmcounter_nope", *args)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (2, message)
