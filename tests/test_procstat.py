"""procstat (NOTES #149): CPU seconds of a real process tree on this machine, from /proc."""

import subprocess
import sys
import textwrap

import pytest

from vllm_vattention.bench import procstat

BURN = "import time\ndef burn(s):\n    t = time.process_time()\n    while time.process_time() - t < s:\n        pass\n"

# the root starts a child and waits; the child says 'ready', waits for a line, then starts a grandchild
# (which burns 0.2 s of CPU and blocks) and burns 0.4 s itself, then says 'done'
ROOT = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
    child.wait()
""")
CHILD = BURN + textwrap.dedent("""
    import subprocess, sys
    print("ready", flush=True)
    sys.stdin.readline()
    grand = subprocess.Popen([sys.executable, "-c", sys.argv[1] + "burn(0.2)\\nprint('g', flush=True)\\nimport sys\\nsys.stdin.readline()\\n"],
                             stdout=subprocess.PIPE, text=True)
    burn(0.4)
    grand.stdout.readline()
    print("done", flush=True)
    sys.stdin.readline()
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_between_counts_each_process_below_the_root_and_its_busiest_thread():
    p = subprocess.Popen([sys.executable, "-c", ROOT, CHILD, BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        before = procstat.snapshot(p.pid)
        assert len(before["procs"]) == 2  # the root and the child; the grandchild is not born yet
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "done"
        after = procstat.snapshot(p.pid)
        used = procstat.between(before, after)
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    rows = used["procs"]
    assert len(rows) == 3 and rows[0]["root"] and rows[0]["pid"] == p.pid and not any(r["root"] for r in rows[1:])
    root, *below = rows
    assert root["cpu_s"] < 0.15  # it only waited
    child, grand = sorted(below, key=lambda r: -r["cpu_s"])
    assert child["cpu_s"] >= 0.35 and 0.15 <= grand["cpu_s"] < 0.35  # the grandchild counts from zero
    assert child["busiest_thread_s"] >= 0.35 and child["busiest_thread_s"] <= child["cpu_s"] + 0.02
    assert 0.3 <= child["busiest_thread_share"] <= 1.05 and child["busiest_thread"]
    assert used["wall_s"] >= 0.4 and used["cpus"] >= 1
    # the machine was at least as busy as the two burners (the counters tick every 10 ms)
    assert used["machine_busy_cpus"] >= 0.8 * (child["cpu_s"] + grand["cpu_s"]) / used["wall_s"]


def test_a_root_that_is_gone_has_no_processes():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    snap = procstat.snapshot(p.pid)
    assert snap["procs"] == {} and procstat.between(snap, procstat.snapshot(p.pid))["procs"] == []


def test_a_name_with_spaces_and_parentheses_is_read_whole(tmp_path):
    stat = tmp_path / "stat"
    # pid (name) state ppid ... utime (14) stime (15): a name such as vLLM's may hold ') ' itself
    fields = ["S", "77"] + ["0"] * 9 + ["250", "50"] + ["0"] * 5
    stat.write_text("123 (VLLM::Engine) x) " + " ".join(fields) + "\n")
    name, ppid, cpu = procstat._stat(str(stat))
    assert (name, ppid) == ("VLLM::Engine) x", 77) and cpu == pytest.approx(300 / procstat._TICKS)
    assert procstat._stat(str(tmp_path / "gone")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_the_native_mapping_thread_is_named_and_its_cpu_counted_by_that_name():
    """csrc/mapper.cpp names its thread "vattn-mapper", so the suite's CPU table can tell it from the
    engine's other threads: here the fake driver's calls run on it and burn CPU there."""
    import os
    import time

    from vllm_vattention.bench.mapbench import map_cycle_ops
    from vllm_vattention.bench.suite import MAPPER_THREAD
    from vllm_vattention.memory import PAGE_SIZE, FakeDriver
    from vllm_vattention.memory.native import NativeExecutor

    class SlowMap(FakeDriver):
        def map(self, va, size, handle, offset=0):
            t = time.thread_time()
            while time.thread_time() - t < 0.01:  # 10 ms of CPU per call, on the calling thread
                pass
            super().map(va, size, handle, offset)

    d = SlowMap(PAGE_SIZE, capacity=8 * PAGE_SIZE)
    va = d.reserve(4 * PAGE_SIZE)
    hs = [d.create(PAGE_SIZE) for _ in range(4)]
    ex = NativeExecutor(*d.native_table())
    try:
        before = procstat.snapshot(os.getpid())
        for _ in range(5):
            ex.run(map_cycle_ops(va, hs, PAGE_SIZE))
        ex.wait()
        (me,) = procstat.between(before, procstat.snapshot(os.getpid()))["procs"]
    finally:
        ex.close()
    assert d.native_errors == []
    assert me["threads_by_name"][MAPPER_THREAD] >= 0.15  # 20 maps x 10 ms, ticks of 10 ms
