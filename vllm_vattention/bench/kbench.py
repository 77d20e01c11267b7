"""Decode-attention kernels at serving geometry: stock vLLM's paged FA3 against FA2 over vAttention's
rows, FA2's split count swept (VATTN_FA2_SPLITS), and FA3 over the same rows (VATTN_DECODE_KERNEL=fa3:
no block table, its own split heuristic). GPU only.

    vattn-kbench --out benchmarks/results/   (writes <date>-<gpu>-kbench.json and .md)

Each shape is batch x context (Llama-3-8B: 32 query heads, 8 KV heads, head size 128, bf16). Rows are
as long as the serving engine's (`--row-tokens`, default context + 1024 out + 256 guard, rounded up
to 256), because a CUDA-graph decode step hands FA2 whole rows and FA2 picks its splits from the row
length. Layouts: `interleaved` (the default's: all 32 layers' K and V of a token together, a 128 KiB
token stride; needs rows x row_tokens x 128 KiB of memory, skipped when it does not fit) and
`per_layer` (a layer's rows contiguous). Every kernel reads the same keys and values (the paged cache
is filled from the rows through a shuffled block table); outputs are compared with paged FA3's.

Two controls for why rows can lose to paged FA3 at large batches (NOTES #73): `--paged-orders
shuffled,sequential` also times paged FA3 with each sequence's blocks in order (the rows' address
pattern under the paged kernel: slow too means the addresses, fast means the kernel's paged path),
and `--row-pads 0,16` also times rows whose stride is that many tokens longer than the kernel's
view (row starts off the 2 MiB grid: a memory-partition effect would move).

Plain-memory rows are one physically contiguous allocation with every row whole. Layout `vmm` is the
engine's own arrangement instead: the interleaved layout over a VMM reservation, each 2 MiB frame
created on its own, each row mapping only its sequence's blocks (in shuffled order) and FA3's guard,
rows as long as `--vmm-row-tokens` (the engine's: max_model_len + 256, rounded up to 16). It needs
batch x context x 128 KiB of frames (48 GiB at 256 x 1536), not whole rows.

`--map-churn` (vmm rows only) times FA2 and FA3 once more while the native mapping thread maps,
sets access to and unmaps one frame at a spare row of the same reservation, back to back: page-table
changes during the kernels, as the engine makes them while a step runs (8192-in-256-out's decode
steps: ~7 driver calls per step). In the engine FA2 lost more per decode step than this benchmark
gives it, FA3 did not (NOTES #122); if FA2 slows under churn and FA3 less, that is why. Driver
calls may also hold up the timing thread's launches (the GPU then idles between kernels); that
would slow both kernels alike, so the difference between them is the reading, not either alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

from ..errors import VattnError
from .env import environment, header, results_stem, write_markdown
from .mapbench import LLAMA3_8B  # (HQ/HKV/D/LAYERS below are its shape)

HQ, HKV, D, LAYERS, BLOCK = 32, 8, 128, 32, 16
DEFAULT_SHAPES = "24x16384,16x16384,8x32768,64x4096,128x1024"  # (interleaved rows fit an H100)
DEFAULT_SPLITS = "0,1,2,3,4,6,8,12,16"


def _default_spread(context: int) -> int:
    """Contexts spread over a decode batch's last 1024 tokens (a quarter of short ones)."""
    return max(1, min(1024, context // 4, context - 1))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'24x16384,256x1024' -> [(24, 16384), (256, 1024)] (batch, context)."""
    out = []
    for item in text.split(","):
        try:
            b, n = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r} is not BATCHxCONTEXT, e.g. 24x16384") from None
        if b <= 0 or n <= 0:
            raise ValueError(f"shape {item!r}: batch and context must be positive")
        out.append((b, n))
    return out


def row_tokens_for(context: int, extra: int = 1024 + 256) -> int:
    """The serving row length for a context: context + the outputs and the guard, rounded up to 256."""
    return -(-(context + extra) // 256) * 256


def kv_bytes(batch: int, context: int) -> int:
    """Bytes of K and V one layer's decode step reads (every kernel's floor)."""
    return batch * context * HKV * D * 2 * 2


def _time_ms(fn, iters: int = 20, rounds: int = 5) -> float:
    import torch
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def plan_vmm_rows(manager, batch: int, context: int, guard: int, gen) -> list[int]:
    """The engine's arrangement for a decode batch: a row per sequence, holding `context` tokens'
    blocks (vLLM block ids in shuffled order, so each row's frames come from anywhere in the pool, as
    after a while of serving) and FA3's guard behind them; nothing else mapped. Returns the rows."""
    import torch
    bs = manager.layout.block_size
    nb = -(-context // bs)
    ids = torch.randperm(batch * nb, generator=gen).view(batch, nb).tolist()
    rows = []
    for b in range(batch):
        r = manager.acquire_row()
        manager.set_blocks(r, ids[b])
        manager.ensure_readable(r, min(context + guard, manager.layout.row_tokens))
        rows.append(r)
    manager.sync()
    return rows


class MapChurn:
    """Page-table changes while a kernel is timed: inside `with churn:`, a Python thread keeps the
    native mapping thread busy with (map `handle` at `va`, set read-write access, unmap) triples,
    `triples` per batch, one batch after another, until the block ends (the slot is unmapped then).
    `calls_per_ms` is the driver calls' rate over the last block."""

    def __init__(self, executor, va: int, size: int, handle: int, triples: int = 16):
        from ..memory.executor import ACCESS_RW, MAP, UNMAP
        self.executor = executor
        self.ops = [(MAP, va, size, handle), (ACCESS_RW, va, size, 0), (UNMAP, va, size, 0)] * triples
        self.calls = 0
        self.calls_per_ms = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.executor.run(self.ops)
                self.executor.wait()  # (releases the GIL while the native thread runs them)
                self.calls += len(self.ops)
        except BaseException as e:  # noqa: BLE001 - raised again on the timing thread by __exit__
            self._error = e

    def __enter__(self) -> "MapChurn":
        self.calls, self._start = 0, time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kbench-map-churn", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.calls_per_ms = self.calls / max(1e-9, 1e3 * (time.perf_counter() - self._start))
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self.executor.close()


def vmm_rows(batch: int, context: int, row_tokens: int, k_src, v_src, device, churn: bool = False):
    """K and V rows of layer 0 as the engine has them (interleaved layout over a VMM reservation,
    2 MiB frames created one by one, plan_vmm_rows), filled with k_src/v_src. Returns (k_rows,
    v_rows, rows tensor, close, churn): with `churn`, a MapChurn over one more row of the same
    reservation, mapping the first sequence's first frame there (else None)."""
    import torch

    from ..memory import PAGE_SIZE, CudaDriver, KVMemoryManager, make_layout
    from ..memory.native import NativeExecutor
    from ..memory.views import layer_views
    lay = make_layout("interleaved", LLAMA3_8B, PAGE_SIZE, rows=batch + churn, min_row_tokens=row_tokens)
    driver = CudaDriver(device.index if device.index is not None else torch.cuda.current_device())
    m = KVMemoryManager(driver, lay, batch * -(-context // lay.block_size))
    mc = None
    try:
        rows = plan_vmm_rows(m, batch, context, 256, torch.Generator().manual_seed(1))
        if churn:
            mc = churn_at_free_row(m, NativeExecutor(*driver.native_table()), rows)
        k_rows, v_rows = layer_views(m.base_va, lay, torch.bfloat16, device)[0]
        rows_t = torch.tensor(rows, dtype=torch.int32, device=device)
        k_rows[rows_t.long(), :context] = k_src
        v_rows[rows_t.long(), :context] = v_src
        torch.cuda.synchronize()
    except BaseException:
        if mc is not None:
            mc.close()
        m.close()
        driver.close()
        raise

    def close():
        torch.cuda.synchronize()
        if mc is not None:
            mc.close()
        m.close()
        driver.close()
    return k_rows, v_rows, rows_t, close, mc


def churn_at_free_row(manager, executor, rows: list[int]) -> MapChurn:
    """A MapChurn at slot 0 of a row of `manager`'s reservation that no sequence uses (the layout
    needs one row more than `rows`), mapping the frame of the first row's first slot there."""
    lay = manager.layout
    free = sorted(set(range(lay.rows)) - set(rows))
    if not free:
        raise ValueError(f"no free row for the map churn: the layout has {lay.rows} rows, all used")
    frame = manager.mapper.slots[rows[0]][0]
    (off,) = lay.chunks(free[0], 0)  # (interleaved: one chunk per slot)
    return MapChurn(executor, manager.base_va + off, lay.chunk_bytes(), manager.pool.handles(frame)[0])


def layout_label(layout: str, pad: int) -> str:
    """'per_layer' for unpadded rows, 'per_layer+pad16' for rows 16 tokens longer than the view."""
    return f"{layout}+pad{pad}" if pad else layout


def run_shape(batch: int, context: int, row_tokens: int, splits: list[int], layouts: list[str], seed: int = 0,
              device: str = "cuda", timer=None, paged_kernel=None, fa2_kernel=None, fa3_kernel=None,
              paged_orders: tuple[str, ...] = ("shuffled",), row_pads: tuple[int, ...] = (0,),
              vmm_row_tokens: int = 0, vmm_rows_fn=None, map_churn: bool = False,
              spread: int | None = None, longest_first: bool = False) -> list[dict]:
    """Every kernel on one shape. `device`, `timer` (ms per call of a function) and the kernels
    (vLLM's flash_attn_varlen_func, ops.fa2_decode, ops.fa3_varlen) are replaceable for the CPU
    test of this plumbing. `paged_orders`: 'shuffled' (stock's baseline, always timed first) and/or
    'sequential' (each sequence's blocks in order); `row_pads`: extra tokens of row stride (not for
    'vmm'). Layout 'vmm' (the engine's own rows, vmm_rows; `vmm_rows_fn` replaces it on a CPU) has
    rows of `vmm_row_tokens` (default row_tokens) tokens; with `map_churn`, its FA2 (first split
    count given) and FA3 are timed again under a MapChurn, as layout '<label> + map churn'.
    `spread`: sequence b's context is `context` minus a uniform draw from [0, spread) (default
    min(1024, context // 4), a decode batch's last 1024 tokens; context - 1 at most, so a spread of
    context - 64 gives lengths of 64 to context tokens, as mixed-64-4096-in's batches have).
    `longest_first`: FA2 also over the batch sorted by length, longest first (the batch as drawn has
    its lengths in no order): its query gathered into that order and its output scattered back inside
    the timed call, as an engine would have to; recorded as layout '<label>, longest first', with the
    kernel alone as `kernel_ms`. FA2's grid runs each head over the whole batch, head after head (one
    split), or a sequence's heads and splits together (several): the order decides which long
    sequences start last (NOTES #138)."""
    import torch

    if paged_kernel is None:
        from vllm.vllm_flash_attn import flash_attn_varlen_func as paged_kernel
    if fa2_kernel is None:
        from ..attention.ops import fa2_decode as fa2_kernel
    if fa3_kernel is None:
        from ..attention.ops import fa3_varlen as fa3_kernel

    timer = timer or _time_ms
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    scale = D ** -0.5
    if spread is None:
        spread = _default_spread(context)
    if spread < 0:
        raise ValueError(f"spread {spread}: the tokens a context falls short of {context} must be >= 0")
    spread = max(1, min(spread, context - 1))
    lens = (context - torch.randint(0, spread, (batch,), generator=gen, device=dev)).to(torch.int32)
    rows = torch.arange(batch, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device=dev, generator=gen)
    # the keys and values every kernel reads: one layer's, [batch, context, HKV, D]
    k_src = torch.randn(batch, context, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
    v_src = torch.randn(batch, context, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
    mean_len = round(lens.float().mean().item())
    gbytes = kv_bytes(batch, context) / 1e9  # (the shape's, as in earlier results; mean_context is recorded)
    out: list[dict] = []

    def record(layout: str, system: str, num_splits, ms: float | None, diff: float | None, note: str = "",
               **extra) -> None:
        out.append({"batch": batch, "context": context, "spread": spread, "mean_context": mean_len,
                    "row_tokens": row_tokens, "layout": layout,
                    "system": system, "num_splits": num_splits, "ms": ms,
                    "tb_per_s": gbytes / ms if ms else None, "max_abs_diff_vs_paged_fa3": diff, "note": note,
                    **extra})

    # stock's decode: FA3 over 16-token blocks in shuffled order (and, as a control, in order)
    nblk = -(-row_tokens // BLOCK)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    paged_out = torch.empty_like(q)
    ref = None
    for order in ("shuffled", *[o for o in paged_orders if o != "shuffled"]):
        if order == "shuffled":
            perm = torch.randperm(batch * nblk, generator=gen, device=dev).view(batch, nblk).to(torch.int32)
        else:  # sequence b's blocks are b * nblk, b * nblk + 1, ...: rows' addresses, paged kernel
            perm = torch.arange(batch * nblk, dtype=torch.int32, device=dev).view(batch, nblk)
        k_cache = torch.zeros(batch * nblk, BLOCK, HKV, D, dtype=torch.bfloat16, device=dev)
        v_cache = torch.zeros_like(k_cache)
        full = context // BLOCK * BLOCK
        for b in range(batch):
            ids = perm[b, :-(-context // BLOCK)].long()
            k_cache[ids[:full // BLOCK]] = k_src[b, :full].view(-1, BLOCK, HKV, D)
            v_cache[ids[:full // BLOCK]] = v_src[b, :full].view(-1, BLOCK, HKV, D)
            if context > full:
                k_cache[ids[-1], :context - full] = k_src[b, full:]
                v_cache[ids[-1], :context - full] = v_src[b, full:]

        def paged(k_cache=k_cache, v_cache=v_cache, perm=perm):
            paged_kernel(q, k_cache, v_cache, 1, cu_q, row_tokens, seqused_k=lens, softmax_scale=scale,
                         causal=True, block_table=perm, out=paged_out, fa_version=3)

        ms = timer(paged)
        paged()
        if ref is None:
            ref = paged_out.float().clone()
            record("paged", "paged-fa3", None, ms, 0.0)
        else:
            record("paged", "paged-fa3-seq", None, ms, (paged_out.float() - ref).abs().max().item())
        del k_cache, v_cache

    variants = [(x, p) for x in layouts if x != "vmm" for p in row_pads] + [(x, 0) for x in layouts if x == "vmm"]
    for layout, pad in variants:
        label, stride, used = layout_label(layout, pad), row_tokens + pad, rows
        close = churn = None
        try:
            if layout == "interleaved":  # [rows, row_tokens, layers, K/V, HKV, D]; layer 0 is read
                store = torch.empty(batch, stride, LAYERS, 2, HKV, D, dtype=torch.bfloat16, device=dev)
                k_rows, v_rows = store[:, :row_tokens, 0, 0], store[:, :row_tokens, 0, 1]
            elif layout == "per_layer":  # one layer's K rows and V rows, each contiguous
                store = torch.empty(2, batch, stride, HKV, D, dtype=torch.bfloat16, device=dev)
                k_rows, v_rows = store[0, :, :row_tokens], store[1, :, :row_tokens]
            else:  # vmm: the engine's rows (only the sequences' frames and FA3's guard mapped), filled there
                label = f"vmm ({vmm_row_tokens or row_tokens}-token rows)"
                k_rows, v_rows, used, close, churn = (vmm_rows_fn or vmm_rows)(
                    batch, context, vmm_row_tokens or row_tokens, k_src, v_src, dev, churn=map_churn)
        except torch.OutOfMemoryError:
            record(label, "fa2", None, None, None, f"out of memory ({batch * stride * LAYERS * 4 * HKV * D / 2**30:.0f} GiB)")
            continue
        except VattnError as e:  # vmm: the driver's own error (e.g. out of memory for the frames), kept as a note
            record(label, "fa2", None, None, None, f"{type(e).__name__}: {e}"[:200])
            continue
        if close is None:
            k_rows[:, :context].copy_(k_src)
            v_rows[:, :context].copy_(v_src)
            k_rows[:, context:].zero_()
            v_rows[:, context:].zero_()
        o = torch.empty_like(q)
        try:
            for s in splits:
                def fa2(s=s):
                    fa2_kernel(q, k_rows, v_rows, o, lens, used, scale, num_splits=s)
                ms = timer(fa2)
                fa2()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                record(label, "fa2", s, ms, (o.float() - ref).abs().max().item())
            if longest_first:  # the batch sorted once (per step, in an engine); per call the
                # query gathered into that order and the output scattered back (per layer, in an engine)
                perm = torch.argsort(lens, descending=True, stable=True)
                lens_p, used_p = lens[perm].contiguous(), used[perm.to(used.device)].contiguous()
                q_p, o_p = q[perm].contiguous(), torch.empty_like(q)
                for s in splits:
                    def kernel(s=s):
                        fa2_kernel(q_p, k_rows, v_rows, o_p, lens_p, used_p, scale, num_splits=s)

                    def fa2_sorted(s=s):
                        torch.index_select(q, 0, perm, out=q_p)
                        kernel(s)
                        o.index_copy_(0, perm, o_p)
                    kernel_ms = timer(kernel)
                    ms = timer(fa2_sorted)
                    o.zero_()
                    fa2_sorted()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    record(f"{label}, longest first", "fa2", s, ms, (o.float() - ref).abs().max().item(),
                           kernel_ms=kernel_ms)

            def fa3():  # past each sequence: zeros, or the zero page (vmm), for FA3's last key tile
                fa3_kernel(q, k_rows, v_rows, o, cu_q, lens, used, 1, scale)
            ms = timer(fa3)
            fa3()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            record(label, "fa3-rows", None, ms, (o.float() - ref).abs().max().item())
            if churn is not None:  # the same kernels while the native thread changes page tables
                for system, fn in (("fa2", lambda: fa2(splits[0])), ("fa3-rows", fa3)):
                    with churn:
                        ms = timer(fn)
                    fn()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    record(f"{label} + map churn", system, splits[0] if system == "fa2" else None, ms,
                           (o.float() - ref).abs().max().item(), f"{churn.calls_per_ms:.1f} driver calls/ms",
                           calls_per_ms=round(churn.calls_per_ms, 1))
        finally:
            del k_rows, v_rows
            if close is not None:
                close()
            else:
                del store
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return out


def markdown(res: dict) -> str:
    """Per shape and layout: paged FA3, FA2 with its own heuristic (splits 0) and the best split
    count, and FA3 over the rows (runs without it, older ones, show '-')."""
    rows = res["results"]
    lines = ["# Decode attention at serving geometry (one layer, Llama-3-8B heads)", "", header(res), "",
             "FA2 over vAttention's rows with FA2's own split heuristic (0) and each split count given; "
             "FA3 over the same rows (no block table); paged FA3 is stock vLLM's decode. ms per call "
             "(median); TB/s of K and V read.", "",
             "| batch x context (contexts, mean) | row tokens | layout | paged FA3 ms | FA2 (heuristic) ms | best splits | its ms | "
             "best vs paged FA3 | heuristic vs paged FA3 | FA3 over rows ms | vs paged FA3 | max abs diff vs paged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shapes = sorted({(r["batch"], r["context"], r["row_tokens"]) for r in rows}, key=lambda x: (x[1], x[0]))
    for b, n, rt in shapes:
        mine = [r for r in rows if (r["batch"], r["context"]) == (b, n)]
        paged = next((r["ms"] for r in mine if r["system"] == "paged-fa3"), None)
        shape = f"{b} x {n}"
        if mine[0].get("spread", _default_spread(n)) != _default_spread(n):  # (--spread given)
            shape += f" ({n - mine[0]['spread'] + 1}-{n}, mean {mine[0]['mean_context']})"
        for layout in sorted({r["layout"] for r in mine} - {"paged"}):
            fa2 = [r for r in mine if r["layout"] == layout and r["system"] == "fa2"]
            timed = [r for r in fa2 if r["ms"]]
            if not timed:
                lines.append(f"| {shape} | {rt} | {layout} | {paged:.4f} | - | - | - | - | - | - | - | {fa2[0]['note']} |")
                continue
            fa3 = next((r for r in mine if r["layout"] == layout and r["system"] == "fa3-rows" and r["ms"]), None)
            heur = next((r for r in timed if r["num_splits"] == 0), None)
            best = min(timed, key=lambda r: r["ms"])
            diff = max(r["max_abs_diff_vs_paged_fa3"] for r in timed + ([fa3] if fa3 else []))
            fa3_cells = f"{fa3['ms']:.4f} | {paged / fa3['ms']:.3f}x" if fa3 else "- | -"
            lines.append(f"| {shape} | {rt} | {layout} | {paged:.4f} | {heur['ms'] if heur else float('nan'):.4f} | "
                         f"{best['num_splits']} | {best['ms']:.4f} | {paged / best['ms']:.3f}x | "
                         f"{(paged / heur['ms']) if heur else float('nan'):.3f}x | {fa3_cells} | {diff:.4f} |")
    seq = {(r["batch"], r["context"]): r for r in rows if r["system"] == "paged-fa3-seq" and r["ms"]}
    if seq:  # the control: paged FA3 over blocks laid out as rows are
        lines += ["", "Paged FA3 with each sequence's blocks in order (rows' addresses, the paged kernel):", "",
                  "| batch x context | paged FA3 (shuffled) ms | paged FA3 (in order) ms | shuffled vs in order "
                  "| max abs diff |", "|---|---|---|---|---|"]
        for b, n, _ in shapes:
            r = seq.get((b, n))
            paged = next((x["ms"] for x in rows if (x["batch"], x["context"]) == (b, n) and x["system"] == "paged-fa3"), None)
            if r and paged:
                lines.append(f"| {b} x {n} | {paged:.4f} | {r['ms']:.4f} | {r['ms'] / paged:.3f}x "
                             f"| {r['max_abs_diff_vs_paged_fa3']:.4f} |")
    churned = [r for r in rows if r["layout"].endswith(" + map churn") and r["ms"]]
    if churned:  # the same kernels over the same rows, timed again while page tables changed
        lines += ["", "Under map churn (the native thread mapping, setting access to and unmapping a frame in the "
                  "same reservation, back to back), ms per call:", "",
                  "| batch x context | rows | kernel | quiet ms | under churn ms | churn vs quiet | driver calls/ms |",
                  "|---|---|---|---|---|---|---|"]
        for r in churned:
            base = r["layout"][:-len(" + map churn")]
            quiet = next((x["ms"] for x in rows if (x["batch"], x["context"], x["layout"], x["system"], x["num_splits"])
                          == (r["batch"], r["context"], base, r["system"], r["num_splits"]) and x["ms"]), None)
            kernel = f"FA2 (splits {r['num_splits']})" if r["system"] == "fa2" else "FA3 over rows"
            ratio = f"{r['ms'] / quiet:.3f}x" if quiet else "-"
            lines.append(f"| {r['batch']} x {r['context']} | {base} | {kernel} | "
                         f"{quiet if quiet is None else f'{quiet:.4f}'} | {r['ms']:.4f} | {ratio} | {r['calls_per_ms']:.1f} |")
    lines += ["", "Every split count (ms):", "",
              "| batch x context | layout | " + " | ".join(f"s={s}" for s in res["splits"]) + " |",
              "|---|---|" + "---|" * len(res["splits"])]
    for b, n, _ in shapes:
        for layout in sorted({r["layout"] for r in rows if (r["batch"], r["context"]) == (b, n)} - {"paged"}):
            by = {r["num_splits"]: r["ms"] for r in rows
                  if (r["batch"], r["context"], r["layout"]) == (b, n, layout) and r["system"] == "fa2" and r["ms"]}
            if by:
                lines.append(f"| {b} x {n} | {layout} | " + " | ".join(
                    f"{by[s]:.4f}" if s in by else "-" for s in res["splits"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="BATCHxCONTEXT,... (default %(default)s)")
    ap.add_argument("--splits", default=DEFAULT_SPLITS, help="FA2 split counts; 0: FA2's heuristic")
    ap.add_argument("--layouts", default="interleaved,per_layer",
                    help="interleaved, per_layer (plain memory) and/or vmm (the engine's own rows)")
    ap.add_argument("--vmm-row-tokens", type=int, default=0,
                    help="vmm rows' length (default --row-tokens'; the engine's: max_model_len + 256, to 16)")
    ap.add_argument("--row-tokens", type=int, default=0, help="row length (default: context + 1280, to 256)")
    ap.add_argument("--paged-orders", default="shuffled",
                    help="shuffled (stock's baseline) and/or sequential (blocks in order: a control)")
    ap.add_argument("--row-pads", default="0", help="extra tokens of row stride, each a layout variant (e.g. 0,16)")
    ap.add_argument("--map-churn", action="store_true",
                    help="vmm rows: also time FA2 and FA3 while the native thread maps and unmaps a frame "
                         "in the same reservation, back to back (page-table changes during the kernels)")
    ap.add_argument("--spread", type=int, default=None,
                    help="sequences' contexts fall short of the shape's by a uniform draw from [0, SPREAD) "
                         "tokens (default min(1024, context / 4); context - 64: 64 to context tokens)")
    ap.add_argument("--longest-first", action="store_true",
                    help="also FA2 over the batch sorted by length, longest first (the query gathered and the "
                         "output scattered back in the timed call; NOTES #138)")
    ap.add_argument("--tag", default="kbench")
    args = ap.parse_args(argv)
    if args.spread is not None and args.spread < 0:
        raise SystemExit(f"--spread {args.spread}: a token count >= 0")
    shapes = parse_shapes(args.shapes)
    splits = [int(s) for s in args.splits.split(",")]
    if any(not 0 <= s <= 128 for s in splits):
        raise SystemExit(f"--splits {args.splits}: each must be 0 (FA2's heuristic) to 128")
    layouts = [x for x in args.layouts.split(",") if x]
    if set(layouts) - {"interleaved", "per_layer", "vmm"}:
        raise SystemExit(f"--layouts {args.layouts}: use interleaved, per_layer and/or vmm")
    if args.map_churn and "vmm" not in layouts:
        raise SystemExit(f"--map-churn needs the vmm layout (the engine's rows); --layouts is {args.layouts}")
    orders = tuple(x for x in args.paged_orders.split(",") if x)
    if not orders or set(orders) - {"shuffled", "sequential"}:
        raise SystemExit(f"--paged-orders {args.paged_orders}: use shuffled and/or sequential")
    try:
        pads = tuple(int(x) for x in args.row_pads.split(","))
    except ValueError:
        raise SystemExit(f"--row-pads {args.row_pads}: a comma list of token counts, e.g. 0,16") from None
    if any(p < 0 for p in pads):
        raise SystemExit(f"--row-pads {args.row_pads}: each must be >= 0")
    env = environment()
    res = {**env, "splits": splits, "results": []}
    os.makedirs(args.out, exist_ok=True)
    stem = results_stem(args.out, env, f"-{args.tag}")
    for b, n in shapes:
        res["results"] += run_shape(b, n, args.row_tokens or row_tokens_for(n), splits, layouts,
                                    paged_orders=orders, row_pads=pads, vmm_row_tokens=args.vmm_row_tokens,
                                    map_churn=args.map_churn, spread=args.spread, longest_first=args.longest_first)
        with open(stem + ".json", "w") as f:  # after each shape: a run cut short keeps what it measured
            json.dump(res, f, indent=1)
        print(f"[kbench] {b} x {n} done", flush=True)
    write_markdown(stem, markdown(res))


if __name__ == "__main__":
    main()
