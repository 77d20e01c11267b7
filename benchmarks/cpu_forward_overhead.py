"""Our attention forward's own CPU time per layer call, on a CPU (NOTES #103).

In a step that runs eagerly (any step with a prefill chunk: mixed batches are not CUDA-graph
replays) every layer calls `VattnImpl.forward`, and those steps are CPU-bound (the in-process
profile of `mixed-4x1k+1k`: wall 12.85 against GPU kernels 9.24 ms per step for stock). Here the
three kernels are replaced by no-ops (`ops._KERNELS`), so what is timed is the Python and tensor-view
work around them: the K/V views, the query/output slices, the argument passing. The rows are views
of a one-element tensor (strides 0): no KV memory is needed.

    python3 benchmarks/cpu_forward_overhead.py
"""

import argparse
import statistics
import time

import torch

from vllm_vattention.attention import backend as B
from vllm_vattention.attention import ops

SHAPES = {"mixed: 4 decodes + a 1,024-token prefill": (4, 1024), "prefill: 1,024 tokens": (0, 1024),
          "decode: 16 requests (eager)": (16, 0)}


def metadata(num_decodes: int, prefill: int, seq_len: int = 1100, kv_len: int = 1536) -> B.VattnMetadata:
    n, reqs = num_decodes + prefill, num_decodes + (1 if prefill else 0)
    qsl = torch.tensor([0] + list(range(1, num_decodes + 1)) + ([n] if prefill else []), dtype=torch.int32)
    return B.VattnMetadata(
        num_actual_tokens=n, max_query_len=max(1, prefill), max_seq_len=seq_len, query_start_loc=qsl,
        seq_lens=torch.full((reqs,), seq_len, dtype=torch.int32), rows=torch.arange(reqs, dtype=torch.int32),
        slot_mapping=torch.zeros(n, dtype=torch.int64), num_decodes=num_decodes, num_reqs=reqs,
        prefill_query_start_loc=torch.tensor([0, prefill], dtype=torch.int32) if prefill else None,
        kv_len=kv_len, fa3_kv_len=seq_len)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    calls = {"fa2": 0, "fa3": 0, "write": 0}

    def fa2(*a):
        calls["fa2"] += 1

    def fa3(*a):
        calls["fa3"] += 1
        return [a[6]]

    def write(*a):
        calls["write"] += 1

    ops._KERNELS = (fa2, fa3, write)
    h, kvh, d = 32, 8, 128  # Llama-3-8B
    impl = B.VattnImpl(h, d, d ** -0.5, kvh)
    kv = torch.empty(1, dtype=torch.bfloat16).as_strided((2, 8, 4096, kvh, d), (0, 0, 0, 0, 0))

    class Layer:
        _k_scale = _v_scale = torch.ones(())

    layer = Layer()
    for name, (nd, prefill) in SHAPES.items():
        md, n = metadata(nd, prefill), nd + prefill
        q = torch.empty(n, h * d, dtype=torch.bfloat16)
        k = torch.empty(n, kvh * d, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        for _ in range(1000):
            impl.forward(layer, q, k, k, kv, md, out)
        before = dict(calls)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.calls):
                impl.forward(layer, q, k, k, kv, md, out)
            times.append((time.perf_counter() - t) / args.calls * 1e6)
        made = {op: (calls[op] - before[op]) // (args.repeats * args.calls) for op in calls}
        print(f"{name}: {statistics.median(times):.2f} us per layer call (min {min(times):.2f}); "
              f"kernel calls each: {made}")


if __name__ == "__main__":
    main()
