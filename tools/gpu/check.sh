#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU, CUDA and PyTorch (no Rust needed), from
# the repository root, with prebuilt release binaries in $1 (made by tools/gpu/prepare.sh):
#
#     bash tools/gpu/check.sh .gpu
#
# Runs every CUDA test binary, the kernel benchmarks and the PyTorch baselines side by side;
# writes logs and report.md under /tmp/tessera-gpu and, when $OUT is set, report.md, tests.log
# and all.tar.gz (every log) into $OUT. Finishes in a few minutes.
#
# Options (environment): ONLY_TESTS=1 (tests alone), CRITERION=1 (the criterion benchmarks
# measured, not only run once), SKIP_STEPS=1 (no training-step
# benchmarks), STEP_GEMMS="mma ws wgmma" (the 3B step per GEMM kernel), PROFILE_STEP=1 with
# PROFILE_GEMM=..., PROFILE_MN=1, PROFILE_FLASH_WG=1, PROFILE_FLASH_WG_BWD=1, PROFILE_TS=1 (a
# per-kernel profile of the 3B step, with the MN-major GEMM mode / the Hopper flash forward /
# backward / the GEMM's TMA-store epilogue, each 0 unless given; by default, when time is left,
# the profile is of the default step; PROFILE_STEP=0 for none), NCU=1 with NCU_KERNELS="regex ..."
# (Nsight Compute), SWEEP="variant ..." (tools/sweep/tiny_base.sh on the spare cores),
# BIG_STEP_BEFORE_S and STEP_COMBOS_BEFORE_S (skip those steps once the check has run that many
# seconds), FULL_3B=1 (the whole 3B model's step, both sides: without activation
# checkpointing, then with it if tessera ran out of memory; FULL_3B=ckpt: with it),
# SKIP_MATMUL=1 (no GEMM benchmark), SKIP_TESTS=1 (a later call after one whose tests all
# passed: no tests, every kernel taken as validated), TINY_STEP_DTYPES (default "f32 bf16": the
# bench-tiny steps; empty for none), TEST_TIMEOUT, WITH_COMPILE_TEST=1, DEADLINE_S (default
# 470, within issue 4's 8 minutes; 540 for a device call's 10 minutes less its start: every
# optional phase is skipped, and every command's timeout clipped, so that the check ends by
# then and leaves its report; the device kills a command at 600 s, and a killed check returns
# nothing).
set -u
BIN=${1:-.gpu}
FINAL=${OUT:-}
OUT=/tmp/tessera-gpu
rm -rf "$OUT" && mkdir -p "$OUT"
# prepare.sh packs the binaries into one archive (BIN/bundle.tar.xz): unpacked here (Python's
# tarfile, which needs no xz binary).
if [ -f "$BIN/bundle.tar.xz" ]; then
    rm -rf /tmp/tessera-bin && mkdir -p /tmp/tessera-bin
    python3 -c 'import sys, tarfile; kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], **kw)' \
        "$BIN/bundle.tar.xz" /tmp/tessera-bin || { echo "check: cannot unpack $BIN/bundle.tar.xz"; exit 1; }
    BIN=/tmp/tessera-bin
fi
pack() {
    [ -s "$OUT/report.md" ] || python3 tools/gpu/report.py "$OUT" > "$OUT/report.md" 2>/dev/null
    if [ -n "$FINAL" ]; then
        mkdir -p "$FINAL"
        tar czf "$FINAL/all.tar.gz" --exclude=checkpoints -C "$OUT" . 2>/dev/null
        cp "$OUT/report.md" "$OUT/tests.log" "$FINAL/" 2>/dev/null
    fi
}
trap pack EXIT
START=$(date +%s)
log() { echo "[check $(( $(date +%s) - START ))s] $*"; }
DEADLINE=${DEADLINE_S:-470}
# fits SECONDS WHAT: whether a phase of about SECONDS still ends before the deadline.
fits() {
    [ $(( $(date +%s) - START + $1 )) -lt "$DEADLINE" ] && return 0
    log "skipped (deadline ${DEADLINE}s): $2"; return 1
}
# tmo SECONDS: a command's timeout, clipped to the time left before the deadline (at least 5).
tmo() {
    local left=$(( DEADLINE - ($(date +%s) - START) ))
    [ "$left" -lt 5 ] && left=5
    echo $(( $1 < left ? $1 : left ))
}

# lib_dir PATTERN: the first CUDA library directory holding PATTERN, the toolkit's before the
# one in PyTorch's environment; the directory goes first on LD_LIBRARY_PATH.
lib_dir() {
    local d
    for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib \
             $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13/lib") for p in nvidia.__path__))' 2>/dev/null); do
        # shellcheck disable=SC2086
        ls "$d"/$1 >/dev/null 2>&1 && { echo "$d"; return 0; }
    done
    return 1
}
# NVRTC, then cuBLAS (the GEMM reference: `--gemm cublas`, the cuda_cublas test, the
# `matmul_cublas` rows and the 3B step through it). cuBLAS's directory goes first even where
# NVRTC's is the same: cudarc tries the unversioned libcublas.so first, and `bench matmul`
# prints the version it loaded.
if NVRTC_DIR=$(lib_dir 'libnvrtc.so*'); then
    export LD_LIBRARY_PATH="$NVRTC_DIR:${LD_LIBRARY_PATH:-}"
    log "nvrtc from $NVRTC_DIR"
fi
if CUBLAS_DIR=$(lib_dir 'libcublas.so.13*'); then
    export LD_LIBRARY_PATH="$CUBLAS_DIR:${LD_LIBRARY_PATH:-}"
    log "cublas from $CUBLAS_DIR"
fi
export TESSERA_REQUIRE_NVRTC=1 TESSERA_CACHE_DIR=/tmp/tessera-kernel-cache RUST_BACKTRACE=1
TESSERA_BIN="$(cd "$BIN" && pwd)/tessera"; export TESSERA_BIN
# The kernels prepare.sh compiled for sm_90 (used when this machine's NVRTC has the same
# major.minor version; else the kernels compile here as before).
if [ -d "$BIN/kernel-cache/kernels" ]; then
    mkdir -p "$TESSERA_CACHE_DIR/kernels" && cp -n "$BIN"/kernel-cache/kernels/*.cubin "$TESSERA_CACHE_DIR/kernels/" 2>/dev/null
    log "kernel cache: $(ls "$TESSERA_CACHE_DIR/kernels" | wc -l) cubins from prepare.sh"
fi
# Test binaries find their fixtures through the path they were built at.
BUILT_AT=$(cat "$BIN/built_at" 2>/dev/null || echo /work/main)
if [ "$BUILT_AT" != "$PWD" ] && [ ! -e "$BUILT_AT" ]; then
    mkdir -p "$(dirname "$BUILT_AT")" && ln -s "$PWD" "$BUILT_AT"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"

# Optional CPU work beside the GPU check, at the lowest priority: SWEEP="variant ..." runs
# tools/sweep/tiny_base.sh (the tiny preset's base pretraining) on the machine's spare cores.
SWEEP_PID=
if [ -n "${SWEEP:-}" ]; then
    log "sweep (background, nice 19): $SWEEP"
    # shellcheck disable=SC2086
    nice -n 19 bash tools/sweep/tiny_base.sh "$TESSERA_BIN" "$OUT/sweep" $SWEEP > "$OUT/sweep.txt" 2>&1 &
    SWEEP_PID=$!
fi

# Pre-flight: the default Hopper GEMM (warp-specialised wgmma) has been refactored since it last
# ran on a GPU (soft mbarrier waits, shared helpers). If its test fails, every later test and
# benchmark takes the mma.sync GEMM instead (TESSERA_GEMM=mma), so the rest of the run still
# measures something.
if [ -x "$BIN/tests/cuda_gemm_tc" ] && [ -z "${SKIP_TESTS:-}" ]; then
    log "pre-flight: the default GEMM"
    timeout "$(tmo 120)" "$BIN/tests/cuda_gemm_tc" gemm_wgmma_ws_matches_cpu --exact --nocapture \
        > "$OUT/preflight-gemm.log" 2>&1
    if ! grep -q "gemm_wgmma_ws_matches_cpu ... ok" "$OUT/preflight-gemm.log"; then
        export TESSERA_GEMM=mma
        log "THE DEFAULT (ws) GEMM FAILED ITS TEST: TESSERA_GEMM=mma from here on (see preflight-gemm.log)"
        tail -n 20 "$OUT/preflight-gemm.log"
    fi
fi
# passed TEST BINARY: whether TEST of tests/BINARY passed above (always, with SKIP_TESTS=1: a
# later call after one whose tests all passed, to spend its time on the steps).
passed() {
    [ -n "${SKIP_TESTS:-}" ] || grep -q "$1 ... ok" "$OUT/test-$2.log" 2>/dev/null
}
log "tests"
: > "$OUT/tests.log"
# Kernels not yet validated on a GPU (off by default) run in processes of their own, so a
# faulting kernel (a sticky CUDA error) cannot fail the other tests of its binary:
# "binary:test" pairs.
EXPERIMENTS="cuda_gemm_tc:gemm_wgmma_ws_mn_major_matches_cpu cuda_gemm_tc:mn_major_products_match_cpu
cuda_gemm_tc:gemm_wgmma_ws_tma_store_matches_cpu
cuda_flash:flash_fwd_wgmma_matches_cpu cuda_flash:flash_bwd_wgmma_matches_cpu
cuda_flash:flash_wgmma_d80_and_uniform_segments_match_cpu
cuda_nn:cross_entropy_staged_variants_match_cpu
cuda_matmul_attention:adamw_compute_copies_follow_the_masters
cuda_matmul_attention:adamw_compute_leaves_update_as_compute_params
cuda_matmul_attention:adamw_multi_tensor_matches_per_tensor
cuda_qwen:bf16_gradients_on_the_compute_copies_are_exact"
# test_binary NAME [ARGS...]: tests/NAME whole (2 threads), its log in test-NAME.log, its
# results and exit status in tests.log.
test_binary() {
    local name=$1 rc
    shift
    log "test $name"
    timeout "$(tmo "${TEST_TIMEOUT:-150}")" "$BIN/tests/$name" --test-threads 2 --nocapture "$@" \
        >"$OUT/test-$name.log" 2>&1
    rc=$?
    grep -E "^test |test result|panicked|skipped" "$OUT/test-$name.log" | tee -a "$OUT/tests.log"
    echo "$name exit $rc" | tee -a "$OUT/tests.log"
}
for t in "$BIN"/tests/*; do
    [ -n "${SKIP_TESTS:-}" ] && break
    name=$(basename "$t")
    # CI compiles every kernel for sm_80/sm_90 already; here the tests compile what they use.
    [ "$name" = cuda_compile ] && [ -z "${WITH_COMPILE_TEST:-}" ] && continue
    # The jobs end to end (generation, SFT, GRPO, the smoke study: CPU against CUDA) decide no
    # default for the benchmarks: they run after the steps, while time is left (`jobs_test`).
    [ "$name" = cuda_train ] && continue
    skips=()
    for e in $EXPERIMENTS; do
        [ "${e%%:*}" = "$name" ] && skips+=(--skip "${e#*:}")
    done
    test_binary "$name" "${skips[@]}"
done
for e in $EXPERIMENTS; do
    [ -n "${SKIP_TESTS:-}" ] && break
    name=${e%%:*}; test=${e#*:}
    [ -x "$BIN/tests/$name" ] || continue
    log "experiment $name $test"
    timeout "$(tmo "${TEST_TIMEOUT:-150}")" "$BIN/tests/$name" "$test" --exact --nocapture >>"$OUT/test-$name.log" 2>&1
    rc=$?
    grep -E "^test $test|panicked" "$OUT/test-$name.log" | tee -a "$OUT/tests.log"
    echo "$name $test exit $rc" | tee -a "$OUT/tests.log"
done
# The Hopper flash forward is timed only if its test passed.
passed "flash_fwd_wgmma_matches_cpu" cuda_flash \
    || export TESSERA_BENCH_SKIP_FLASH_WG=1
passed "flash_bwd_wgmma_matches_cpu" cuda_flash \
    || export TESSERA_BENCH_SKIP_FLASH_WG_BWD=1
# The Hopper flash kernels at head dim 80 and on uniform segments (TESSERA_FLASH_WG_D80=1, not
# yet the default): timed, and the 3B step run with them, only if their test passed.
D80_OK=
passed "flash_wgmma_d80_and_uniform_segments_match_cpu" cuda_flash \
    && D80_OK=1 || export TESSERA_BENCH_SKIP_FLASH_WG_D80=1
passed "gemm_wgmma_ws_tma_store_matches_cpu" cuda_gemm_tc \
    || export TESSERA_BENCH_SKIP_TS=1
passed "cross_entropy_staged_variants_match_cpu" cuda_nn \
    || export TESSERA_BENCH_SKIP_CE_STAGED=1
passed "adamw_multi_tensor_matches_per_tensor" cuda_matmul_attention \
    || export TESSERA_BENCH_SKIP_ADAMW_MULTI=1
# cuBLAS (never a default): its rows in `bench matmul` (a fault there would end the
# benchmark's process and lose the rows after it), the 3B step and the profile through it, only
# where libcublas was found and the products through it passed their test.
CUBLAS_OK=
[ -n "$CUBLAS_DIR" ] && passed "cublas_reference_matches_cpu" cuda_cublas \
    && ! grep -q "skipped cublas_reference_matches_cpu" "$OUT/test-cuda_cublas.log" 2>/dev/null \
    && CUBLAS_OK=1
[ -n "$CUBLAS_OK" ] || export TESSERA_BENCH_SKIP_CUBLAS=1
# AdamW's fused bf16 compute copies (the default of `bench step`): the cast kernels instead if
# their test failed.
if passed "adamw_compute_copies_follow_the_masters" cuda_matmul_attention; then
    FUSED_OK=1
else
    FUSED_OK=; export TESSERA_FUSED_CASTS=0; log "AdamW's compute copies failed their test: cast kernels in the steps"
fi
# The bf16 gradients left on those copies for AdamW to read (also the default of `bench step`):
# the copies as cast nodes (f32 gradients on the masters) if either test failed.
if passed "adamw_compute_leaves_update_as_compute_params" cuda_matmul_attention \
    && passed "bf16_gradients_on_the_compute_copies_are_exact" cuda_qwen; then
    LEAVES_OK=1
else
    LEAVES_OK=; export TESSERA_BF16_GRADS=0; log "bf16 gradients on the compute copies failed their tests: f32 gradients on the masters in the steps"
fi
# The defaults added without a GPU since run 13 (the fused add+norm, one q/k/v product, the vision
# MLP's padding, 64-query blocks for short segments): each off for the rest of the run when its
# own test failed, and all of them (and the tile widths by waves) when the model's CUDA tests
# failed, so that the step rows and the profile still time a model that computes correctly.
NEW_OFF=
passed "add_rms_norm_matches_cpu" cuda_nn || NEW_OFF="TESSERA_ADD_NORM=0"
passed "flash_fwd_short_segments_take_64_query_blocks" cuda_flash \
    || NEW_OFF="$NEW_OFF TESSERA_FLASH_SEG_M64=0"
for t in tied_gqa_on_cuda_matches_cpu padded_vision_mlp_on_cuda_matches_cpu text_only_on_cuda_matches_cpu; do
    passed "$t" cuda_qwen && continue
    NEW_OFF="TESSERA_ADD_NORM=0 TESSERA_QKV_FUSED=0 TESSERA_VISION_MLP_PAD=0 TESSERA_FLASH_SEG_M64=0 TESSERA_GEMM_BN=0"
    break
done
for v in $NEW_OFF; do
    export "${v?}"; log "a test of a new default failed: $v from here on"
done
# rerun TAG "VAR=1 ..." BINARY...: whole test binaries again with switches on (log
# test-BINARY-TAG.log, lines tagged [TAG] in tests.log); fails if any of them failed.
rerun() {
    local tag=$1 switches=$2 ok=0 name rc
    shift 2
    [ -n "${SKIP_TESTS:-}" ] && return 0
    for name in "$@"; do
        [ -x "$BIN/tests/$name" ] || continue
        fits 60 "$name with $switches" || continue
        log "test $name with $switches"
        # shellcheck disable=SC2086
        env $switches timeout "$(tmo "${TEST_TIMEOUT:-150}")" "$BIN/tests/$name" --test-threads 2 --nocapture \
            >"$OUT/test-$name-$tag.log" 2>&1
        rc=$?
        grep -E "test result|panicked" "$OUT/test-$name-$tag.log" | sed "s/^/[$tag] /" | tee -a "$OUT/tests.log"
        echo "$name ($switches) exit $rc" | tee -a "$OUT/tests.log"
        [ $rc = 0 ] || ok=1
    done
    return $ok
}
# The GEMM's MN-major mode, its TMA-store epilogue, the Hopper flash forward with its overlap
# and the one-launch AdamW are the defaults since run 11 (the whole test suite above ran with
# them). MN_OK: the MN-major tests passed (its benchmark rows need it).
if passed "mn_major_products_match_cpu" cuda_gemm_tc; then
    MN_OK=1
else
    MN_OK=; log "the GEMM's MN-major mode failed (or skipped) its test"
fi
# The cross-entropy forward by bulk copies (TESSERA_CE_STAGES=5, not yet the default): the
# model tests again with it, once its op test passed (the tiny model's rows fit its 8 KB).
if [ -z "${TESSERA_BENCH_SKIP_CE_STAGED:-}" ]; then
    rerun ce5 "TESSERA_CE_STAGES=5" cuda_qwen
fi
# The Hopper flash backward (the default since run 12): the mma.sync kernels for the rest of
# the run if its own test failed.
if [ -n "${TESSERA_BENCH_SKIP_FLASH_WG_BWD:-}" ]; then
    export TESSERA_FLASH_WG_BWD=0; log "the Hopper flash backward failed its test: TESSERA_FLASH_WG_BWD=0 from here on"
fi
# BWD_CASES="b,hq,hkv,tq,tk,d,causal,split,stages;..." (flash_bwd_wgmma_case): each case in a
# process of its own, with every launch synchronous (a fault names its kernel), once per
# setting in BWD_CASE_ENVS ("-" for none, else VAR=V); then the first failing case under
# compute-sanitizer, when it exists.
if [ -n "${BWD_CASES:-}" ] && [ -x "$BIN/tests/cuda_flash" ]; then
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    FIRST_FAIL=
    IFS=';' read -r -a cases <<< "$BWD_CASES"
    for c in "${cases[@]}"; do
        for e in ${BWD_CASE_ENVS:--}; do
            fits 10 "bwd case $c $e" || break
            [ "$e" = - ] && e=TESSERA_NOTHING=1
            env "$e" CUDA_LAUNCH_BLOCKING=1 TESSERA_FLASH_BWD_CASE="$c" timeout "$(tmo 30)" "$BIN/tests/cuda_flash" \
                flash_bwd_wgmma_case --exact --nocapture > "$OUT/bwdcase.tmp" 2>&1
            rc=$?
            { echo "== case $c ($e) exit $rc"; grep -E "flash_bwd_wgmma b|rel error|Err|panicked" "$OUT/bwdcase.tmp" | head -n 4; } \
                | tee -a "$OUT/bwd-cases.log"
            [ $rc != 0 ] && [ -z "$FIRST_FAIL" ] && FIRST_FAIL="$e|$c"
        done
    done
    if [ -n "$FIRST_FAIL" ] && [ -n "$SAN" ] && fits 60 "compute-sanitizer"; then
        log "compute-sanitizer: ${FIRST_FAIL}"
        env "${FIRST_FAIL%%|*}" TESSERA_FLASH_BWD_CASE="${FIRST_FAIL#*|}" timeout "$(tmo 90)" "$SAN" --print-limit 20 \
            "$BIN/tests/cuda_flash" flash_bwd_wgmma_case --exact --nocapture > "$OUT/bwd-sanitizer.log" 2>&1
        head -n 60 "$OUT/bwd-sanitizer.log"
    fi
    [ -n "$FINAL" ] && mkdir -p "$FINAL" && cp "$OUT/bwd-cases.log" "$OUT/bwd-sanitizer.log" "$FINAL/" 2>/dev/null
fi
tail -n 60 "$OUT"/test-*.log > "$OUT/tests-tail.log" 2>/dev/null
# The jobs end to end on CUDA against the CPU (tests/cuda_train.rs): generation, SFT, GRPO and
# the smoke study. Nothing else depends on them, so they run after the benchmarks and steps,
# in the time those leave (or right after the other tests with ONLY_TESTS=1).
jobs_test() {
    [ -x "$BIN/tests/cuda_train" ] && [ -z "${SKIP_TESTS:-}" ] && fits 60 "test cuda_train" || return 0
    test_binary cuda_train
}
# ONLY_TESTS=1: the tests alone (a short check of a change).
if [ -n "${ONLY_TESTS:-}" ]; then
    jobs_test
    log "done (tests only)"
    exit 0
fi

# The whole 3B model (36 + 32 layers, 3.75B parameters): issue 5's "3B config" step, where the
# 8 + 8 layers below are its architecture, "with activation checkpointing where memory needs
# it". Optional (FULL_3B=1), and then first after the tests, before the benchmarks: the random
# init of 3.75B parameters on the host takes tens of seconds of device time. Without
# checkpointing first (tessera's ~60 GB of f32 masters, AdamW moments and bf16 copies and
# gradients, plus ~20 GB of activations, fit an H200; PyTorch's step may not, and then
# step_torch.py says so and times tessera alone); with it (`bench step --checkpoint`,
# transformers' gradient_checkpointing_enable, on both sides) when FULL_3B=ckpt, or when
# tessera's own step ran out of memory.
if [ -n "${FULL_3B:-}" ] && fits 300 "train step (qwen2.5-vl-3b)"; then
    full_3b() {  # $1: output name, then step_torch.py's extra flags
        local name=$1; shift
        log "train step (qwen2.5-vl-3b $*) tessera vs PyTorch + transformers"
        timeout "$(tmo 360)" python3 tools/bench/step_torch.py --model models/qwen2.5-vl-3b --batch 4 --seq 1024 \
            --image 448,448 --steps 3 --threads 16 --device cuda --dtype bf16 "$@" \
            --tessera "$BIN/tessera" > "$OUT/$name.txt" 2>&1
        local rc=$?
        echo "step qwen2.5-vl-3b $* exit $rc" >> "$OUT/$name.txt"
        grep -v "^\[transformers\]" "$OUT/$name.txt" | tail -n 10
        return $rc
    }
    if [ "$FULL_3B" = ckpt ]; then
        full_3b step-3b-full-ckpt --checkpoint
    elif ! full_3b step-3b-full && grep -q "cuda: out of memory" "$OUT/step-3b-full.txt" \
        && fits 300 "train step (qwen2.5-vl-3b, checkpointed)"; then
        full_3b step-3b-full-ckpt --checkpoint
    fi
fi
log "bench cuda"
timeout "$(tmo 150)" "$BIN/tessera" bench cuda --json > "$OUT/bench_cuda.jsonl" 2> "$OUT/bench_cuda.err"
echo "exit $?" >> "$OUT/bench_cuda.err"
# The warp-specialised GEMM is timed (benchmark and training step) only if its test passed.
if passed "gemm_wgmma_ws_matches_cpu" cuda_gemm_tc; then
    WS_OK=1
else
    WS_OK=; export TESSERA_BENCH_SKIP_WS=1; log "the ws GEMM failed its test: left out of the benchmarks"
fi
[ -z "$MN_OK" ] && export TESSERA_BENCH_SKIP_MN=1
# The 3B model's products (tokens 4096, hidden 2048, kv 256, MLP 11008): the forward's
# m x k x n, then the weight gradients' (m = outputs, k = tokens, n = inputs; their rows
# "Aᵀ-stored A, both MN-major" are the backward's layout); then the fused q/k/v product and its
# weight gradient, and the vision tower's N = 1280 products (proj, down, the gate/up input
# gradients and weight gradients), where the wave model picks narrower tiles than the old rule
# (rows `..._bn_old` time the old rule beside them); last, the tied lm head's three products
# (logits X·Eᵀ, dX = dlogits·E, dE = dlogitsᵀ·X over the 151936-token vocabulary): ~28% of the
# 3B step's FLOPs, not timed alone before.
if [ -z "${SKIP_MATMUL:-}" ]; then
    log "bench matmul"
    timeout "$(tmo 150)" "$BIN/tessera" bench matmul --device cuda --dtype bf16 \
        --sizes 1024,2048,4096x2048x2048,4096x2048x256,4096x2048x11008,4096x11008x2048,2048x4096x2048,256x4096x2048,11008x4096x2048,2048x4096x11008,4096x2048x2560,2560x4096x2048,4096x1280x1280,4096x3424x1280,3424x4096x1280,4096x2048x151936,4096x151936x2048,151936x4096x2048 \
        > "$OUT/bench_matmul.jsonl" 2>> "$OUT/bench_cuda.err"
fi
log "torch baselines"
timeout "$(tmo 150)" python3 tools/gpu/torch_baselines.py > "$OUT/torch.jsonl" 2> "$OUT/torch.err"
# NCU=1: Nsight Compute on the third launch of each kernel (regex) in NCU_KERNELS (what limits it:
# throughput against the peaks, occupancy, warp stall reasons), when ncu exists and may read
# the counters.
if [ -n "${NCU:-}" ]; then
    NCU_BIN=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
    if [ -n "$NCU_BIN" ]; then
        for k in ${NCU_KERNELS:-flash_fwd_d128 flash_bwd_dkdv_d128 flash_bwd_dq_d128 ce_warp_mean_(i64|u32)_bf16}; do
            log "ncu $k"
            timeout "$(tmo 90)" "$NCU_BIN" -k "regex:^${k}\$" -s 2 -c 1 --section SpeedOfLight --section Occupancy \
                --section LaunchStats --section WarpStateStats --section SchedulerStats \
                --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
                "$BIN/tessera" bench cuda --json > "$OUT/ncu-$k.txt" 2>&1
            echo "ncu exit $?" >> "$OUT/ncu-$k.txt"
            grep -vE '^\{' "$OUT/ncu-$k.txt" | tail -n 80
        done
    else
        log "ncu not found"
    fi
fi
# SKIP_STEPS=1 leaves out the training-step benchmarks (kernel work only).
STEP_DTYPES=${TINY_STEP_DTYPES-f32 bf16}
if [ -n "${SKIP_STEPS:-}" ]; then
    STEP_DTYPES=; BIG_STEP_BEFORE_S=0
else
    log "train step (bench-tiny) tessera vs PyTorch + transformers"
fi
for dt in $STEP_DTYPES; do
    # The 3B step below matters more: these only while it still fits after them.
    fits 300 "train step (bench-tiny, $dt)" || continue
    timeout "$(tmo 100)" python3 tools/bench/step_torch.py --model models/bench-tiny --batch 8 --seq 256 \
        --image 224,224 --steps 10 --threads 8 --device cuda --dtype $dt --tessera "$BIN/tessera" \
        >> "$OUT/step.txt" 2>&1
    echo "step $dt exit $?" >> "$OUT/step.txt"
done
# The 3B architecture with 8 + 8 layers (random weights), bf16 compute over f32 masters,
# batch 4 x 1024 tokens with one 448x448 image each: where the GEMM and attention kernels
# decide the time. Skipped when the check is already long.
if [ $(( $(date +%s) - START )) -lt ${BIG_STEP_BEFORE_S:-100000} ] && fits 150 "train step (bench-3b-8layers)"; then
    log "train step (bench-3b-8layers) tessera vs PyTorch + transformers"
    timeout "$(tmo 200)" python3 tools/bench/step_torch.py --model models/bench-3b-8layers --batch 4 --seq 1024 \
        --image 448,448 --steps 5 --threads 16 --device cuda --dtype bf16 --tessera "$BIN/tessera" \
        >> "$OUT/step.txt" 2>&1
    echo "step 3b-8layers bf16 exit $?" >> "$OUT/step.txt"
fi
# The same 3B step through each tensor-core GEMM kernel (tessera only), then one profiled run:
# where the step's time goes, per kernel.
for g in ${STEP_GEMMS:-}; do
    [ "$g" = ws ] && [ -z "$WS_OK" ] && continue
    fits 60 "3B step with TESSERA_GEMM=$g" || continue
    log "train step (bench-3b-8layers) tessera, TESSERA_GEMM=$g"
    TESSERA_GEMM=$g timeout "$(tmo 120)" "$BIN/tessera" --threads 16 bench step --model models/bench-3b-8layers \
        --batch 4 --seq 1024 --image 448,448 --steps 5 --device cuda --dtype bf16 --json \
        > "$OUT/step-gemm-$g.json" 2>&1
    echo "TESSERA_GEMM=$g exit $?: $(tail -c 400 "$OUT/step-gemm-$g.json")" | tee -a "$OUT/step.txt"
    grep -h "host per step" "$OUT/step-gemm-$g.json" | tee -a "$OUT/step.txt"
done
# The same 3B step with each default turned off in turn (its effect), beside the default
# (step_torch.py's tessera row), after a per-kernel profile of the default step; only while the
# check is short (STEP_COMBOS_BEFORE_S). Since runs 11 and 12 the defaults include the MN-major
# GEMM, the Hopper flash forward and backward, the TMA-store epilogue and the one-launch AdamW;
# AdamW's compute copies and the bf16 gradients on them are `bench step`'s defaults when their
# tests passed (else they are off already).
OFFS="TESSERA_GEMM_MN=0 TESSERA_FLASH_WG=0 TESSERA_FLASH_WG_BWD=0 TESSERA_GEMM_TS=0 TESSERA_ADAMW_MULTI=0"
# The seventh session's changes, prepared without a GPU: what each saves in the step.
# The ninth session's 64-query blocks for the vision windows' forward (TESSERA_FLASH_SEG_M64=0).
OFFS="TESSERA_VISION_MLP_PAD=0 TESSERA_QKV_FUSED=0 TESSERA_ADD_NORM=0 TESSERA_FLASH_SEG_M64=0 $OFFS"
# The eighth session's GEMM tile widths by waves (the old rule with TESSERA_GEMM_BN=0), first.
OFFS="TESSERA_GEMM_BN=0 $OFFS"
# Not a default yet: the step with the Hopper flash kernels at head dim 80 (the vision tower's
# whole-image blocks as a batch), second, when their test passed.
[ -n "$D80_OK" ] && OFFS="${OFFS%% *} TESSERA_FLASH_WG_D80=1 ${OFFS#* }"
# Every product of the step through cuBLAS (the reference), which says how much of the step's
# distance to the MFU target is the GEMM's; first.
[ -n "$CUBLAS_OK" ] && OFFS="TESSERA_GEMM=cublas $OFFS"
[ -n "$FUSED_OK" ] && OFFS="$OFFS TESSERA_FUSED_CASTS=0"
[ -n "$FUSED_OK" ] && [ -n "$LEAVES_OK" ] && OFFS="$OFFS TESSERA_BF16_GRADS=0"
# Where the step's time goes, per kernel (before the leave-one-out steps, as it says more than
# each of them): with PROFILE_STEP=1 the switches PROFILE_* choose; by default (PROFILE_STEP
# unset, time left, not SKIP_STEPS) the default step, the data for what remains to the MFU
# target. PROFILE_STEP=0: none.
if [ "${PROFILE_STEP:-}" = 1 ]; then
    pg=${PROFILE_GEMM:-mma}; [ "$pg" = ws ] && [ -z "$WS_OK" ] && pg=mma
    PROFILE_ENV="TESSERA_GEMM=$pg TESSERA_GEMM_MN=${PROFILE_MN:-0} TESSERA_FLASH_WG=${PROFILE_FLASH_WG:-0} TESSERA_FLASH_WG_BWD=${PROFILE_FLASH_WG_BWD:-0} TESSERA_GEMM_TS=${PROFILE_TS:-0}"
elif [ -z "${PROFILE_STEP:-}" ] && [ -z "${SKIP_STEPS:-}" ] && [ -n "$WS_OK" ]; then
    PROFILE_ENV="TESSERA_GEMM=ws"
else
    PROFILE_ENV=
fi
PROFILED=
profile_step() {
    [ -z "$PROFILED" ] && [ -n "$PROFILE_ENV" ] && fits 60 "profiled step" || return 0
    PROFILED=1
    log "profiled step (bench-3b-8layers): $PROFILE_ENV"
    echo "$PROFILE_ENV" > "$OUT/profile.txt"
    # shellcheck disable=SC2086
    env TESSERA_PROFILE=1 $PROFILE_ENV timeout "$(tmo 120)" "$BIN/tessera" --threads 16 bench step \
        --model models/bench-3b-8layers --batch 4 --seq 1024 --image 448,448 --steps 3 --device cuda \
        --dtype bf16 >> "$OUT/profile.txt" 2>&1
    echo "profile exit $?" >> "$OUT/profile.txt"
    head -n 80 "$OUT/profile.txt"
    [ -n "$FINAL" ] && mkdir -p "$FINAL" && cp "$OUT/profile.txt" "$FINAL/"
}
profile_step
if [ -z "${SKIP_STEPS:-}" ] && [ -n "$WS_OK" ]; then
    i=0
    for off in $OFFS; do
        # Already off (its test failed): nothing to compare.
        case " $NEW_OFF " in *" $off "*) continue ;; esac
        [ $(( $(date +%s) - START )) -lt ${STEP_COMBOS_BEFORE_S:-100000} ] || { log "step combos: out of time"; break; }
        fits 60 "3B step with $off" || break
        i=$((i + 1))
        log "train step (bench-3b-8layers) tessera, $off"
        env "$off" timeout "$(tmo 120)" "$BIN/tessera" --threads 16 bench step --model models/bench-3b-8layers \
            --batch 4 --seq 1024 --image 448,448 --steps 5 --device cuda --dtype bf16 --json \
            > "$OUT/step-combo$i.json" 2>&1
        echo "$off exit $?: $(tail -c 400 "$OUT/step-combo$i.json")" | tee -a "$OUT/step.txt"
        echo "$off" > "$OUT/step-combo$i.label"
    done
fi
# The jobs end to end (tests/cuda_train.rs), after the step rows and before the optional
# criterion run and cuBLAS profile.
jobs_test
# The criterion benchmarks (benches/cuda_kernels.rs): each benchmark once, as criterion's test
# mode runs them (that the harness works on a GPU); CRITERION=1 measures them (~1 minute).
CRIT_S=40; [ -n "${CRITERION:-}" ] && CRIT_S=130
if [ -x "$BIN/benches/cuda_kernels" ] && fits "$CRIT_S" "criterion benchmarks"; then
    log "criterion benchmarks (cuda_kernels${CRITERION:+, measured})"
    if [ -n "${CRITERION:-}" ]; then
        timeout "$(tmo 120)" "$BIN/benches/cuda_kernels" --bench --warm-up-time 0.3 --measurement-time 1 \
            > "$OUT/criterion.txt" 2>&1
    else
        timeout "$(tmo 60)" "$BIN/benches/cuda_kernels" > "$OUT/criterion.txt" 2>&1
    fi
    echo "criterion exit $?" | tee -a "$OUT/criterion.txt"
    grep -cE "Success|time:" "$OUT/criterion.txt"
fi
# The step's products by shape through cuBLAS, beside the default step's profile above.
if [ -n "$CUBLAS_OK" ] && [ -z "${SKIP_STEPS:-}" ] && [ -n "$PROFILED" ] && fits 60 "profiled step through cuBLAS"; then
    log "profiled step (bench-3b-8layers) through cuBLAS"
    env TESSERA_PROFILE=1 TESSERA_GEMM=cublas timeout "$(tmo 120)" "$BIN/tessera" --threads 16 bench step \
        --model models/bench-3b-8layers --batch 4 --seq 1024 --image 448,448 --steps 3 --device cuda \
        --dtype bf16 > "$OUT/profile-cublas.txt" 2>&1
    echo "profile exit $?" >> "$OUT/profile-cublas.txt"
    [ -n "$FINAL" ] && mkdir -p "$FINAL" && cp "$OUT/profile-cublas.txt" "$FINAL/"
fi
grep -v "^\[transformers\]" "$OUT/step.txt" | tail -n 14
python3 tools/gpu/report.py "$OUT" | tee "$OUT/report.md"
cat "$OUT/bench_cuda.err" | tail -n 20
if [ -n "$SWEEP_PID" ]; then
    log "waiting for the sweep"
    wait "$SWEEP_PID"
    grep -E "step|reached" "$OUT/sweep.txt" | tail -n 40
    [ -n "$FINAL" ] && cp "$OUT/sweep.txt" "$FINAL/" 2>/dev/null
fi
log "done"
