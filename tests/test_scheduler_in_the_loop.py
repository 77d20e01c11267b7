"""vLLM 0.25's real Scheduler (prefix caching, chunked prefill, preemption) drives the memory manager
on the fake driver the way the model runner does (worker.py: add_requests / update_requests /
_remove_request), and every step checks that each scheduled request reads, through its row, the
KV of exactly its own tokens: prefix hits included, however blocks moved between spare frames.

"KV" here is a token's id and position, written through the row when the step computes it; a
prefix hit must show what another request wrote. This checks what "fresh" means against the real
scheduler's outputs (blocks past num_computed_tokens), on which spare frames rely.
"""

import os
import time

import numpy as np
import pytest

from vllm_vattention.attention.ops import is_mixed, long_decode, plan_reads
from vllm_vattention.bench import sched_replay as S
from vllm_vattention.memory import FakeDriver, KVGeometry, KVMemoryManager, RequestRows, make_layout
from vllm_vattention.worker import has_prefill

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "llama-3.1-8b")
BS = 16
PAGE = 4096
GEOMETRY = KVGeometry(num_layers=1, num_kv_heads=1, head_size=64, dtype_bytes=2)  # 256 B/token: 16 per page
# per_layer puts K and V on pages of their own: head size 128 gives 16-token blocks there too
GEOMETRIES = {"interleaved": GEOMETRY, "per_layer": KVGeometry(num_layers=1, num_kv_heads=1, head_size=128, dtype_bytes=2)}


def toks(seed: int, n: int) -> list[int]:
    return [1000 + (seed * 7919 + i * 104729) % 20000 for i in range(n)]


def apply(rows: RequestRows, out) -> None:
    """What VattnModelRunner does with a SchedulerOutput (worker.py: finish_requests -> _remove_request,
    add_requests, update_requests), minus vLLM's own request state."""
    for rid in out.finished_req_ids | (out.preempted_req_ids or set()):
        rows.remove(rid)
    for new in out.scheduled_new_reqs:  # a request seen before is removed, then added again
        rows.remove(new.req_id)
        rows.admit(new.req_id, new.block_ids[0], new.num_computed_tokens)
    c = out.scheduled_cached_reqs
    for rid, new_ids in zip(c.req_ids, c.new_block_ids):
        if new_ids is not None and new_ids[0]:
            rows.extend(rid, new_ids[0], fresh=rid not in c.resumed_req_ids)


class DoneFence:
    native_handle = 0

    def done(self):
        return True

    def wait(self):
        pass


def kv_of(token: int, pos: int) -> bytes:
    return token.to_bytes(4, "little") + pos.to_bytes(4, "little")


def drive(background, spares: int, prompts: list[list[int]], max_tokens: list[int], num_blocks: int, max_len: int,
          max_num_batched_tokens: int, max_num_seqs: int, layout_name: str = "interleaved",
          reclaim: str = "deferred", over_read: tuple[str, int, bool] | None = None, lend: int = 0,
          block_size: int = BS, growth: bool = False, keep_guards: bool = False, guard_ahead: int = 0,
          bounded_scan: bool = True, long_decodes: tuple[int, int] | None = None) -> dict:
    """Serve `prompts` with vLLM's Scheduler over the memory manager until every request finished,
    checking at every step that each scheduled request reads its own tokens' KV through its row.
    over_read=(decode_kernel, guard_tokens, clipped): as the model runner does, rows FA3 reads get the
    zero page up to their read extent (ops.read_extents), and every step checks the whole extent is
    readable. lend: lend_unused(lend) before the first step (VATTN_LEND_BLOCKS; vLLM hands the lent
    blocks out once the lower ids are taken). block_size: vLLM's (32: two pages per block here, as
    --block-size 32 gives Llama-3-8B two 2 MiB pages' worth in one block). growth: the manager's
    growth_ahead (VATTN_GROWTH_AHEAD). bounded_scan: VATTN_BOUNDED_SCAN. long_decodes: (VATTN_FA3_DECODE_TOKENS,
    VATTN_FA3_DECODE_ROW_TOKENS) with over_read: decode-only steps that reach them are planned as the
    worker plans them (FA3 over every row, the view clipped: plan_reads(long_decode=True)) and warm()
    after them clips guards (NOTES #135). Returns counts: steps, tokens checked, prefix-hit tokens,
    preemptions, the manager's stats, the long decode steps."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    sched, hasher = S.make_scheduler(MODEL, num_blocks, max_len, max_num_batched_tokens=max_num_batched_tokens,
                                     max_num_seqs=max_num_seqs, block_size=block_size)
    sched.use_v2_model_runner = True  # as in the engine we serve in (worker.py needs it): resumed = new
    driver = FakeDriver(PAGE)
    layout = make_layout(layout_name, GEOMETRIES[layout_name], PAGE, rows=2 * max_num_seqs + 1, min_row_tokens=max_len + 64,
                         block_size=block_size)
    mgr = KVMemoryManager(driver, layout, num_blocks, background=background, spare_blocks=spares, reclaim=reclaim,
                          growth_ahead=growth, keep_guards=keep_guards, guard_ahead=guard_ahead,
                          bounded_scan=bounded_scan)
    mgr.DEFER_READY_ROWS = 1  # (few rows here: so that steps with prefill chunks do defer warm())
    lent = mgr.lend_unused(lend)
    rows = RequestRows(mgr)
    live = {}
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        req = Request(str(i), list(p), SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0), None,
                      arrival_time=float(i), block_hasher=hasher)
        live[req.request_id] = req
        sched.add_request(req)
    checked, hits, steps, longs = 0, 0, 0, 0
    rules: dict[str, int] = {}  # steps by the rule ops.plan_reads chose (fa2-graphs: one FA3 launch or fa2's two)
    while sched.has_requests():
        steps += 1
        assert steps < 5000
        out = sched.schedule()
        apply(rows, out)
        ids = list(out.num_scheduled_tokens)
        reads = {rows.row(r): live[r].num_computed_tokens for r in ids}
        long = False
        if over_read and ids:
            kernel, guard, clipped = over_read
            row_of = np.array([rows.row(r) for r in ids])
            q = [out.num_scheduled_tokens[r] for r in ids]
            # (the worker asks before the step, from the computed tokens; schedule() has added the new ones)
            long = bool(long_decodes) and not out.scheduled_new_reqs and long_decode(
                q, [live[r].num_computed_tokens - n for r, n in zip(ids, q)], *long_decodes)
            longs += long
            rule, fa3, extents = plan_reads(np.array([live[r].num_computed_tokens for r in ids]),
                                            np.array(q), kernel, guard, layout.row_tokens, row_of, mgr,
                                            clip_to_view=clipped, long_decode=long)
            if is_mixed(np.array([out.num_scheduled_tokens[r] for r in ids])):
                rules[rule] = rules.get(rule, 0) + 1
            if long:  # as the worker does: spares for the guard slots the step lacks (NOTES #135)
                mgr.spare_guards(row_of[fa3], extents[fa3])
            for r, is_fa3, ext in zip(ids, fa3.tolist(), extents.tolist()):
                if is_fa3:
                    mgr.ensure_readable(rows.row(r), ext)
                reads[rows.row(r)] = ext
        if mgr.stream_mode:
            # as the GPU does: wait for this step's signal only (warming may still run in the
            # background; a step that planned nothing keeps the last number, already reached)
            seq, deadline = mgr.publish(), time.monotonic() + 30
            while mgr.flag_value() != seq:
                assert time.monotonic() < deadline, f"the flag never reached {seq}"
                time.sleep(0)
        else:
            mgr.sync()
        hits += sum(new.num_computed_tokens for new in out.scheduled_new_reqs)
        sampled = []
        for rid, n in out.num_scheduled_tokens.items():
            req, row = live[rid], rows.row(rid)
            done_before = req.num_computed_tokens - n  # schedule() has advanced it
            tokens = req.all_token_ids
            for pos in range(done_before):  # what earlier steps or other requests (prefix hits) wrote
                assert driver.read(mgr.address(row, pos, 0, 0), 8) == kv_of(tokens[pos], pos), (rid, pos)
            for pos in range(done_before, done_before + n):  # this step computes these
                driver.write(mgr.address(row, pos, 0, 0), kv_of(tokens[pos], pos))
            checked += done_before
            sampled.append([100] if req.num_computed_tokens >= req.num_tokens else [])
        for row, ext in reads.items():  # the kernel may read all of it: mapped (the zero page at least)
            for pos in list(range(0, ext, block_size)) + ([ext - 1] if ext else []):
                driver.read(mgr.address(row, pos, 0, 0), 8)
        mgr.record_reads(DoneFence(), reads)
        mgr.warm(defer=has_prefill(out), clip_guards=long)  # as the worker asks (VATTN_WARM_DEFER)
        sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                                                        sampled_token_ids=sampled))
    assert len(rows) == 0  # every request finished and gave its row back
    assert all(len(r.output_token_ids) == m for r, m in zip(live.values(), max_tokens))
    stats = mgr.stats()
    mgr.mapper.check_invariants()
    mgr.close()
    assert driver.leaks() == []
    return {"steps": steps, "checked": checked, "hits": hits, "stats": stats, "lent": lent, "rules": rules,
            "preemptions": sum(r.num_preemptions for r in live.values()), "long_decodes": longs}


@pytest.mark.parametrize("background, spares, lend, growth",
                         [(False, 0, 0, False), ("stream", 0, 0, False), ("stream", 24, 0, False), (False, 24, 0, False),
                          ("stream", 0, 12, False), ("stream", 24, 12, False), ("stream", 24, 12, True),
                          ("stream", 4, 0, True)])
def test_every_scheduled_request_reads_its_own_kv(background, spares, lend, growth):
    shared = toks(7, 40)
    prompts = [shared + toks(100 + i, 20 + 9 * i) for i in range(6)] + [toks(200 + i, 70) for i in range(6)]
    prompts += [shared + toks(300 + i, 12) for i in range(4)]  # the shared prefix again, after pressure
    r = drive(background, spares, prompts, [24] * len(prompts), num_blocks=28, max_len=256,
              max_num_batched_tokens=96, max_num_seqs=6, lend=lend, growth=growth)
    assert r["hits"] > 0 and r["checked"] > 0
    assert r["preemptions"] > 0  # the budget forced preemptions
    if spares >= 24 and not growth:  # steps with prefill chunks left warm()'s planning to later steps
        assert r["stats"]["warm_deferred"] > 0
    if spares or lend:
        assert r["stats"]["swaps"] > 0
    assert (r["stats"]["growth_maps"] > 0) == growth  # growth slots were mapped ahead, and only with it
    if lend:  # the tight budget hands every lent block out, each into a spare frame
        assert r["lent"] == lend and r["stats"]["lent_taken"] == lend and r["stats"]["lent_blocks"] == 0


@pytest.mark.parametrize("spares, lend", [(0, 0), (6, 0), (6, 6)])
def test_32_token_blocks_read_their_own_kv(spares, lend):
    """--block-size 32 (the throughput option in README): vLLM's scheduler hands out 32-token blocks,
    each two pages here (one 4 MiB block of Llama-3-8B on a GPU), under a budget that forces
    preemptions, with prefix hits, spare frames and lent blocks."""
    shared = toks(7, 72)
    prompts = [shared + toks(100 + i, 20 + 9 * i) for i in range(6)] + [toks(200 + i, 70) for i in range(6)]
    prompts += [shared + toks(300 + i, 12) for i in range(4)]
    r = drive("stream", spares, prompts, [40] * len(prompts), num_blocks=16, max_len=256,
              max_num_batched_tokens=128, max_num_seqs=6, lend=lend, block_size=32)
    assert r["hits"] > 0 and r["checked"] > 0 and r["preemptions"] > 0
    assert r["stats"]["block_size"] == 32 and r["stats"]["pages_per_block"] == 2
    if lend:
        assert r["stats"]["lent_taken"] == lend and r["stats"]["lent_blocks"] == 0


def _random_case(seed: int):
    """A random workload (rng, prompts, max_tokens, num_blocks, max_len): prompts over a few shared
    prefixes, random lengths and output lengths, a budget from just enough to roomy."""
    import random

    rng = random.Random(seed)
    prefixes = [toks(10_000 + seed * 10 + k, rng.choice((16, 40, 64))) for k in range(3)]
    prompts, max_tokens = [], []
    for i in range(rng.randrange(8, 20)):
        head = rng.choice(prefixes + [[]])
        prompts.append(head + toks(seed * 1000 + i, rng.randrange(1, 90)))
        max_tokens.append(rng.randrange(1, 40))
    max_len = 256
    longest = max(len(p) + m for p, m in zip(prompts, max_tokens))
    assert longest <= max_len
    # enough blocks for the longest request (+ a block for the scheduler's lookahead), up to roomy
    num_blocks = -(-longest // BS) + 1 + rng.randrange(0, 40)
    return rng, prompts, max_tokens, num_blocks, max_len


@pytest.mark.parametrize("seed", range(int(os.environ.get("VATTN_SCHED_SEEDS", "4"))))
def test_random_workloads_read_their_own_kv(seed):
    """Random prompts over a few shared prefixes (prefix hits), random lengths and output lengths, a
    KV budget from roomy to tight (preemptions), spares or none, foreground or stream mode, either
    layout and reclaim policy: every read matches at every step.
    VATTN_SCHED_SEEDS sets how many workloads (4 on CI)."""
    rng, prompts, max_tokens, num_blocks, max_len = _random_case(seed)
    background = rng.choice((False, "stream"))
    r = drive(background, rng.choice((0, 8, 24)), prompts, max_tokens, num_blocks, max_len,
              max_num_batched_tokens=rng.choice((32, 64, 128)), max_num_seqs=rng.choice((2, 4, 6)),
              layout_name=rng.choice(("interleaved", "per_layer")), reclaim=rng.choice(("deferred", "eager")),
              over_read=rng.choice((None, ("fa2", 64, False), ("fa2", 64, True), ("fa3", 64, True))),
              lend=rng.choice((0, 0, 6, 30)),  # (drawn last: the earlier seeds' workloads stay as they were)
              growth=rng.random() < 0.5, bounded_scan=rng.random() < 0.5)
    assert r["checked"] > 0


@pytest.mark.parametrize("seed", range(int(os.environ.get("VATTN_SCHED_SEEDS", "4"))))
def test_random_workloads_under_fa2_graphs_read_their_own_kv(seed):
    """The random workloads under VATTN_DECODE_KERNEL=fa2-graphs (the default since NOTES #114):
    guards kept and extended ahead, mixed steps as one FA3 launch or two (ops.plan_reads), spares,
    lent blocks and preemptions drawn at random; every read every kernel may make is checked
    against the fake driver's mappings at every step."""
    rng, prompts, max_tokens, num_blocks, max_len = _random_case(seed)
    r = drive(rng.choice((False, "stream")), rng.choice((0, 8, 24)), prompts, max_tokens, num_blocks, max_len,
              max_num_batched_tokens=rng.choice((32, 64, 128)), max_num_seqs=rng.choice((2, 4, 6)),
              layout_name=rng.choice(("interleaved", "per_layer")), reclaim=rng.choice(("deferred", "eager")),
              over_read=("fa2-graphs", 64, True), lend=rng.choice((0, 0, 6, 30)), keep_guards=True,
              guard_ahead=64 // BS, bounded_scan=rng.random() < 0.5)
    assert r["checked"] > 0 and set(r["rules"]) <= {"fa2-graphs", "fa2"}
    assert sum(r["rules"].values()) > 0  # (mixed steps ran: in each of seeds 0-39 they did)


@pytest.mark.parametrize("background, spares, lend", [(False, 0, 0), ("stream", 64, 0), ("stream", 48, 24),
                                                      ("stream", 0, 0)])
def test_fa2_graphs_guards_every_row_a_mixed_step_reads(background, spares, lend):
    """VATTN_DECODE_KERNEL=fa2-graphs: a mixed step runs FA3 over every request, decodes included,
    when each decode row is readable up to its FA3 extent already (guards extended in the
    background with spares, kept while requests run) and the prefill rows' guards, which the decodes
    lengthen, can all be spares (NOTES #112); otherwise it runs as fa2 (FA2 for the
    decodes: their rows need no guard), and no decode row gets a guard on the step's path, the zero
    page least of all (NOTES #110). Decode-only steps read only tokens. Every read the kernels may
    make is checked against the fake driver's mappings at every step."""
    shared = toks(7, 40)
    prompts = [shared + toks(100 + i, 20 + 9 * i) for i in range(6)] + [toks(200 + i, 70) for i in range(6)]
    prompts += [shared + toks(300 + i, 12) for i in range(4)]
    kw = dict(num_blocks=40, max_len=256, max_num_batched_tokens=96, max_num_seqs=6, lend=lend)
    r = drive(background, spares, prompts, [24] * len(prompts), over_read=("fa2-graphs", 64, True),
              keep_guards=True, guard_ahead=64 // BS, **kw)
    fa2 = drive(background, spares, prompts, [24] * len(prompts), over_read=("fa2", 64, True), **kw)
    assert r["hits"] > 0 and r["checked"] > 0
    assert sum(r["rules"].values()) == sum(fa2["rules"].values()) > 0  # (the same mixed steps)
    # one launch lengthens the prefill rows' guards to the decodes' view; it runs only where those
    # can all be spares, so it maps the zero page no more than fa2's two launches do (NOTES #112:
    # before, 10 vs 8, 2 vs 0 and 9 vs 0 here, and 194 vs 2 at 512-in-1024-out in the CPU harness)
    assert r["stats"]["zero_maps"] <= fa2["stats"]["zero_maps"]
    if spares:
        # guards of spares, extended in the background, let mixed steps run as one launch (the others:
        # a row's guard not yet extended, e.g. deferred by warm(defer), or short of spares)
        assert r["stats"]["guard_ahead_maps"] > 0 and r["rules"]["fa2-graphs"] > 0
        if not lend:  # (lent blocks take spares too)
            assert r["rules"]["fa2-graphs"] > r["rules"].get("fa2", 0)
    else:
        # no spares to guard with: no guard is extended (the zero page is no guard ahead), so the
        # mixed steps whose decode rows outgrew their prefill's guard run as fa2
        assert r["stats"]["guard_ahead_maps"] == 0 and r["rules"]["fa2"] > 0


def offline_ab_prompts(n: int) -> list[list[int]]:
    """The prompts examples/offline_ab.py (the GPU e2e tests' driver) sends, for their premises here."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(MODEL)), "examples", "offline_ab.py")
    spec = importlib.util.spec_from_file_location("offline_ab", path)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    return ab.prompts(n)


@pytest.mark.parametrize("num_prompts, handed_out", [(10, 8), (11, 30)])
def test_the_gpu_lend_tests_workload_hands_every_lent_block_out(num_prompts, handed_out):
    """The premise of tests/gpu/test_e2e_gpu.py's lent-block test, with vLLM's scheduler on the CPU:
    offline_ab's prompts with 64 tokens out, a 120-block budget, 4 sequences at once and 30 blocks
    lent (auto's quarter). 11 prompts need more blocks than the budget has, so vLLM reaches every lent
    id; the first 10 (106 blocks) did not: 8 of 30 handed out, here as on an H100 (commit 88c55db)."""
    prompts = offline_ab_prompts(num_prompts)
    r = drive("stream", 8, prompts, [64] * num_prompts, num_blocks=120, max_len=1024,
              max_num_batched_tokens=2048, max_num_seqs=4, lend=30)
    assert r["lent"] == 30 and r["checked"] > 0
    assert r["stats"]["lent_taken"] == handed_out, r["stats"]
    assert r["stats"]["lent_taken"] + r["stats"]["lent_blocks"] == 30


def test_the_gpu_per_layer_preemption_tests_workload_preempts():
    """The premise of tests/gpu/test_e2e_gpu.py's per_layer preemption test, with vLLM's scheduler on
    the CPU: offline_ab's first 10 prompts + 1,100 tokens out in three blocks of 1,024 tokens (what
    VATTN_LAYOUT=per_layer makes a block of that model). Requests grow past a block, so vLLM preempts
    (5 times here). The 80-block budget of the default layout's preemption test preempts nothing at
    1,024-token blocks (the per_layer run of NOTES #117)."""
    tiny = os.path.join(os.path.dirname(MODEL), "tiny-llama-kv8b")

    def preemptions(num_prompts, max_tokens, num_blocks, max_len):
        sched, hasher = S.make_scheduler(tiny, num_blocks, max_len, max_num_seqs=64, block_size=1024)
        reqs = [{"t": 0.0, "prompt": p, "max_tokens": max_tokens} for p in offline_ab_prompts(num_prompts)]
        return S.replay(sched, hasher, reqs, S.StepModel())["preemptions"]

    assert preemptions(10, 1100, 3, 2048) >= 3
    assert preemptions(10, 64, 80, 1024) == 0


def offline_ab_close_prompts(n: int, length: int) -> list[list[int]]:
    """examples/offline_ab.py's --close-prompts (the clipped-guard GPU test's prompts)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(MODEL)), "examples", "offline_ab.py")
    spec = importlib.util.spec_from_file_location("offline_ab", path)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    return ab.close_prompts(n, length)


@pytest.mark.parametrize("background", [False, "stream"])
def test_long_decode_steps_with_clipped_guards_read_their_own_kv(background):
    """VATTN_FA3_DECODE_TOKENS' long decode steps (FA3 over every row, the view clipped to the longest)
    and warm(clip_guards=True) after them (NOTES #135), under vLLM's scheduler with prefix hits and
    preemption: every step reads its requests' own KV, every slot up to each row's extent is mapped,
    and the guards were clipped (whole ones, 4 slots per row, are over half of the 12 spares)."""
    shared = toks(3, 48)
    prompts = [shared + toks(400 + i, 40 + i % 3) for i in range(8)] + [toks(500 + i, 88) for i in range(4)]
    r = drive(background, 12, prompts, [40] * len(prompts), num_blocks=64, max_len=256,
              max_num_batched_tokens=256, max_num_seqs=8, over_read=("fa2-graphs", 48, True), keep_guards=True,
              guard_ahead=3, long_decodes=(1, 0))
    assert r["checked"] > 0 and r["hits"] > 0 and r["long_decodes"] > 20
    assert r["stats"]["warm_guards_clipped"] > 0 and r["stats"]["guard_ahead_maps"] > 0, r["stats"]


def test_the_gpu_clipped_guard_tests_workload_clips_guards():
    """The premise of tests/gpu/test_e2e_gpu.py's clipped-guard test, with vLLM's scheduler on the CPU:
    26 of offline_ab's --close-prompts 704 (704-711 tokens), 32 tokens out, 128 spares and none lent,
    FA3's 256-token guard (16 slots ahead): whole guards (26 x 17 slots) are over half the spares, so
    after the long decode steps warm() clips them to the longest row, and they are spares."""
    r = drive("stream", 128, offline_ab_close_prompts(26, 704), [32] * 26, num_blocks=2048, max_len=4096,
              max_num_batched_tokens=16384, max_num_seqs=64, over_read=("fa2-graphs", 256, True), keep_guards=True,
              guard_ahead=16, long_decodes=(1, 0))
    s = r["stats"]
    assert r["long_decodes"] >= 30 and s["warm_guards_clipped"] >= 25 and s["guard_ahead_maps"] >= 26, s
    print({k: s[k] for k in ("warm_guards_clipped", "guard_ahead_maps", "zero_maps", "hazard_waits", "pad_maps")})
