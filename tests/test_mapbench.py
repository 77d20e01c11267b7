"""The mapper micro-benchmark's driver work, on the fake driver (the benchmark itself needs a GPU)."""

import pytest

from helpers import PAGE
from vllm_vattention.bench.mapbench import map_cycle_ops
from vllm_vattention.memory import FakeDriver, FakeDriverError
from vllm_vattention.memory.native import NativeExecutor


def test_the_contention_phase_maps_and_unmaps_cleanly_many_times_over():
    d = FakeDriver(PAGE, capacity=1 << 24)
    va = d.reserve(8 * PAGE)
    hs = [d.create(PAGE) for _ in range(8)]
    ex = NativeExecutor(*d.native_table())
    ops = map_cycle_ops(va, hs, PAGE)
    assert len(ops) == 3 * 8
    for _ in range(4):  # as contention() queues them: rounds back to back
        ex.run(ops)
    ex.wait()
    s = ex.stats()
    ex.close()
    assert d.native_errors == []  # the fake rejects double maps, unmaps of unmapped memory, ...
    assert s["native_driver_calls"] == 4 * 3 * 8
    with pytest.raises(FakeDriverError, match="unmapped"):
        d.write(va, b"x")  # nothing is mapped any more
    for h in hs:
        d.release(h)
    d.free_reservation(va, 8 * PAGE)
    assert d.leaks() == []
