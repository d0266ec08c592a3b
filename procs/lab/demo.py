"""`shmcounter demo`: a short story on a cgroup, told on real CPU processes."""
from __future__ import annotations

from procs import Machine
from shmcounter import Arena
from shmcounter.memcg import Cgroups
from shmcounter.memcg.stat import format_cgroups
from shmcounter.stat import format_stat


def _charge_pages(arena: Arena, name: str, n: int) -> int:
    """This runs in a CPU process: n single-page charges to cgroup `name`
    (try_charge_memcg); returns how many succeeded."""
    g = Cgroups(arena).cgroup(name)
    return [g.try_charge(1) for _ in range(n)].count(True)


def demo() -> None:
    """A short story on a cgroup: two CPUs charge it, their stocks grow, a limit
    hit drains every CPU's stock, a CPU is killed and its stock reclaimed."""
    with Arena.create(ncpus=2, max_counters=8) as arena:
        cg = Cgroups(arena)                   # the per-counter stock design, batch 64
        job = cg.create("job", max=200)
        with Machine(arena) as m:

            def state() -> str:
                mem = job.memory
                return (f"   memory.current {mem.usage} pages, stock {job.stock(0)} + "
                        f"{job.stock(1)} (CPU 0 + CPU 1), failcnt {mem.failcnt}, "
                        f"events.max {job.events['max']}")

            def step(cpu: int, n: int, what: str) -> None:
                ok = m.run_on(cpu, _charge_pages, arena, "job", n)
                print(f"\n== CPU {cpu} charges {n} page{'s' if n > 1 else ''}, one at a "
                      f"time: {ok} succeed{'s' if ok == 1 else ''}. {what}\n{state()}")

            print("A cgroup 'job' with memory.max = 200 pages; per-counter stock, batch "
                  "64; CPUs 0 and 1 are processes, one per core.")
            step(0, 1, "The slow path charges a batch of 64 and keeps 63 in CPU 0's "
                       "stock.")
            step(0, 10, "All 10 come from CPU 0's stock: memory.current does not move.")
            step(1, 100, "CPU 1 has its own stock: two batches, 28 pages left over.")
            step(1, 60, "Its stock runs dry; batches no longer fit under memory.max "
                        "(failcnt counts each), single pages do until 200. Then a page "
                        "is refused: try_charge drains every CPU's stock (a work message "
                        "to each; events.max counts the refusal) and retries: CPU 0's 53 "
                        "pages were stranded there.")
            step(1, 40, "They fit until 200; then the limit is real charges only: each "
                        "refused page drains and retries in vain (two events each).")
            job.memory.set_max(400)
            step(1, 5, "memory.max raised to 400: a miss refills CPU 1's stock again.")
            print(f"\n== SIGKILL CPU 1 (pid {m.pid(1)}); Machine.kill returns once the "
                  f"hotplug-dead path has run")
            reclaimed = m.kill(1)
            print(f"   reclaimed {reclaimed}; online CPUs {sorted(m.online)}\n{state()}")
            print(f"\n== shmcounter stat {arena.name}\n{format_stat(arena)}\n\n"
                  f"{format_cgroups(cg)}")
