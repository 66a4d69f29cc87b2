"""Alternates shell commands and prints each one's median wall and CPU time.

    python tests/benches/ab.py RUNS "CMD_A {out}" "CMD_B {out}" ...

Each run executes every command once, in turn, so a change in the machine's load reaches them
alike; `{out}` is replaced by a scratch path (and that path, and `{out}.journal`, are removed
after each command), for commands that write a store or a file. CPU time is the command's and
its children's, user and system. The first command is the baseline of the ratios. Used for the
before/after figures of `docs/benchmarks.md`; e.g. two builds of `coral`:

    python tests/benches/ab.py 21 "/tmp/coral-old --store {out} add MODEL --name m" \\
        "/tmp/coral-new --store {out} add MODEL --name m"
"""

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def timed(cmd, out):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd.replace("{out}", out), shell=True, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p in (out, out + ".journal"):
        if os.path.isdir(p):
            subprocess.run(["rm", "-rf", p], check=True)
        elif os.path.exists(p):
            os.remove(p)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    runs, cmds = int(sys.argv[1]), sys.argv[2:]
    times = [[] for _ in cmds]
    with tempfile.TemporaryDirectory(prefix="coral-ab-") as work:
        for _ in range(runs):
            for i, cmd in enumerate(cmds):
                times[i].append(timed(cmd, os.path.join(work, f"out{i}")))
    base = None
    for cmd, t in zip(cmds, times):
        wall = statistics.median(w for w, _ in t) * 1000
        cpu = statistics.median(c for _, c in t) * 1000
        base = base or wall
        print(f"{wall:7.1f} ms wall {cpu:7.1f} ms CPU  x{wall / base:.3f}  {cmd}")


if __name__ == "__main__":
    main()
