#!/bin/bash
# Runs on the device machine after `source /root/vattn-env.sh`: installs the project, runs the GPU
# tests, the mapper benchmark and an offline A/B smoke test. Logs go to $OUT.
# Usage: bash scripts/device_checks.sh [steps...]
#   steps: install gpu_tests (all of tests/gpu) unit (VMM + kernels) e2e server sanitizer mapbench ab
#          kbench (vattn-kbench: paged FA3 vs FA2 over our rows, FA2's split count swept; KB_ARGS)
#          under_load (do VMM calls wait for a running kernel, a stream blocked at a host flag, or another thread's launches? GPU test + mapbench)
#          host_ops (the native thread's calls beside another thread's allocs, pinned allocs, syncs, D2H copies, graph replays; and with 16K-48K pages mapped)
#          first_launch (the native thread's calls beside another thread's first launch of a kernel: CUDA lazy module loading)
#          mapbench (vattn-mapbench; MB_ARGS, e.g. "--sections driver_per_page,contention --tag mapbench-x")
#          stream_check (the stream-mode GPU tests alone, no sanitizer; then the clipped-guard tests under it)
#          spare_check (spare frames: the libcuda test, then the e2e prefix-caching test against stock)
#          mix_check (VATTN_DECODE_KERNEL=fa2-graphs, =fa2 and VATTN_FA3_SCHEDULE=1 against stock)
#          fa3_decode (VATTN_FA3_DECODE_TOKENS=1 against stock: decode steps in FA3 outside full graphs; FA3_K=clipped)
#          fa2_order (VATTN_FA2_ORDER=longest-first: kbench at spread and even lengths, then e2e against stock)
#          prefix (the default's prefix-caching e2e test alone) gs_e2e (the default's other e2e tests with fa2-graphs) lend_check (VATTN_LEND_BLOCKS e2e against stock, tight budget; --block-size 32 against stock)
#          suite_round (offline rounds of stock-fa3 with the candidates: $SUITE_CANDIDATE, a comma list such as
#          vattn-fa2,vattn-spare, else the default vattn-fa2;
#          results kept in /root/suite across calls, copied to $OUT;
#          DEADLINE=epoch seconds bounds it) suite_pair (the same on GPUs 0 and 1 at once, merged into $OUT)
#          row_drain (VATTN_ROW_DRAIN: the libcuda spare/lent tests with held background ops, then e2e with it)
#          timeline (torch.profiler traces of TL_WORKLOAD's steps in stock and the default, analysed by
#          bench.timeline: GPU idle gaps, CPU-late or GPU-waited)
#          profile (kernel time per step of stock, the default and the former default, or PROF_SYSTEMS;
#          PROF_ARGS="--phases ... --cpu-profile": also the engine thread's functions by own time per step)
#          tp (needs 2 GPUs) tp_rest (-k "$TP_K", default the Yi-34B and preemption cases) tp_ab (TP=2 suite
#          rounds, kept in /root/tp across calls, copied to $OUT/tp)
#          multiturn (needs the trace carried: cp ../shared/traces/*.jsonl .gpu/trace/, carry [".gpu/trace"];
#          shared/ does not travel) multiturn_pair (2 GPUs: lru and $MT_POLICY at once, then swapped, merged)
# On a fresh machine the first engine with vAttention's FA2 decode spends ~90-130 s compiling FA2's
# PTX (README, "First start"); the e2e timeouts leave room for it. jit_save keeps the compiled code
# for the next machine (install restores it from .gpu/jit when carried).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps=${*:-install gpu_tests mapbench ab}
# sanitized LOG PYTEST_ARGS...: GPU tests under compute-sanitizer's memcheck (fails on any error)
sanitized() { local log=$1; shift
  timeout ${SAN_TIMEOUT:-400} compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -m gpu -q -p no:cacheprovider "$@" \
    > "$OUT/$log.log" 2>&1; echo "rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/$log.log" | tail -5; }
# suite_rounds DIR LOG: offline rounds of stock-fa3 paired with the candidate into DIR (kept across calls)
suite_rounds() { local c=${SUITE_CANDIDATE:-vattn-fa2}
  mkdir -p "$1"; local left=$(( ${DEADLINE:-$(( $(date +%s) + 580 ))} - $(date +%s) - 15 ))
  vattn-bench --systems stock-fa3,$c --paired $c --reps ${SUITE_REPS:-3} --tag ${SUITE_TAG:-final} --max-seconds $left --out "$1" \
    --workloads ${SUITE_WORKLOADS:-1024-in-128-out,8192-in-256-out,512-in-1024-out,16k-context-decode,capacity-300-tokens} \
    > "$OUT/$2.log" 2>&1; echo "$2 rc=$? candidate=$c"; grep "^\[suite\]" "$OUT/$2.log" | tail -14; }
# copy_suite DIR STEM_END: the results named *-STEM_END (JSON, table, plot) and every log packed in one
# file (at most 8 files come back from $OUT: a plain copy of DIR lost the logs that mattered)
copy_suite() { local f; for f in json md png; do cp "$1"/*-"$2".$f "$OUT/" 2>/dev/null; done
  tar czf "$OUT/$(basename "$1")-logs.tgz" -C "$1" .; }
for s in $steps; do
  echo "=== $s $(date +%T)"
  case $s in
    install) python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; tail -2 "$OUT/install.log"
        # the driver's JIT cache of FA2's kernels from an earlier machine (jit_save), if carried: saves the
        # ~100-130 s first-start compile (same driver and compute capability; the cache checks both)
        if [ -f .gpu/jit/nv-compute-cache.tgz ]; then mkdir -p ~/.nv && tar xzf .gpu/jit/nv-compute-cache.tgz -C ~/.nv \
          && echo "JIT cache restored: $(du -sh ~/.nv/ComputeCache | cut -f1)"; fi;;
    jit_save) # the driver's JIT cache (FA2 compiled for this GPU) for the next machine: copy
        # $OUT/nv-compute-cache.tgz to .gpu/jit/ here and carry ".gpu/jit" with the install call
        tar czf "$OUT/nv-compute-cache.tgz" -C ~/.nv ComputeCache && ls -la "$OUT/nv-compute-cache.tgz";;
    gpu_tests) timeout 300 python3 -m pytest -m gpu tests/gpu -q -x -p no:cacheprovider --durations=8 > "$OUT/gpu_tests.log" 2>&1; echo "rc=$?"; tail -15 "$OUT/gpu_tests.log";;
    unit) timeout 300 python3 -m pytest -m gpu tests/gpu/test_vmm_gpu.py tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider > "$OUT/unit.log" 2>&1; echo "rc=$?"; tail -6 "$OUT/unit.log";;
    e2e) timeout 560 python3 -m pytest -m gpu tests/gpu/test_e2e_gpu.py -q -s -p no:cacheprovider --durations=5 > "$OUT/e2e.log" 2>&1; echo "rc=$?"; grep -E "greedy|passed|failed|Error" "$OUT/e2e.log" | tail -12;;
    server) timeout 420 python3 -m pytest -m gpu tests/gpu/test_server_gpu.py -q -p no:cacheprovider --durations=8 > "$OUT/server.log" 2>&1; echo "rc=$?"; tail -14 "$OUT/server.log";;
    sanitizer) sanitized sanitizer tests/gpu/test_kernels_gpu.py -k guard;;
    stream_check) # the stream-mode tests without the sanitizer (under it they did not finish in 170 s), then
        # the clipped-guard tests under it
        timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_vmm_gpu.py -k stream > "$OUT/stream.log" 2>&1
        echo "rc=$?"; tail -4 "$OUT/stream.log";
        sanitized clipped tests/gpu/test_kernels_gpu.py -k clipped;;
    gs_e2e) # four of the e2e tests against stock with VATTN_DECODE_KERNEL=fa2-graphs (the tests inherit
        # it): logprobs, preemption (flag), 32-token blocks, lent blocks (~9 min with the JIT cache;
        # passed on 02bf416, NOTES #114; since then fa2-graphs is the default, so e2e runs them too)
        VATTN_DECODE_KERNEL=fa2-graphs timeout 560 python3 -m pytest -m gpu -q -s -p no:cacheprovider \
          tests/gpu/test_e2e_gpu.py -k "logprobs_match or (preemption and flag) or 32_token or lent" \
          > "$OUT/gs_e2e.log" 2>&1; echo "rc=$?"
        grep -oE "decode=[a-z0-9-]+" "$OUT/gs_e2e.log" | sort | uniq -c; grep -E "passed|failed|Error|greedy" "$OUT/gs_e2e.log" | tail -8;;
    prefix) # prefix caching + n=3 sampling e2e against stock: the default (lent blocks since NOTES #58, stale
        # guard frames replaced since #126), VATTN_FENCE=value (#124) and VATTN_STALE_GUARDS=0 (~70 s each
        # with the JIT cache; VATTN_GROWTH_AHEAD=1's case: -k growth)
        timeout 400 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_e2e_gpu.py \
          -k "prefix and not spare and not growth" \
          > "$OUT/prefix.log" 2>&1; echo "rc=$?"; grep -E "passed|failed|Error" "$OUT/prefix.log" | tail -3;;
    fa3_decode) # VATTN_FA3_DECODE_TOKENS=1 end to end against stock (NOTES #128): decode steps in FA3 outside full graphs;
        # FA3_K=clipped: only the test with clipped guards (NOTES #135; each test ~265 s)
        timeout ${FA3_TIMEOUT:-560} python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_e2e_gpu.py \
          -k "long_decode_steps and ${FA3_K:-long_decode_steps}" \
          > "$OUT/fa3_decode.log" 2>&1; echo "rc=$?"; grep -E "passed|failed|Error|absdiff" "$OUT/fa3_decode.log" | tail -5;;
    fa2_order) # VATTN_FA2_ORDER=longest-first (NOTES #138): kbench over the engine's rows, FA2 as drawn and longest
        # first with splits 0-4, at mixed-64-4096-in's spread lengths and at even ones; then the e2e test against
        # stock and kbench's GPU test (the sorted variant reads what paged FA3 reads)
        for kb in "mixed:128x4608:--spread 4544" "even:256x1536:"; do IFS=: read -r t sh sp <<< "$kb"
          timeout ${KB_TIMEOUT:-90} python3 -m vllm_vattention.bench.kbench --out "$OUT" --shapes $sh $sp --splits 0,1,2,4 \
            --layouts vmm --longest-first --tag kb-order-$t > "$OUT/kb-order-$t.log" 2>&1; echo "kbench $t rc=$?"
          grep "^| $(echo $sh | sed 's/x/ x /')" "$OUT"/*-kb-order-$t.md | head -3; done
        timeout ${ORDER_TIMEOUT:-330} python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_e2e_gpu.py \
          tests/gpu/test_kernels_gpu.py -k "longest_first or kbench_over" > "$OUT/fa2_order.log" 2>&1
        echo "rc=$?"; grep -E "passed|failed|Error|absdiff" "$OUT/fa2_order.log" | tail -5;;
    mix_check) # VATTN_DECODE_KERNEL=fa2-graphs, =fa2 and VATTN_FA3_SCHEDULE=1 end to end against stock: logprobs
        # within the FA2/FA3 spread, prefills chunked beside decodes (NOTES #89, #91); on a fresh
        # machine FA2's JIT compile (in the first FA2 engine's warm-up) takes ~3 min of it
        timeout 560 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_e2e_gpu.py -k mixed_steps \
          > "$OUT/mix.log" 2>&1; echo "rc=$?"; grep -E "passed|failed|Error|absdiff" "$OUT/mix.log" | tail -5;;
    lend_check) # VATTN_LEND_BLOCKS end to end against stock under a tight budget (every lent block handed
        # out), and --block-size 32 against stock at 32 (~2 min each with the JIT cache)
        timeout 400 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_e2e_gpu.py -k "lent or 32_token" \
          > "$OUT/lend.log" 2>&1; echo "rc=$?"; grep -E "passed|failed|Error" "$OUT/lend.log" | tail -3;;
    spare_check) # spare frames (VATTN_SPARE_BLOCKS) on libcuda, then end to end against stock (prefix caching, n=3)
        timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_vmm_gpu.py -k "spare or stream" > "$OUT/spare_unit.log" 2>&1
        echo "unit rc=$?"; tail -2 "$OUT/spare_unit.log"
        timeout 480 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_e2e_gpu.py -k prefix > "$OUT/spare_e2e.log" 2>&1
        echo "e2e rc=$?"; grep -E "passed|failed|Error" "$OUT/spare_e2e.log" | tail -4;;
    row_drain) # NOTES #144: VATTN_ROW_DRAIN on libcuda (the spare and lent-block tests with background ops
        # held until a drain asks for them), then the e2e logprob and preemption tests with it (~6 min)
        timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_vmm_gpu.py \
          -k "spare_frames_on_libcuda or lent_blocks_on_libcuda" > "$OUT/row_drain_unit.log" 2>&1
        echo "unit rc=$?"; tail -1 "$OUT/row_drain_unit.log"
        VATTN_ROW_DRAIN=1 timeout 400 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_e2e_gpu.py \
          -k "logprobs_match or (preemption and flag)" > "$OUT/row_drain_e2e.log" 2>&1
        echo "e2e rc=$?"; grep -E "greedy_prefix|absdiff_max|passed|failed|Error" "$OUT/row_drain_e2e.log" | tail -5;;
    suite_round) suite_rounds /root/suite suite_round; copy_suite /root/suite ${SUITE_TAG:-final};;
    timeline) # torch.profiler traces (CUPTI: nsys is not usable there) of one offline workload's steps
        # [TL_DELAY, +TL_STEPS) in stock and the default, then bench.timeline: the GPU's idle gaps, CPU-late
        # or GPU-waited (NOTES #44). TL_WORKLOAD=name:in:out:n (default 512-in-1024-out:512:1024:256)
        IFS=: read -r tl_name tl_in tl_out tl_n <<< "${TL_WORKLOAD:-512-in-1024-out:512:1024:256}"
        # TL_SYSTEMS picks and orders them (default "stock vattn"); with TL_DELAY=0 the native thread's
        # slowest batches are placed in the trace (bench.timeline --batches, NOTES #143)
        for sys in ${TL_SYSTEMS:-stock vattn}; do
          rm -rf /root/tl-$sys; mkdir -p /root/tl-$sys
          ( if [ $sys = vattn ]; then export VLLM_ATTENTION_BACKEND=VATTENTION; else unset VLLM_ATTENTION_BACKEND; fi
            timeout ${TL_TIMEOUT:-280} python3 -m vllm_vattention.bench.offline --model models/llama-3.1-8b \
              --workloads "[[\"$tl_name\", $tl_in, $tl_out, $tl_n]]" --timeline /root/tl-$sys \
              --timeline-delay ${TL_DELAY:-300} --timeline-steps ${TL_STEPS:-30} --out /root/tl-$sys.json \
              $([ "${TL_STACK:-0}" = 1 ] && echo --timeline-stack) ) \
            > "$OUT/timeline-$sys.log" 2>&1; echo "$sys rc=$? traces: $(ls /root/tl-$sys | head -3)"
        done
        cp /root/tl-vattn.json "$OUT/" 2>/dev/null
        # TL_KEEP=1: the traces themselves come back too, in one file (a few MB gzipped at 1024/128)
        [ "${TL_KEEP:-0}" = 1 ] && tar cf "$OUT/tl-traces.tar" -C /root $(cd /root && ls -d tl-stock tl-vattn 2>/dev/null)
        python3 -m vllm_vattention.bench.timeline $(ls /root/tl-stock/*.json* /root/tl-vattn/*.json* 2>/dev/null) \
          --out "$OUT/timeline.md" $([ -f /root/tl-vattn.json ] && echo --batches /root/tl-vattn.json) \
          > "$OUT/timeline-report.log" 2>&1; echo "timeline rc=$?"; head -4 "$OUT/timeline.md"
        grep -A12 "slowest batches" "$OUT/timeline.md";;
    suite_pair) # suite_round on both GPUs at once (each repetition keeps its baseline on its GPU), merged;
        # each GPU's suites get their own vLLM cache (two engines compiling one graph at once would share
        # files) and their own server port (suite.free_port); both result folders come back packed
        for g in 0 1; do CUDA_VISIBLE_DEVICES=$g VLLM_CACHE_ROOT=/root/.cache/vllm-g$g suite_rounds /root/suite-g$g suite-g$g & done; wait
        vattn-bench --merge /root/suite-g0/*-${SUITE_TAG:-final}.json /root/suite-g1/*-${SUITE_TAG:-final}.json \
          --out "$OUT" --tag ${SUITE_TAG:-final}-pair | tail -1
        tar czf "$OUT/suite-pair-${SUITE_TAG:-final}.tgz" -C /root suite-g0 suite-g1;;
    tp_rest) timeout ${TP_TIMEOUT:-580} python3 -m pytest -m gpu2 tests/gpu_multi -q -s -p no:cacheprovider -k "${TP_K:-yi or preemption}" > "$OUT/tp_rest.log" 2>&1; echo "rc=$?"; grep -E "greedy|absdiff_max|passed|failed" "$OUT/tp_rest.log" | tail -12;;
    tp_ab) timeout 580 vattn-bench --tensor-parallel-size 2 --systems stock-fa3,vattn-fa2 --workloads ${TP_WORKLOADS:-1024-in-128-out,16k-context-decode} \
        --reps ${TP_REPS:-1} --max-seconds $(( ${DEADLINE:-$(( $(date +%s) + 575 ))} - $(date +%s) - 15 )) --out /root/tp > "$OUT/tp_ab.log" 2>&1
        echo "rc=$?"; grep "^\[suite\]" "$OUT/tp_ab.log" | tail -12; copy_suite /root/tp tp2;;
    multiturn_pair) P=${MT_POLICY:-second-chance}; for order in "lru $P" "$P lru"; do set -- $order; i=$((${i:-0} + 1))
          for g in 0 1; do policy=$1; [ $g = 1 ] && policy=$2
            CUDA_VISIBLE_DEVICES=$g timeout -s INT ${MT_TIMEOUT:-280} python3 -m vllm_vattention.bench.multiturn --trace .gpu/trace/mooncake_conversation_trace.jsonl \
              --systems $policy --port $((8191 + g)) --out "$OUT/mt-$i-$g" ${MT_ARGS:-} > "$OUT/mt-$i-$g.log" 2>&1 &
          done; wait; done
        python3 -m vllm_vattention.bench.multiturn --merge "$OUT"/mt-*/*.json --out "$OUT" --tag pair 2>&1 | grep "^|";;
    tp) timeout 580 python3 -m pytest -m gpu2 tests/gpu_multi -q -s -p no:cacheprovider > "$OUT/tp.log" 2>&1; echo "rc=$?"; grep -E "greedy|absdiff_max|passed|failed" "$OUT/tp.log" | tail -12;;
    multiturn) timeout 580 python3 -m vllm_vattention.bench.multiturn --trace .gpu/trace/mooncake_conversation_trace.jsonl --out "$OUT" ${MT_ARGS:-} > "$OUT/multiturn.log" 2>&1; echo "rc=$?"; tail -8 "$OUT/multiturn.log";;
    profile) # kernel time per step (torch.profiler): stock, vAttention's default, the former default (mapping
        # on the engine thread); PROF_SYSTEMS picks some of "stock vattn sync graphs fa3 fa3long" (graphs:
        # VATTN_DECODE_KERNEL=fa2-graphs, fa3: =fa3, fa3long: VATTN_FA3_DECODE_TOKENS=450000), a name ending
        # -sched (vattn-sched): VATTN_FA3_SCHEDULE=1
        # PROF_TAG names the files (prof-SYS-TAG.json, profile-TAG.md), PROF_TIMEOUT bounds each engine
        reports=""; t=${PROF_TAG:+-$PROF_TAG}; for sys in ${PROF_SYSTEMS:-stock vattn sync}; do
          env -u VLLM_ATTENTION_BACKEND -u VATTN_BACKGROUND_MAP -u VATTN_FA3_GUARD -u VATTN_SPARE_BLOCKS -u VATTN_DECODE_KERNEL -u VATTN_FA3_SCHEDULE \
            $( [ $sys != stock ] && echo VLLM_ATTENTION_BACKEND=VATTENTION ) \
            $( [ $sys = sync ] && echo VATTN_BACKGROUND_MAP=0 VATTN_FA3_GUARD=always ) \
            $( [ ${sys%-sched} = graphs ] && echo VATTN_DECODE_KERNEL=fa2-graphs ) \
            $( [ $sys = fa3 ] && echo VATTN_DECODE_KERNEL=fa3 ) \
            $( [ $sys = fa3long ] && echo VATTN_FA3_DECODE_TOKENS=450000 ) \
            $( [ ${sys%-sched} != $sys ] && echo VATTN_FA3_SCHEDULE=1 ) \
            VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout ${PROF_TIMEOUT:-180} python3 -m vllm_vattention.bench.profile \
            --out "$OUT/prof-$sys$t.json" ${PROF_ARGS:-} > "$OUT/prof-$sys$t.log" 2>&1; echo "$sys rc=$?"
          reports="$reports $OUT/prof-$sys$t.json"; done
        python3 -m vllm_vattention.bench.profile --report $reports --out "$OUT/profile$t.md"
        # at most 8 files come back from $OUT: pack each system's JSON and log (2 per system) into one archive
        ( cd "$OUT" && tar czf "prof$t.tgz" prof-*$t.json prof-*$t.log && rm -f prof-*$t.json prof-*$t.log );;
    kbench) # decode attention at serving geometry: paged FA3 vs FA2 over our rows, FA2's split count swept
        timeout ${KB_TIMEOUT:-540} python3 -m vllm_vattention.bench.kbench --out "$OUT" ${KB_ARGS:-} > "$OUT/kbench.log" 2>&1
        # (KB_ARGS' --tag names the file: show the newest table, whatever its tag)
        echo "rc=$?"; grep "^|" "$(ls -t "$OUT"/*.md | head -1)" | head -14;;
    under_load) # do VMM calls wait for the GPU's work? (NOTES #140: the engine's 21-38 ms cuMemSetAccess calls)
        timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_vmm_gpu.py -k under_load > "$OUT/under_load.log" 2>&1
        echo "test rc=$?"; tail -1 "$OUT/under_load.log"
        timeout 120 python3 -m vllm_vattention.bench.mapbench --out "$OUT" --sections under_load,driver_per_page --tag mapbench-load \
          >> "$OUT/under_load.log" 2>&1; echo "mapbench rc=$?"; grep -A23 "GPU meanwhile" "$OUT"/*-mapbench-load.md;;
    host_ops) # NOTES #141: the native thread's calls beside the engine process's other CUDA calls, and with
        # tens of thousands of pages mapped (the engine's 21-38 ms cuMemSetAccess calls wait for neither the GPU nor launches)
        timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_vmm_gpu.py -k host_ops > "$OUT/host_ops.log" 2>&1
        echo "test rc=$?"; tail -1 "$OUT/host_ops.log"
        timeout 200 python3 -m vllm_vattention.bench.mapbench --out "$OUT" --sections host_ops,at_scale --tag mapbench-host \
          >> "$OUT/host_ops.log" 2>&1; echo "mapbench rc=$?"; tail -18 "$OUT"/*-mapbench-host.md;;
    first_launch) # NOTES #147: does CUDA's lazy module loading (a kernel's first launch, waiting for the GPU in the
        # engine: NOTES #145) hold up the native thread's VMM calls? Control: a loaded kernel's launch
        echo "CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-unset (torch sets LAZY)}"
        timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_vmm_gpu.py -k first_launch > "$OUT/first_launch.log" 2>&1
        echo "test rc=$?"; tail -1 "$OUT/first_launch.log"
        timeout 120 python3 -m vllm_vattention.bench.mapbench --out "$OUT" --sections first_launch --tag mapbench-first \
          >> "$OUT/first_launch.log" 2>&1; echo "mapbench rc=$?"; tail -5 "$OUT"/*-mapbench-first.md;;
    mapbench) timeout 200 python3 -m vllm_vattention.bench.mapbench --out "$OUT" ${MB_ARGS:-} > "$OUT/mapbench.log" 2>&1; echo "rc=$?"; tail -30 "$OUT/mapbench.log";;
    ab) timeout 420 python3 examples/offline_ab.py --out "$OUT/ab.json" ${AB_ARGS:-} > "$OUT/ab.log" 2>&1; echo "rc=$?"; tail -40 "$OUT/ab.log";;
    *) echo "unknown step $s";;
  esac
done
