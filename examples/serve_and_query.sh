#!/bin/bash
# Serve the tiny Llama-3-8B-KV-shaped model with vAttention and query it with curl.
# A/B: run it again without VLLM_ATTENTION_BACKEND for stock vLLM.
set -eu
MODEL=${MODEL:-models/tiny-llama-kv8b}
VLLM_ATTENTION_BACKEND=VATTENTION vllm serve "$MODEL" --load-format dummy --max-model-len 4096 --port 8000 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf localhost:8000/health >/dev/null; do sleep 2; done
curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"hello world\", \"max_tokens\": 16}"; echo
curl -sN localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 16, \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"
