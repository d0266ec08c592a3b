"""A writer that is not a CPU, SIGKILLed inside an op, is repaired without anyone
having to know: by Arena.repair(), by a charge about to be refused, and by
procs.Machine's monitor. The op in flight counts wholly or not at all."""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import numpy as np
import pytest

from shmcounter import Repair
from shmcounter.invariants import InvariantError, check_invariants
from shmcounter.memcg import Cgroups
from shmcounter.segment import R_IN_OP, R_PID

import memcg_tasks
import tasks


@pytest.fixture
def tree(arena):
    """root -> mid -> leaf (max 12); this test process holds 1 page of leaf."""
    root = arena.new_counter("root")
    mid = arena.new_counter("mid", parent=root)
    leaf = arena.new_counter("leaf", parent=mid, max=12)
    assert leaf.try_charge(1) == (True, None)
    return root, mid, leaf


def usages(*counters):
    return tuple(c.usage for c in counters)


def park_and_kill(cpus, arena, point, task, *args):
    """A non-CPU writer (a plain process, not registered as a CPU) runs
    task(arena, *args), is parked at `point` inside its op, then SIGKILLed there.
    Returns its pid. Its row is 3: rows 0-1 are the CPUs', 2 is this process's."""
    w = cpus(None)
    w.call(tasks.park_at, point)
    w.start(task, arena, *args)
    tasks.wait_stopped(w.pid)
    assert arena.rows[3, R_PID] == w.pid
    os.kill(w.pid, signal.SIGKILL)
    w.process.join(30)
    return w.pid


# ---- the scenario of the issue: 11/1/1 ----------------------------------------

def test_arena_repair_rolls_back_a_dead_writers_half_charge(tree, cpus, arena):
    root, mid, leaf = tree
    pid = park_and_kill(cpus, arena, "charge:level", tasks.try_charge, "leaf", 10)
    # the charge of 10 reached leaf, not mid or root: I1 is broken
    assert usages(leaf, mid, root) == (11, 1, 1)
    with pytest.raises(InvariantError, match=r"^I1 broken at 'leaf': usage 11 != real 1 "
                                             r"\+ stock 0$"):
        check_invariants(arena, {"leaf": 1})
    report = arena.repair()
    assert report == Repair(rows=(3,), pids=(pid,), ops=(3,), pages={"leaf": 10})
    assert repr(report) == (f"Repair(rows=(3,), pids=({pid},), ops=(3,), pages={{'leaf': 10}}, "
                            f"forward=())")
    assert usages(leaf, mid, root) == (1, 1, 1)
    assert (arena.rows[3, R_PID], arena.rows[3, R_IN_OP]) == (0, 0)       # row free again
    check_invariants(arena, {"leaf": 1})
    assert not arena.repair() and arena.repair() == Repair()               # nothing left
    leaf.uncharge(1)


def test_a_charge_refused_because_of_a_dead_op_repairs_then_succeeds(tree, cpus, arena):
    """leaf max 12 holds 1 real page; a charge of 2 fits. While the writer that
    charged 10 to leaf only is alive (stopped inside its op), the refusal stands
    and nothing is rolled back; once it is dead, the refused charge repairs and
    its retry succeeds. Each refusal counts in failcnt, the retried one too."""
    root, mid, leaf = tree
    w = cpus(None)
    w.call(tasks.park_at, "charge:level")
    w.start(tasks.try_charge, arena, "leaf", 10)
    tasks.wait_stopped(w.pid)
    assert usages(leaf, mid, root) == (11, 1, 1)
    assert leaf.try_charge(2) == (False, leaf)          # a live writer is not repaired
    assert (usages(leaf, mid, root), leaf.failcnt) == ((11, 1, 1), 1)
    os.kill(w.pid, signal.SIGKILL)
    w.process.join(30)
    assert leaf.try_charge(2) == (True, None)
    assert (usages(leaf, mid, root), leaf.failcnt) == ((3, 3, 3), 2)
    assert (arena.rows[3, R_PID], arena.repair()) == (0, Repair())        # done already
    check_invariants(arena, {"leaf": 3})
    leaf.uncharge(3)


def test_a_dead_uncharge_is_completed_so_a_charge_into_its_room_stays_under_max(tree, cpus,
                                                                              arena):
    """leaf (max 12) holds 1 page here and 11 charged by a writer, which then
    uncharges its 11 and is SIGKILLed after leaf's level (mid and root still
    count them). This process charges 11 into the room at leaf: 12, at max.
    Rolled back, the dead uncharge would put its 11 back into leaf: 23 > 12.
    The repair completes it instead, at mid and root: 12 everywhere, forward."""
    root, mid, leaf = tree
    w = cpus(None)
    assert w.call(tasks.try_charge, arena, "leaf", 11) == (True, None)
    w.call(tasks.park_at, "uncharge:level")
    w.start(tasks.uncharge, arena, "leaf", 11)
    tasks.wait_stopped(w.pid)
    assert usages(leaf, mid, root) == (1, 12, 12)
    assert leaf.try_charge(11) == (True, None)
    assert usages(leaf, mid, root) == (12, 23, 23)
    os.kill(w.pid, signal.SIGKILL)
    w.process.join(30)
    assert arena.repair() == Repair(rows=(3,), pids=(w.pid,), ops=(3,),
                                    pages={"mid": 11, "root": 11}, forward=(3,))
    assert usages(leaf, mid, root) == (12, 12, 12) and leaf.max == 12
    check_invariants(arena, {"leaf": 12})
    leaf.uncharge(12)


@pytest.mark.parametrize("variant, events", [
    ("fixed", 0),      # PageCounter.try_charge repairs and retries: memcg sees no refusal
    ("legacy", 1),     # the legacy charge refuses: a max event, then repair, drain, retry
])
def test_a_refused_memcg_charge_repairs_a_dead_writer_too(arena, cpus, variant, events):
    cg = Cgroups(arena, variant=variant)
    job = cg.create("job", max=12)
    assert job.try_charge(1)
    pid = park_and_kill(cpus, arena, "charge:level", memcg_tasks.charge, "job", 10)
    assert usages(job.memory, cg.root.memory) == (11, 1)
    assert job.try_charge(2)
    assert usages(job.memory, cg.root.memory) == (3, 3)
    assert (job.memory.failcnt, job.events["max"], job.events_local["max"]) == (1, events, events)
    assert arena.rows[3, R_PID] == 0 and pid > 0
    check_invariants(arena, {"job": 3})
    job.uncharge(3)


def test_the_machine_repairs_a_dead_writer_that_is_not_its_cpu(tree, cpus, arena, make_machine):
    root, mid, leaf = tree
    m = make_machine(1)
    w = cpus(None)
    w.call(tasks.park_at, "uncharge:level")
    w.start(tasks.uncharge, arena, "leaf", 1)
    tasks.wait_stopped(w.pid)
    assert usages(leaf, mid, root) == (0, 1, 1)        # uncharged from leaf only
    os.kill(w.pid, signal.SIGKILL)
    w.process.join(30)
    # nobody asks: the monitor sees the writer die (its pidfd, or a rescan) and
    # repairs; an uncharge is completed (rolled forward), at mid and root too
    assert m.wait_repaired(w.pid, timeout=30) == Repair(
        rows=(3,), pids=(w.pid,), ops=(3,), pages={"mid": 1, "root": 1}, forward=(3,))
    assert usages(leaf, mid, root) == (0, 0, 0)
    assert arena.rows[3, R_PID] == 0
    check_invariants(arena, {"leaf": 0})


# ---- SIGKILL at random instants, with a ledger ---------------------------------

SIZES = (1, 2, 3, 10)
KILLS = 24


def _pack(held: int, delta: int) -> int:
    """One ledger word: pages held (high half), the op in flight (low half, signed)."""
    return held << 32 | (delta & 0xFFFF_FFFF)


def _unpack(word: int) -> tuple[int, int]:
    delta = word & 0xFFFF_FFFF
    return word >> 32, delta - (1 << 32) if delta >= 1 << 31 else delta


def _ledger_writer(name: str, ledger, seed: int) -> None:
    """This runs in a separate process (forked; not a CPU): charge and uncharge
    leaf in a tight loop. ledger[0] holds (held, op in flight) and changes with
    one store per step: the op is written before it starts, and the result after
    it ends; ledger[1] counts the ops."""
    from shmcounter import Arena
    arena = Arena.attach(name)
    leaf = arena.counter("leaf")
    rng = random.Random(seed)
    held = _unpack(ledger[0])[0]
    while True:
        if held and rng.random() < 0.5:
            n = rng.randint(1, held)
            ledger[0] = _pack(held, -n)
            leaf.uncharge(n)
            held -= n
        else:
            n = rng.choice(SIZES)
            ledger[0] = _pack(held, n)
            if leaf.try_charge(n)[0]:
                held += n
        ledger[0] = _pack(held, 0)
        ledger[1] += 1


def _kill_at_random(arena, ledger, rng: random.Random,
                    aim: str | None) -> tuple[int, int, bool]:
    """Start a ledger writer, let it run some ops, then SIGKILL it at a random
    instant; aimed ("op", "uncharge"): stop it (SIGSTOP) at random instants until
    it is caught inside an op (in_op set), an uncharge's if so aimed (the ledger
    names an uncharge in flight: an uncharge is the shorter op, rarely caught by
    chance), and kill it there. Returns (pid, row, caught inside an op)."""
    p = mp.get_context("fork").Process(
        target=_ledger_writer, args=(arena.name, ledger, rng.randrange(2**32)), daemon=True)
    ledger[1] = 0
    p.start()
    assert p.pid is not None
    caught = False
    try:
        target, deadline = rng.randint(1, 300), time.monotonic() + 30
        while ledger[1] < target:
            assert time.monotonic() < deadline, "the writer does not run"
            time.sleep(0.0005)
        row = int(np.flatnonzero(arena.rows[:, R_PID] == p.pid)[0])
        for _ in range(1000 if aim else 0):
            os.kill(p.pid, signal.SIGSTOP)
            tasks.wait_stopped(p.pid)
            caught = bool(arena.rows[row, R_IN_OP]) and (
                aim == "op" or _unpack(ledger[0])[1] < 0)
            if caught:
                break
            os.kill(p.pid, signal.SIGCONT)
            for _ in range(rng.randrange(2000)):
                pass
        if not caught:
            for _ in range(rng.randrange(20_000)):
                pass
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    return p.pid, row, caught


@pytest.mark.parametrize("path", ["repair", "refusal", "machine"])
def test_random_kills_of_a_writer_count_its_op_wholly_or_not_at_all(arena, make_machine, path):
    """KILLS writers, one after another, each SIGKILLed at a random instant (every
    other one inside an op, half of those inside an uncharge) while it charges
    and uncharges leaf (max 40, under mid, max 45, where this process holds 5
    pages of `other`). After each kill, one path repairs: Arena.repair(), a
    refused charge, or the Machine's monitor. Then leaf's usage is the ledger's
    pages plus the op in flight, wholly or not at all (not at all when the repair
    rolled a charge back, wholly when it completed an uncharge), and every
    invariant holds with that ledger."""
    root = arena.new_counter("root")
    mid = arena.new_counter("mid", parent=root, max=45)
    leaf = arena.new_counter("leaf", parent=mid, max=40)
    other = arena.new_counter("other", parent=mid)
    assert other.try_charge(5) == (True, None)
    m = make_machine(1) if path == "machine" else None
    ledger = mp.get_context("fork").RawArray("q", 2)
    rng = random.Random(f"{path}-7")
    rolled_back = completed = caught_in_op = 0
    for kill in range(KILLS):
        aim = ("op", None, "uncharge", None)[kill % 4]
        pid, row, caught = _kill_at_random(arena, ledger, rng, aim)
        caught_in_op += caught
        held, delta = _unpack(ledger[0])
        before = {c.name: c.usage for c in (leaf, mid, root)}
        if path == "refusal":
            assert leaf.try_charge(41) == (False, leaf)   # always refused: repairs first
            ops, report = (), None
            # the refusal repaired the dead op in progress (and freed the row)
            assert arena.rows[row, R_IN_OP] == 0 and (not caught or arena.rows[row, R_PID] == 0)
        else:
            if path == "repair":
                report = arena.repair()
            else:
                assert m is not None
                report = m.wait_repaired(pid, timeout=30)
            assert (report.rows, report.pids) == ((row,), (pid,))
            assert arena.rows[row, R_PID] == 0
            if path == "repair":
                assert report.pages == {name: before[name] - c.usage for name, c in
                                        (("leaf", leaf), ("mid", mid), ("root", root))
                                        if before[name] != c.usage}
            ops = report.ops
        unexplained = leaf.usage - held
        if row in ops and report is not None and row in report.forward:
            assert delta < 0 and unexplained == delta, (held, delta, report)   # wholly
            completed += 1
        elif row in ops:
            assert unexplained == 0, (held, delta, report)    # rolled back: not at all
            rolled_back += 1
        else:
            assert unexplained in (0, delta), (held, delta, leaf.usage)
        real = held + unexplained
        check_invariants(arena, {"leaf": real, "other": 5})
        ledger[0] = _pack(real, 0)
    assert caught_in_op >= KILLS // 4             # the aimed kills land inside ops
    if path != "refusal":                 # charges rolled back, uncharges completed
        assert rolled_back + completed >= KILLS // 4 and rolled_back and completed
    leaf.uncharge(_unpack(ledger[0])[0])
    other.uncharge(5)
