#!/bin/bash
# Offline throughput A/B on the device: stock vLLM (FA3 paged) then vAttention, same GPU, same call,
# each in a fresh engine. Usage: bash benchmarks/throughput_ab.sh MODEL IN OUT NUM [REPS]
set -u
MODEL=${1:-models/llama-3.1-8b}; IN=${2:-1024}; OUTLEN=${3:-128}; NUM=${4:-300}; REPS=${5:-1}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export VLLM_USE_FLASHINFER_SAMPLER=0
for rep in $(seq 1 "$REPS"); do
  for sys in stock vattn-fa2; do
    if [ "$sys" = stock ]; then unset VLLM_ATTENTION_BACKEND; else export VLLM_ATTENTION_BACKEND=VATTENTION; fi
    tag="tp-$(basename "$MODEL")-${IN}-${OUTLEN}-${sys}-r${rep}"
    timeout 280 python3 -m vllm.entrypoints.cli.main bench throughput --model "$MODEL" --load-format dummy \
      --input-len "$IN" --output-len "$OUTLEN" --num-prompts "$NUM" --max-model-len $((IN + OUTLEN + 16)) \
      --output-json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
    echo "$tag rc=$? $(grep -E '^Throughput' "$OUT/$tag.log")"
  done
done
