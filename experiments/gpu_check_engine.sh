#!/usr/bin/env bash
# GPU check of the engine (issue 17), in parts that each fit one device call (< 10 minutes):
#   kernels  the FP8 grouped GEMM and linear tests on the GPU (split-K, SwiGLU, in-kernel quantization), the
#            engine with every FP8 kernel against its dequantized reference (under the engine's command
#            buffers), bench_fp8_linear.py (R1's linears at 1 and 64 rows) and bench_moe_ffn.py (one MoE
#            layer's experts, SwiGLU epilogue vs separate pass)                                     ~7 min
#   engine   bench_engine: prefill 4 x 2048 tokens (with its profile) and decode B=1 and B=128 at 4K, blocking
#            and step ahead                                                                       ~9 min
#   decode   bench_engine decode only, B=1, 64, 128 at 4K, blocking and step ahead, the engine's command
#            buffers (the engine part's profile turns them off)                                    ~4 min
#   sweep_a, sweep_b  bench_engine decode only, the points of issue 17's B x context grid still missing after
#            session 13 (which measured B=8 at 4K, B=64 at 16K and 1K from logs): sweep_a B=32, 256 at 4K and
#            B=128 at 16K; sweep_b B=256 at 16K and B=128 at 1K (a cache per point; ~100 s a point)   ~8 min each
#   sweep_c  the grid's three points that had only session 13's logs (JSONs since session 16): B=8 at 4K, B=64
#            at 1K and at 16K (~100 s a point)                                                               ~6 min
#   e2e      the single-GPU serving demo (launcher, r1-layers-4), step ahead and blocking        ~9 min
#   dispatch bench_dwdp_dispatch: decode B=1 and 64 at 4K through the single-program runner and through a DWDP
#            rank (group of one: per-layer programs, no fetch), the rank without and with command buffers
#            (`--rank_cuda_graphs=both`; without is the default since session 14)                 ~8 min
#            (session 11: the B=1 point alone took 200 s; its JSON is now written after every point)
#   decode_memory  the decode step at B=256 / 128 and 16K compiled, not run: XLA's memory analysis and its
#            largest buffers by HLO value (experiments/diag/decode_memory.py)                       ~3 min
#   b256_oom the B=256 / 16K decode point that ran out of memory on an H100 (session 14; its compiled step
#            needs 0.05 GiB beside the pages: Finding 34), with XLA's INFO log on so the BFC allocator's summary
#            of live chunks is printed at the failure, then once with the platform allocator (cudaMalloc per
#            buffer: fragmentation or not)                                                         ~5 min
#   dispatch_cboff  the B=1 point again with XLA command buffers off                              ~4 min
#   dispatch_trace  the B=1 point with command buffers on, then off, each with its host trace (JAX/XLA host
#            events per program, kernels per program: experiments/host_trace.py), no cProfile       ~8 min
#   dispatch_update_mode  the B=1 point under XLA's NEVER_UPDATE and SKIP_TEMP command-buffer update modes
#            (stable buffer addresses: no graph re-recording when an allocation moves)             ~7 min
#   hlo      the prefill step at 8K tokens (4 x 2048) with its profile and XLA's optimized HLO: what the
#            profile's costliest "other" fusions (gathers, adds, concatenates) hold (diag/hlo_fusions.py)  ~6 min
#   glue     the MLA prefill kernel's tests, bench_moe_glue (the MoE layer's row replication and combine
#            gathers at 8K and 16K tokens, element by element against 32-bit words and in-bounds gathers),
#            then prefill 8K and 16K with a profile                                                ~8 min
#   fp8_prefill  bench_fp8_prefill: R1's FP8 linears at 8192 rows, our kernel against cuBLASLt's DeepSeek-style
#            block-scaled FP8 GEMM (torch._scaled_mm, 1x128 / 128x128 scales); bench_moe_glue (the FP8
#            quantization's two forms); bench_moe_ffn at 8K tokens                                   ~6 min
#   cb       decode B=1 (r1-layers-2) under four XLA command-buffer settings: the host's share     ~8 min
#   GIT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu_check_engine.sh PART [device_kind]
# Logs and results JSONs go to $OUT (device tool) or experiments/results/; a pass/fail table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:?part: kernels, engine, decode, sweep_a, sweep_b, sweep_c, dispatch, decode_memory, b256_oom, dispatch_cboff, dispatch_trace, dispatch_update_mode, hlo, glue, fp8_prefill, cb or e2e}"
KIND="${2:-}"  # gpu_env.sh sets it from the GPUs this machine has
source experiments/gpu_env.sh
declare -A STATUS
ORDER=()
echo "device kind: $KIND"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv,noheader
BENCH=(python3 experiments/bench_engine.py --device_kind="$KIND" --backend=pallas --fp8_matmul=pallas
       --out="$OUTDIR")
case "$PART" in
  kernels)
    # the engine's FP8 test runs under the engine's command buffers (Mosaic kernels inside CUDA graphs)
    CB="$($PY -c "from dwdp_jax import xla_flags; print(' '.join(xla_flags.COMMAND_BUFFER_FLAGS['engine']))")"
    XLA_FLAGS="$CB" step engine tests 300 python3 -m pytest -q -p no:cacheprovider --tb=short \
      tests/test_fp8_linear.py tests/test_grouped_gemm.py tests/test_engine_fp8_gpu.py \
      -k "fp8 or split or decode_rows or engine"
    step engine bench_fp8_linear 150 python3 experiments/bench_fp8_linear.py --device_kind "$KIND" --out_dir "$OUTDIR"
    step engine bench_moe_ffn 150 python3 experiments/bench_moe_ffn.py --device_kind "$KIND" --out_dir "$OUTDIR"
    ;;
  engine)
    step engine engine 560 "${BENCH[@]}" --prefill_requests=4 --decode_batch=1,128 --decode_context=4096 \
      --typical=1x4096 --profile --time_budget_s=470 --tag=engine-check
    ;;
  decode)
    step engine decode 480 "${BENCH[@]}" --prefill_requests= --decode_batch=1,64,128 --decode_context=4096 \
      --typical=1x4096 --peak_matmul_size=2048 --hbm_copy_mib=2048 --time_budget_s=400 --tag=decode-check
    ;;
  sweep_a|sweep_b)
    # each decode point costs ~100 s (57 s compiling, session 13's sweep); a point starts only if the longest
    # so far still fits the time budget, so every process writes its JSON before the step's time-out
    # 256 x 16K tokens of cache (19 GB) beside 39 GB of weights: above XLA's default cap of 75% of the GPU
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    SWEEP=("${BENCH[@]}" --prefill_requests= --peak_matmul_size=2048 --hbm_copy_mib=1024)
    if [[ $PART == sweep_a ]]; then
      step engine sweep_4k 290 "${SWEEP[@]}" --time_budget_s=260 --decode_batch=32,256 --decode_context=4096 \
        --typical=32x4096 --tag=decode-sweep-4k-b32-b256
      step engine sweep_16k_128 200 "${SWEEP[@]}" --time_budget_s=170 --decode_batch=128 --decode_context=16384 \
        --typical=128x16384 --tag=decode-sweep-16k-b128
    else
      step engine sweep_16k_256 230 "${SWEEP[@]}" --time_budget_s=200 --decode_batch=256 --decode_context=16384 \
        --typical=256x16384 --tag=decode-sweep-16k-b256
      step engine sweep_1k_128 200 "${SWEEP[@]}" --time_budget_s=170 --decode_batch=128 --decode_context=1024 \
        --typical=128x1024 --tag=decode-sweep-1k-b128
    fi
    ;;
  sweep_c)
    SWEEP=("${BENCH[@]}" --prefill_requests= --peak_matmul_size=2048 --hbm_copy_mib=1024 --time_budget_s=140)
    step engine sweep_4k_8 165 "${SWEEP[@]}" --decode_batch=8 --decode_context=4096 --typical=8x4096 \
      --tag=decode-sweep-4k-b8
    step engine sweep_1k_64 165 "${SWEEP[@]}" --decode_batch=64 --decode_context=1024 --typical=64x1024 \
      --tag=decode-sweep-1k-b64
    step engine sweep_16k_64 175 "${SWEEP[@]}" --decode_batch=64 --decode_context=16384 --typical=64x16384 \
      --tag=decode-sweep-16k-b64
    ;;
  glue)
    # since session 11 the prefill kernel reads q_pe apart and the engine decodes with the clustered kernel
    # (first GPU runs in the engine): the kernel's tests and the engine's FP8 test first, under command buffers
    CB="$($PY -c "from dwdp_jax import xla_flags; print(' '.join(xla_flags.COMMAND_BUFFER_FLAGS['engine']))")"
    XLA_FLAGS="$CB" step engine engine_tests 180 python3 -m pytest -q -p no:cacheprovider --tb=short \
      tests/test_mla_prefill.py tests/test_engine_fp8_gpu.py
    step engine bench_moe_glue 120 python3 experiments/bench_moe_glue.py --device_kind "$KIND" --out_dir "$OUTDIR"
    step engine prefill 280 "${BENCH[@]}" --prefill_requests=4,8 --decode_batch= --decode_context= --profile \
      --time_budget_s=230 --tag=prefill-glue
    ;;
  hlo)
    # the budget covers the HLO dump's slower first compile (~100 s) and the profile after the timing (session 17's
    # 200 s skipped the profile)
    XLA_FLAGS="--xla_dump_to=/tmp/hlo_dump --xla_dump_hlo_module_re=jit_step_fn" step engine hlo 420 "${BENCH[@]}" \
      --prefill_requests=4 --decode_batch= --decode_context= --profile --time_budget_s=330 --tag=prefill-hlo
    step engine fusions 60 python3 experiments/diag/hlo_fusions.py /tmp/hlo_dump --fusion='loop_gather_fusion.*' \
      --fusion='loop_add_fusion.*' --fusion='input_concatenate_fusion.*' --fusion='input_multiply_reduce_fusion.*'
    ;;
  dispatch)
    # the single program with the engine's command buffers against the rank's programs without them (the
    # default since session 14, DwdpConfig.cuda_graphs) and with them, at B=1 and 64
    step engine dispatch 540 python3 experiments/bench_dwdp_dispatch.py --device_kind="$KIND" --backend=pallas \
      --fp8_matmul=pallas --decode_batch=1,64 --decode_context=4096 --typical=1x4096 --rank_cuda_graphs=both \
      --host_profile=false --host_trace=false --out="$OUTDIR" --tag=dwdp-dispatch-rank-graphs
    ;;
  decode_memory)
    # B=256 at 16K ran out of memory allocating 4.5 GiB (one layer's pages) in the step program (session 14):
    # which buffer that is, from the compiled step's buffer assignment (compiled, not run), at B=256 and 128
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    for b in 256 128; do
      step engine "decode_memory_b$b" 150 python3 experiments/diag/decode_memory.py --device_kind="$KIND" \
        --preset=r1-layers-4 --batch=$b --context=16384 --out="$OUTDIR" --tag="decode-memory-b$b-16k"
    done
    ;;
  b256_oom)
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    B256=("${BENCH[@]}" --prefill_requests= --peak_matmul_size=2048 --hbm_copy_mib=1024 --time_budget_s=150
          --decode_batch=256 --decode_context=16384 --typical=256x16384)
    TF_CPP_MIN_LOG_LEVEL=0 step engine b256_bfc 180 "${B256[@]}" --tag=decode-b256-16k-bfc
    grep -h "ran out of memory\|InUse\|Sum Total\|Stats\|Limit:\|Chunks of size [0-9]\{9,\}\|Chunk at .* of size [0-9]\{9,\}" \
      "$OUTDIR/engine-b256_bfc.log" | head -60
    XLA_PYTHON_CLIENT_ALLOCATOR=platform step engine b256_platform 180 "${B256[@]}" --tag=decode-b256-16k-platform
    ;;
  dispatch_cboff)
    # the same B=1 point with XLA command buffers off: is a program's host cost its CUDA graph's update/launch?
    step engine dispatch_cboff 300 python3 experiments/bench_dwdp_dispatch.py --device_kind="$KIND" \
      --backend=pallas --fp8_matmul=pallas --decode_batch=1 --decode_context=4096 --typical=1x4096 \
      --command_buffers=off --out="$OUTDIR" --tag=dwdp-dispatch-cboff
    ;;
  dispatch_trace)
    # session 12: a rank's program costs ~700 us of host time either way (800 us a program with command buffers,
    # 251 without): what inside JAX/XLA takes it, and how many kernels each program launches
    # XLA runs command buffers as plain thunks while a profiler session is active unless told otherwise
    for mode in engine off; do
      XLA_FLAGS="--xla_enable_command_buffers_during_profiling=true" \
      step engine "dispatch_trace_$mode" 270 python3 experiments/bench_dwdp_dispatch.py --device_kind="$KIND" \
        --backend=pallas --fp8_matmul=pallas --decode_batch=1 --decode_context=4096 --typical=1x4096 \
        --command_buffers=$mode --host_profile=false --out="$OUTDIR" --tag="dwdp-dispatch-trace-cb-$mode"
    done
    ;;
  dispatch_update_mode)
    # the B=1 point with the engine's command buffers under XLA's update modes that give buffers stable
    # (VMM-remapped) addresses, so a graph need not be re-recorded when an allocation moves (Finding 28):
    # NEVER_UPDATE (every allocation; newer XLA only: an unknown value fails at start-up in seconds), SKIP_TEMP
    # (temporaries only)
    for mode in NEVER_UPDATE SKIP_TEMP; do
      XLA_FLAGS="--xla_gpu_command_buffer_update_mode=$mode" step engine "dispatch_$mode" 280 \
        python3 experiments/bench_dwdp_dispatch.py --device_kind="$KIND" --backend=pallas --fp8_matmul=pallas \
        --decode_batch=1 --decode_context=4096 --typical=1x4096 --host_profile=false --host_trace=false \
        --out="$OUTDIR" --tag="dwdp-dispatch-$(echo $mode | tr A-Z_ a-z-)"
    done
    ;;
  fp8_prefill)
    # R1's FP8 linears at 8K rows: our kernel against cuBLASLt's block-scaled FP8 GEMM (torch._scaled_mm)
    step engine fp8_prefill 240 python3 experiments/bench_fp8_prefill.py --device_kind "$KIND" --out_dir "$OUTDIR"
    # the FP8 activation quantization with and without a barrier before its scales' transpose (and the gathers)
    step engine moe_glue 90 python3 experiments/bench_moe_glue.py --device_kind "$KIND" --out_dir "$OUTDIR" \
      --tag moe-glue-quantize
    # one MoE layer's experts at 8K tokens: the SwiGLU gate/up epilogue's forms and the separate pass
    step engine moe_ffn 150 python3 experiments/bench_moe_ffn.py --device_kind "$KIND" --tokens 8192 \
      --out_dir "$OUTDIR" --tag moe-ffn-8k
    ;;
  cb)
    # the host's share of a B=1 decode step under XLA command buffers (CUDA graphs): off, XLA's default, XLA's
    # stable-address update mode, and the engine's setting (dwdp_jax.xla_flags); r1-layers-2 to compile fast
    declare -A CB_MODE=([off]=off [default]=xla_default [skip_temp]=xla_default [engine]=engine)
    declare -A CB_FLAGS=([skip_temp]="--xla_gpu_command_buffer_update_mode=SKIP_TEMP")
    for v in off default skip_temp engine; do
      XLA_FLAGS="${CB_FLAGS[$v]:-}" step engine "cb_$v" 135 "${BENCH[@]}" --command_buffers="${CB_MODE[$v]}" \
        --preset=r1-layers-2 --prefill_requests= --decode_batch=1 --decode_context=1024 --typical=1x1024 \
        --peak_matmul_size=2048 --hbm_copy_mib=1024 --repeats=20 --time_budget_s=120 --tag="cb-$v"
    done
    ;;
  e2e)
    # the single-GPU serving demo at R1 layer shapes, with and without step-ahead decode (the rest equal);
    # few shapes (8 prompts of 1K in one prefill step, decode batches of <= 8): each program compiles in ~1 min
    E2E=(python3 -m experiments.launch --strategy=single --preset=r1-layers-4 --num_devices=1
         --workload=fixed --input_len=1024 --output_len=64 --num_requests=16 --max_batch_size=8
         --concurrency=8 --token_budget=8192 --warmup=run --progress=false --device_kind="$KIND"
         --out="$OUTDIR")
    step engine e2e_ahead 280 "${E2E[@]}" --step_ahead --tag=single-r1l4-step-ahead
    step engine e2e_blocking 280 "${E2E[@]}" --nostep_ahead --tag=single-r1l4-blocking
    ;;
  *)
    echo "unknown part $PART (kernels, engine, decode, sweep, dispatch, cb, e2e)"; exit 2 ;;
esac
echo "== summary ($PART)"
for k in "${ORDER[@]}"; do printf '%-18s %s\n' "$k" "${STATUS[$k]}"; done
