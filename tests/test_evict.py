"""The eviction simulator on small generated traces: Belady is optimal (brute force), the
discard-prediction algorithm with correct bits costs exactly OPT, LRU matches a reference, phases
and oracles follow their definitions, the online predictor sees no future, and the simulator counts
vLLM's prefix hits."""

import json
import random

import pytest

from vllm_vattention.evict import policies as P
from vllm_vattention.evict import predictors as R
from vllm_vattention.evict import report
from vllm_vattention.evict import trace as T
from vllm_vattention.evict.sim import simulate


def brute_force_opt(seq, k):
    """Minimum faults over every eviction choice (tiny inputs only)."""
    states = {frozenset(): 0}
    for p in seq:
        nxt = {}
        for cache, cost in states.items():
            if p in cache:
                options = [(cache, cost)]
            elif len(cache) < k:
                options = [(cache | {p}, cost + 1)]
            else:
                options = [((cache - {v}) | {p}, cost + 1) for v in cache]
            for c, v in options:
                if v < nxt.get(c, 1 << 30):
                    nxt[c] = v
        states = nxt
    return min(states.values())


def synthetic_trace_file(tmp_path, seed):
    """A generated multi-turn trace written in the Mooncake format."""
    path = tmp_path / "t.jsonl"
    with open(path, "w") as f:
        for r in T.synthetic(num_conversations=25, turns=4, seed=seed):
            f.write(json.dumps({"timestamp": r.t_ms, "input_length": r.input_len, "output_length": 1,
                                "hash_ids": r.blocks}) + "\n")
    return path


def run(policy, seq, bits=None):
    for t, p in enumerate(seq):
        policy.access(p, t, bits[t] if bits else 0)
    return policy.faults


@pytest.mark.parametrize("seed", range(30))
def test_belady_is_optimal(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 3)
    seq = [rng.randrange(5) for _ in range(rng.randint(1, 12))]
    assert run(P.Belady(k, P.next_uses(seq)), seq) == brute_force_opt(seq, k)


@pytest.mark.parametrize("seed", range(40))
def test_discard_marking_with_correct_bits_costs_exactly_opt(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 8)
    seq = [int(rng.paretovariate(1.2)) % 30 for _ in range(rng.randint(1, 400))]
    bits, opt = R.discard_oracle(seq, k)
    assert run(P.DiscardMarking(k, seed), seq, bits) == opt


def test_discard_bits_are_belady_evictions():
    seq = [1, 2, 3, 1, 2, 4, 1]
    bits, opt = R.discard_oracle(seq, 2)
    # Belady (k=2): 1,2 in; 3 evicts 2 (next use 4, furthest); ... 4 evicts 2 (never again)
    assert opt == 5
    assert bits == [0, 1, 1, 0, 1, 1, 1]


@pytest.mark.parametrize("seed", range(20))
def test_lru_matches_a_reference(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 6)
    seq = [rng.randrange(12) for _ in range(200)]
    cache, faults = [], 0
    for p in seq:
        if p in cache:
            cache.remove(p)
        else:
            faults += 1
            if len(cache) == k:
                cache.pop(0)
        cache.append(p)
    assert run(P.LRU(k), seq) == faults


def test_marking_never_evicts_a_page_marked_in_its_phase():
    rng = random.Random(3)
    k = 4
    seq = [rng.randrange(9) for _ in range(500)]
    ph = R.phases(seq, k)
    m = P.Marking(k, 0)
    marked_in_phase: dict[int, set] = {}
    for t, p in enumerate(seq):
        before = set(m.cache)
        m.access(p, t)
        evicted = before - m.cache
        assert not (evicted & marked_in_phase.get(ph[t], set()))
        marked_in_phase.setdefault(ph[t], set()).add(p)
    # a marking algorithm faults at most k times per phase
    assert m.faults <= k * (ph[-1] + 1)


def test_phase_oracle_small_case():
    k = 2
    seq = [1, 2, 3, 1, 4, 4, 2]
    ph = R.phases(seq, k)
    assert ph == [0, 0, 1, 1, 2, 2, 2]  # {1,2} {3,1} {4,2}: a phase ends before its (k+1)-th distinct page
    # the next phase of phase 0 holds {3, 1}, of phase 1 {4, 2}, of phase 2 nothing
    assert R.phase_oracle(seq, k) == [1, 0, 0, 0, 0, 0, 0]


def test_noisy_flips_at_the_requested_rate():
    bits = [0] * 10_000
    out, flipped = R.noisy(bits, 0.2, seed=1)
    assert flipped == sum(out) and 1800 < flipped < 2200
    assert R.noisy(bits, 0.0)[1] == 0


def test_parents_link_each_turn_to_the_previous_one():
    reqs = T.synthetic(num_conversations=30, turns=4, seed=2)
    par = T.parents(reqs)
    linked = [(i, p) for i, p in enumerate(par) if p >= 0]
    assert linked
    for i, p in linked:
        assert p < i
        full = reqs[p].blocks[:-1]
        assert reqs[i].blocks[:len(full)] == full
    # every non-first turn is linked: its blocks extend an earlier request beyond the shared prompt
    firsts = sum(1 for i, r in enumerate(reqs)
                 if not any(reqs[j].blocks[:-1] == r.blocks[:len(reqs[j].blocks) - 1] for j in range(i)))
    assert len(linked) == len(reqs) - firsts


def test_online_predictor_sees_no_future():
    reqs = T.synthetic(num_conversations=60, turns=5, seed=4)
    pr = T.paged(reqs, 256)
    full = R.online_reuse(reqs, pr, T.parents(reqs), horizon_ms=2_000)
    n = len(reqs) // 2
    head = R.online_reuse(reqs[:n], pr[:n], T.parents(reqs[:n]), horizon_ms=2_000)
    assert full[:len(head)] == head
    assert 0 < sum(full) < len(full)


def test_paging_splits_blocks_and_keeps_token_counts():
    reqs = [T.Request(0, 1100, 10, [7, 8, 9])]  # 512 + 512 + 76 tokens
    pr = T.paged(reqs, 128)[0]
    assert pr.pages == [28, 29, 30, 31, 32, 33, 34, 35, 36]
    assert pr.page_tokens == [128] * 8 + [76]
    with pytest.raises(ValueError, match="granularity 100"):
        T.paged(reqs, 100)


def test_simulator_counts_prefix_hits_up_to_the_first_miss():
    reqs = [T.Request(0, 1536, 1, [1, 2, 3]), T.Request(1, 1536, 1, [1, 9, 3])]
    pr = T.paged(reqs, 512)
    r = simulate(pr, P.LRU(10))
    # second request: 1 hits (prefix), 9 misses, 3 hits but after the first miss: recomputed
    assert r.faults == 4 and r.page_hit_rate == pytest.approx(2 / 6)
    assert r.prefix_hit_tokens == 512 and r.recomputed_tokens == 3 * 512 + 2 * 512


def test_report_on_a_small_trace(tmp_path):
    path = synthetic_trace_file(tmp_path, seed=5)
    doc = report.sweep(str(path), [512, 128], [0.1, 0.3], log=lambda *_: None)
    labels = {(r["granularity"], r["policy"], r["predictor"]) for r in doc["runs"]}
    assert (512, "Discard-Marking", "online") in labels and (128, "Belady", None) in labels
    for r in doc["runs"]:
        assert r["faults"] >= r["opt_faults"]  # nothing beats the offline optimum
        if r["policy"] == "Discard-Marking" and r["predictor"] == "oracle":
            assert r["faults"] == r["opt_faults"]
    md = report.markdown({**doc, "commit": "abc", "date": "d"})
    assert "## Bound checks" in md and "| 512 | 10% |" in md


@pytest.mark.parametrize("seed", range(10))
def test_discard_lru_is_lru_without_predictions_and_evicts_discard_bits_first(seed):
    rng = random.Random(seed)
    seq = [rng.randrange(15) for _ in range(300)]
    assert run(P.DiscardLRU(4), seq, [0] * len(seq)) == run(P.LRU(4), seq)
    d = P.DiscardLRU(3)
    for t, (p, b) in enumerate([(1, 0), (2, 1), (3, 0), (4, 0)]):
        d.access(p, t, b)
    assert set(d.keep) == {1, 3, 4} and not d.drop  # page 2 (bit 1) went first, not LRU page 1


def test_threshold_study_on_a_small_trace(tmp_path):
    path = synthetic_trace_file(tmp_path, seed=6)
    doc = report.threshold_study(str(path), [0.2], thresholds=(2, 3))
    assert len(doc["rows"]) == 1 + 2 * 2
    assert all(0.0 <= r["prefix_hit_rate"] <= 1.0 for r in doc["rows"])
    assert "m=3, lru" in report.threshold_markdown(doc)
    with pytest.raises(ValueError, match="drop_order='fifo'"):
        P.DiscardLRU(4, drop_order="fifo")
