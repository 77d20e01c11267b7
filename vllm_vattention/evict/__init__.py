"""Prefix-cache eviction with one-bit predictions: a trace-driven simulator (no vLLM, no GPU).

Modules: `trace` (multi-turn LLM traces -> page requests), `policies` (LRU, Belady, marking and the
two one-bit-prediction algorithms), `predictors` (oracle, noisy and online bits), `sim` (runs a
policy over a trace with vLLM's prefix-hit semantics), `report` (the sweep, tables and plot:
`vattn-evict-sim`).
"""
