"""CPU time of a process tree and of the machine, from Linux's /proc (NOTES #149).

A serving run's TTFT swung by up to 2x between pairs in the part the API server adds (NOTES #146:
73.1 ms for one system, 38.0 ms for stock in the same call, the other way round the call before).
Whether the API server's event loop was saturated, or the machine's CPUs were, is a question of CPU
seconds: `snapshot()` before and after a run, `between()` for what each process and its busiest
thread used over the run's wall time.
"""

from __future__ import annotations

import os
import time

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(path: str) -> tuple[str, int, float] | None:
    """(name, parent pid, CPU seconds: user + system) from a /proc .../stat file; None if it is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    # the name is in parentheses and may hold spaces or ')' itself: split after the last ')'
    name = text[text.index("(") + 1: text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def _machine_busy_s() -> float | None:
    """CPU seconds all CPUs spent busy since boot (/proc/stat's first line less idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            cols = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user and nice]
    return (sum(cols[:8]) - cols[3] - cols[4]) / _TICKS


def snapshot(root: int) -> dict:
    """CPU seconds so far of `root` and of every process below it, each with its threads', and of
    the machine, with the monotonic time they were read at."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _stat(f"/proc/{entry}/stat")
            if s is not None:
                procs[int(entry)] = s
    tree, grew = {root} if root in procs else set(), True
    while grew:
        below = {pid for pid, (_, ppid, _) in procs.items() if ppid in tree and pid not in tree}
        tree |= below
        grew = bool(below)
    out = {}
    for pid in tree:
        threads = {}
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            tids = []
        for tid in tids:
            s = _stat(f"/proc/{pid}/task/{tid}/stat")
            if s is not None:
                threads[int(tid)] = (s[0], s[2])
        out[pid] = {"name": procs[pid][0], "parent": procs[pid][1], "cpu_s": procs[pid][2], "threads": threads}
    return {"at": time.monotonic(), "root": root, "procs": out, "machine_busy_s": _machine_busy_s(),
            "cpus": os.cpu_count()}


NAMED = 8  # per process, the thread names that used the most CPU (e.g. the native "vattn-mapper")


def between(before: dict, after: dict) -> dict:
    """What the tree and the machine used from `before` to `after` (two snapshots of one root):
    wall seconds; per process (by pid, the root first) its name, CPU seconds, busiest thread
    (name, CPU seconds, share of the wall time: 1.0 is a thread that never left a CPU) and the
    CPU seconds of its threads by name (the NAMED busiest names; threads share a name); and how
    many of the machine's CPUs were busy on average. Processes that started in between count from
    zero; those that ended are left out (their time is not in /proc any more)."""
    wall = after["at"] - before["at"]
    rows = []
    for pid in sorted(after["procs"], key=lambda p: (p != after["root"], p)):
        a, b = after["procs"][pid], before["procs"].get(pid)
        threads = []
        for tid, (name, cpu) in a["threads"].items():
            was = b["threads"].get(tid, (name, 0.0))[1] if b else 0.0
            threads.append((cpu - was, name))
        top = max(threads) if threads else (0.0, "")
        by_name: dict[str, float] = {}
        for cpu, name in threads:
            by_name[name] = by_name.get(name, 0.0) + cpu
        named = sorted(by_name.items(), key=lambda kv: -kv[1])[:NAMED]
        rows.append({"pid": pid, "name": a["name"], "root": pid == after["root"],
                     "cpu_s": round(a["cpu_s"] - (b["cpu_s"] if b else 0.0), 3),
                     "busiest_thread": top[1], "busiest_thread_s": round(top[0], 3),
                     "busiest_thread_share": round(top[0] / wall, 3) if wall > 0 else None,
                     "threads_by_name": {name: round(cpu, 3) for name, cpu in named}})
    busy = None
    if after["machine_busy_s"] is not None and before["machine_busy_s"] is not None and wall > 0:
        busy = round((after["machine_busy_s"] - before["machine_busy_s"]) / wall, 2)
    return {"wall_s": round(wall, 3), "procs": rows, "machine_busy_cpus": busy, "cpus": after["cpus"]}
