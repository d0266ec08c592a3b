"""The laboratory on top of the CPU runtime: the benchmark (bench, workload, peer,
report, plot), the hotplug torture and the demo. Nothing in shmcounter or in the
runtime (procs.machine, procs.worker) imports it; the CLI composes it."""
