"""The eviction study: sweep cache size, prediction error and granularity over a trace.

    vattn-evict-sim --trace ../shared/traces/mooncake_conversation_trace.jsonl --out benchmarks/results

Writes `<date>-evict-sim.json` (every run), `.md` (tables and the bound checks) and `.png` (if
matplotlib is installed). Cache sizes are fractions of the trace's distinct pages (its working set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

from . import policies as P
from . import predictors as R
from . import trace as T
from ..bench.env import commit, pyplot, save_figure, write_markdown
from .sim import simulate

NOISE = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def cache_independent(reqs, pr, par) -> dict:
    """What every cache size of one granularity shares: the page sequence, next-use times and the
    online predictors (none depends on k)."""
    seq, _ = T.flatten(pr)
    return {"seq": seq, "nxt": P.next_uses(seq), "keep": R.online_reuse(reqs, pr, par),
            # what the vLLM hook computes, at m=5 (its default when these results were made; now 2,
            # chosen with vLLM's scheduler: benchmarks/results/*-sched-replay-threshold.md)
            "shared": R.online_reuse(reqs, pr, par, continuation=False, min_shared=5)}


def run_point(pr, shared_inputs: dict, k: int, noise=NOISE, seed: int = 0, log=print) -> list[dict]:
    """Every policy at one cache size. Returns rows (dicts)."""
    seq, nxt = shared_inputs["seq"], shared_inputs["nxt"]
    keep, shared = shared_inputs["keep"], shared_inputs["shared"]
    belady = P.Belady(k, nxt)
    opt_run = simulate(pr, belady).as_dict()  # one Belady run: OPT's metrics and the discard oracle
    discard, opt = R.discard_bits(belady), belady.faults
    phase = R.phase_oracle(seq, k)
    opt_run.update(predictor=None, noise=None, wrong_bits=None, opt_faults=opt)
    rows = [opt_run]

    def add(policy, bits, predictor, rate=None, flipped=None):
        r = simulate(pr, policy, bits).as_dict()
        r.update(predictor=predictor, noise=rate, wrong_bits=flipped, opt_faults=opt)
        rows.append(r)

    add(P.LRU(k), None, None)
    add(P.Marking(k, seed), None, None)
    for cls, oracle in ((P.DiscardMarking, discard), (P.DiscardLRU, discard), (P.PhaseMarking, phase)):
        for rate in noise:
            bits, flipped = R.noisy(oracle, rate, seed) if rate else (oracle, 0)
            add(cls(k, seed), bits, "oracle" if not rate else "noisy-oracle", rate, flipped)
        for label, pred in (("online", keep), ("online-shared", shared)):
            online = [1 - b for b in pred] if cls.uses == "discard" else pred
            wrong = sum(a != b for a, b in zip(online, oracle))
            add(cls(k, seed), online, label, None, wrong)
    log(f"  k={k}: OPT {opt}, LRU {rows[1]['faults']}, Marking {rows[2]['faults']}")
    return rows


def sweep(trace_path: str, granularities, fractions, noise=NOISE, limit=None, log=print,
          fine_noise=(0.0, 0.1, 0.5)) -> dict:
    reqs = T.load_jsonl(trace_path, limit)
    par = T.parents(reqs)
    out = {"trace": os.path.basename(trace_path), "requests": len(reqs),
           "conversations_continued": sum(p >= 0 for p in par), "runs": []}
    for g in granularities:
        pr = T.paged(reqs, g)
        inputs = cache_independent(reqs, pr, par)
        distinct = len(set(inputs["seq"]))
        log(f"granularity {g}: {len(inputs['seq'])} page requests, {distinct} distinct pages")
        for f in fractions:
            k = max(1, int(f * distinct))
            t = time.time()
            for r in run_point(pr, inputs, k, noise if g == granularities[0] else fine_noise, log=log):
                r.update(granularity=g, fraction=f, distinct_pages=distinct)
                out["runs"].append(r)
            log(f"  ({time.time() - t:.1f} s)")
    return out


def threshold_study(trace_path: str, fractions, thresholds=(2, 3, 5), granularity: int = 512,
                    limit=None) -> dict:
    """Discard-LRU with the shared-block predictor (what the vLLM hook computes) for several
    thresholds m and both orders among dropped blocks, against LRU: prefix hit rates."""
    reqs = T.load_jsonl(trace_path, limit)
    par = T.parents(reqs)
    pr = T.paged(reqs, granularity)
    seq, _ = T.flatten(pr)
    distinct = len(set(seq))
    drops = {m: [1 - b for b in R.online_reuse(reqs, pr, par, min_shared=m, continuation=False)]
             for m in thresholds}
    rows = []
    for f in fractions:
        k = max(1, int(f * distinct))
        rows.append({"fraction": f, "k": k, "policy": "LRU", "m": None, "drop_order": None,
                     "prefix_hit_rate": simulate(pr, P.LRU(k)).prefix_hit_rate})
        for m, drop in drops.items():
            for order in ("mru", "lru"):
                r = simulate(pr, P.DiscardLRU(k, drop_order=order), drop)
                rows.append({"fraction": f, "k": k, "policy": "Discard-LRU", "m": m, "drop_order": order,
                             "prefix_hit_rate": r.prefix_hit_rate})
    return {"trace": os.path.basename(trace_path), "granularity": granularity, "rows": rows}


def threshold_markdown(doc: dict) -> str:
    rows = doc["rows"]
    fr = sorted({r["fraction"] for r in rows})
    L = [f"# Discard-LRU with the shared-block predictor: threshold and drop order ({doc['granularity']}-token pages)", "",
         f"Trace `{doc['trace']}`. Prefix hit rate (vLLM semantics). m: a block is kept once m requests used it. "
         "mru: newest dropped block evicted first (what prepending to vLLM's free queue does); lru: oldest first.", "",
         "| policy | " + " | ".join(f"k={f:.0%}" for f in fr) + " |", "|---|" + "---|" * len(fr)]
    labels = list(dict.fromkeys((r["policy"], r["m"], r["drop_order"]) for r in rows))
    for pol, m, order in labels:
        vals = [next(r["prefix_hit_rate"] for r in rows if (r["policy"], r["m"], r["drop_order"]) == (pol, m, order)
                     and r["fraction"] == f) for f in fr]
        name = pol if m is None else f"{pol}, m={m}, {order}"
        L.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(L) + "\n"


def _label(r) -> str:
    if r["predictor"] is None:
        return r["policy"]
    if r["predictor"] == "noisy-oracle":
        return f"{r['policy']} (oracle, {int(100 * r['noise'])}% flipped)"
    return f"{r['policy']} ({r['predictor']})"


def bound_checks(runs: list[dict]) -> list[str]:
    """Consistency, smoothness and robustness, measured."""
    lines = []
    for g in sorted({r["granularity"] for r in runs}, reverse=True):
        for f in sorted({r["fraction"] for r in runs if r["granularity"] == g}):
            rs = [r for r in runs if r["granularity"] == g and r["fraction"] == f]
            opt = rs[0]["opt_faults"]
            k = rs[0]["k"]
            marking = next(r["faults"] for r in rs if r["policy"] == "Marking")
            for pol in ("Discard-Marking", "Discard-LRU", "Phase-Marking"):
                mine = [r for r in rs if r["policy"] == pol]
                oracle = next(r for r in mine if r["predictor"] == "oracle")
                noisy = [r for r in mine if r["predictor"] == "noisy-oracle"]
                worst = max(noisy, key=lambda r: r["noise"]) if noisy else None
                slopes = [(r["faults"] - opt) / r["wrong_bits"] for r in noisy if r["wrong_bits"]]
                lines.append(
                    f"| {g} | {f:.0%} | {k} | {pol} | {oracle['faults'] / opt:.4f} | "
                    + (f"{min(slopes):.3f}-{max(slopes):.3f}" if slopes else "-") + " | "
                    + (f"{worst['faults'] / opt:.3f} / {worst['faults'] / marking:.3f}" if worst else "-")
                    + f" | {marking / opt:.3f} | {math.log(k) + 0.5772:.1f} |")
    return lines


def markdown(doc: dict) -> str:
    runs = doc["runs"]
    L = ["# Prefix-cache eviction with one-bit predictions: trace simulation", "",
         f"Trace: `{doc['trace']}` ({doc['requests']} requests, {doc['conversations_continued']} continue an "
         f"earlier request). Commit {doc.get('commit')}, {doc.get('date')}. Cache sizes are fractions of the "
         "distinct pages at each granularity. Prefix hit rate: share of input tokens served from cache "
         "under vLLM's semantics (hits up to a request's first missing page). Faults: page misses, the "
         "paper's cost.", ""]
    for g in sorted({r["granularity"] for r in runs}, reverse=True):
        rs = [r for r in runs if r["granularity"] == g]
        fr = sorted({r["fraction"] for r in rs})
        labels = list(dict.fromkeys(_label(r) for r in rs))
        L += [f"## {g}-token pages", "", "Prefix hit rate (higher is better):", "",
              "| policy | " + " | ".join(f"k={f:.0%}" for f in fr) + " |", "|---|" + "---|" * len(fr)]
        for lab in labels:
            vals = [next((r for r in rs if _label(r) == lab and r["fraction"] == f), None) for f in fr]
            L.append(f"| {lab} | " + " | ".join(f"{v['prefix_hit_rate']:.3f}" if v else "-" for v in vals) + " |")
        L += ["", "Faults / OPT's faults (lower is better; recomputed prefill tokens in the JSON):", "",
              "| policy | " + " | ".join(f"k={f:.0%}" for f in fr) + " |", "|---|" + "---|" * len(fr)]
        for lab in labels:
            vals = [next((r for r in rs if _label(r) == lab and r["fraction"] == f), None) for f in fr]
            L.append(f"| {lab} | " + " | ".join(f"{v['faults'] / v['opt_faults']:.3f}" if v else "-" for v in vals) + " |")
        L.append("")
    L += ["## Bound checks (measured)", "",
          "Consistency: faults with correct bits / OPT. Smoothness: extra faults per wrong bit, (faults - OPT) / "
          "wrong bits, over the noise levels (a bounded range = linear in the error). Robustness: at the "
          "highest noise, faults / OPT and / randomized Marking (the classical O(log k) algorithm; H_k ~ ln k + 0.58 "
          "is its competitive ratio).", "",
          "| page tokens | k | pages | policy | consistency | extra faults per wrong bit | worst noise: / OPT, / Marking | Marking / OPT | H_k |",
          "|---|---|---|---|---|---|---|---|---|"]
    L += bound_checks(runs)
    return "\n".join(L) + "\n"


def plot(doc: dict, png: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    runs = doc["runs"]
    g = max(r["granularity"] for r in runs)
    rs = [r for r in runs if r["granularity"] == g]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    fr = sorted({r["fraction"] for r in rs})
    for lab in dict.fromkeys(_label(r) for r in rs):
        if "flipped" in lab:
            continue
        ys = [next((r["prefix_hit_rate"] for r in rs if _label(r) == lab and r["fraction"] == f), None) for f in fr]
        a.plot([100 * f for f in fr], ys, marker="o", label=lab)
    a.set_xscale("log")
    a.set_xlabel("cache size, % of distinct pages")
    a.set_ylabel("prefix hit rate (tokens)")
    a.set_title(f"{g}-token pages")
    a.legend(fontsize=7)
    mid = sorted(fr)[len(fr) // 2]
    for pol in ("Discard-Marking", "Discard-LRU", "Phase-Marking"):
        pts = sorted((r["noise"] or 0.0, r["faults"] / r["opt_faults"]) for r in rs
                     if r["policy"] == pol and r["fraction"] == mid and r["predictor"] in ("oracle", "noisy-oracle"))
        b.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=pol)
    for base in ("LRU", "Marking"):
        y = next(r["faults"] / r["opt_faults"] for r in rs if r["policy"] == base and r["fraction"] == mid)
        b.axhline(y, ls="--", lw=0.8, label=base, color="gray" if base == "LRU" else "k")
    b.set_xlabel("fraction of prediction bits flipped")
    b.set_ylabel("faults / OPT")
    b.set_title(f"k = {mid:.0%} of distinct pages")
    b.legend(fontsize=7)
    save_figure(fig, png)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--granularities", default="512,128,64")
    ap.add_argument("--fractions", default="0.01,0.02,0.05,0.1,0.2,0.35,0.5")
    ap.add_argument("--limit", type=int, default=None, help="only the first N requests")
    ap.add_argument("--noise", default=",".join(map(str, NOISE)),
                    help="bit-flip rates at the first granularity (later ones use 0, 0.1, 0.5)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--threshold-study", action="store_true",
                    help="only the Discard-LRU threshold / drop-order table (512-token pages)")
    args = ap.parse_args(argv)
    if not os.path.exists(args.trace):
        ap.error(f"trace {args.trace} not found (the Mooncake trace is in ../shared/traces/)")
    if args.threshold_study:
        doc = threshold_study(args.trace, [float(x) for x in args.fractions.split(",")], limit=args.limit)
        stem = os.path.join(args.out, f"{datetime.date.today().isoformat()}-evict-threshold{args.tag}")
        os.makedirs(args.out, exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(doc, f)
        write_markdown(stem, threshold_markdown(doc))
        return
    doc = sweep(args.trace, [int(x) for x in args.granularities.split(",")],
                [float(x) for x in args.fractions.split(",")], limit=args.limit,
                noise=tuple(float(x) for x in args.noise.split(",")))
    doc["commit"] = commit()
    doc["date"] = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{doc['date']}-evict-sim{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f)
    write_markdown(stem, markdown(doc))
    print(f"wrote {stem}.json, .md" + (", .png" if plot(doc, stem + ".png") else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
