"""Random allocate / grow / alias / free / reuse sequences against the fake driver.

After every step: the slot table, the reverse index and the driver's page table agree; no slot
that an unfinished step may read has changed since that step was launched; and at the end
everything is released.
"""

from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from helpers import PAGE, SMALL, FakeStream, ManagerMachineBase, machine_settings
from vllm_vattention.memory import FakeDriver, KVMemoryManager, make_layout

NUM_BLOCKS = 12
ROWS = 3


class ManagerMachine(ManagerMachineBase):
    @initialize(layout=st.sampled_from(["interleaved", "per_layer"]),
                reclaim=st.sampled_from(["deferred", "eager"]), background=st.sampled_from([False, True, "stream"]))
    def setup(self, layout, reclaim, background):
        self.driver = FakeDriver(PAGE)
        lay = make_layout(layout, SMALL, PAGE, rows=ROWS, min_row_tokens=60)
        # background: driver calls run on the native thread (csrc/mapper.cpp) through the fake's table;
        # "stream": hazard waits also move to that thread, and each step publishes a flag
        self.mgr = KVMemoryManager(self.driver, lay, NUM_BLOCKS, reclaim=reclaim, background=background)
        self.bs = lay.block_size
        self.active: dict[int, list[int]] = {}  # row -> blocks
        self.stream = FakeStream()
        self.fences: list = []  # (fence, {row: slots it may read, as they were at launch})

    @precondition(lambda self: self.mgr.num_free_rows > 0)
    @rule()
    def acquire(self):
        self.active[self.mgr.acquire_row()] = []

    @precondition(lambda self: self.active)
    @rule(data=st.data(), n=st.integers(1, 3))
    def grow(self, data, n):
        row = data.draw(st.sampled_from(sorted(self.active)))
        have = self.active[row]
        n = min(n, self.mgr.layout.blocks_per_row - len(have))
        new = data.draw(st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=n, max_size=n))
        self.mgr.set_blocks(row, new, start=len(have))
        have.extend(new)

    @precondition(lambda self: len(self.active) >= 1)
    @rule(data=st.data())
    def replace_all(self, data):
        """A preempted-and-resumed request, or a new one reusing a row: a whole new block list."""
        row = data.draw(st.sampled_from(sorted(self.active)))
        k = data.draw(st.integers(0, self.mgr.layout.blocks_per_row))
        blocks = data.draw(st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=k, max_size=k))
        self.mgr.set_blocks(row, blocks)
        self.active[row] = blocks

    @precondition(lambda self: self.active)
    @rule(data=st.data(), extra=st.integers(0, 40))
    def launch_step(self, data, extra):
        rows = data.draw(st.lists(st.sampled_from(sorted(self.active)), unique=True, min_size=1))
        reads = {}
        for r in rows:
            n = len(self.active[r]) * self.bs + extra  # FA3-style over-read past the end
            self.mgr.ensure_readable(r, n)
            reads[r] = n
        f = self.launch(reads)
        snap = {r: list(self.mgr.mapper.slots[r][:-(-n // self.bs)]) for r, n in reads.items()}
        self.fences.append((f, snap))

    @invariant()
    def page_table_matches_slots(self):
        if not hasattr(self, "mgr"):
            return
        m = self.mgr
        self.check_page_table()
        assert m.flag_value() == m._seq  # every published step's mappings are done (stream mode)
        for row, blocks in self.active.items():
            assert m.mapper.slots[row][:len(blocks)] == blocks

    @invariant()
    def nothing_in_flight_was_changed(self):
        if hasattr(self, "mgr"):
            self.mgr.sync()  # stream mode: the native thread waits for in-flight steps before unmapping
        for f, snap in getattr(self, "fences", []):
            if not f.completed:
                for r, before in snap.items():
                    assert self.mgr.mapper.slots[r][:len(before)] == before


ManagerMachine.TestCase.settings = machine_settings()
TestManagerMachine = ManagerMachine.TestCase
