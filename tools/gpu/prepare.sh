#!/usr/bin/env bash
# Builds the release test and bench binaries here (no GPU needed) and copies them, stripped,
# into a git-ignored folder (default .gpu/) for tools/gpu/check.sh on a GPU machine.
#
#     bash tools/gpu/prepare.sh [.gpu]
set -euo pipefail
DEST=${1:-.gpu}
grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
rm -rf "$DEST" && mkdir -p "$DEST/tests"
cargo build --release --bin tessera
# Test executables: cargo prints them as "Executable tests/<name>.rs (target/release/deps/<name>-<hash>)".
TESTS=$(for f in tests/cuda_*.rs; do printf -- "--test %s " "$(basename "$f" .rs)"; done)
# shellcheck disable=SC2086
cargo test --release --no-run $TESTS 2>&1 | tee /tmp/tessera-test-build.log | grep -E "Executable tests/cuda_" \
    | sed -E 's/.*\((.*)\)/\1/' | while read -r exe; do
    name=$(basename "$exe" | sed -E 's/-[0-9a-f]+$//')
    cp "$exe" "$DEST/tests/$name"
done
# The criterion benchmarks of the CUDA kernels (benches/cuda_kernels.rs), the same way.
mkdir -p "$DEST/benches"
cargo bench --no-run --bench cuda_kernels 2>&1 | tee -a /tmp/tessera-test-build.log | grep -E "Executable benches/" \
    | sed -E 's/.*\((.*)\)/\1/' | while read -r exe; do cp "$exe" "$DEST/benches/cuda_kernels"; done
# Every kernel's sm_90 cubin, compiled here by NVRTC into the cache the check starts from (the
# device's time is not spent compiling; a GPU machine with another NVRTC version compiles as
# before). NVRTC: the one .ci/run installs, else PyTorch's; without one, no cache.
NVRTC_DIR=
for d in target/nvrtc/nvidia/cu13/lib \
         $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13/lib") for p in nvidia.__path__))' 2>/dev/null); do
    ls "$d"/libnvrtc.so.13* >/dev/null 2>&1 && NVRTC_DIR=$(cd "$d" && pwd) && break
done
if [ -n "$NVRTC_DIR" ]; then
    LD_LIBRARY_PATH="$NVRTC_DIR:${LD_LIBRARY_PATH:-}" TESSERA_CACHE_DIR="$PWD/$DEST/kernel-cache" \
        cargo test --release --test cuda_compile -- --ignored --exact fill_kernel_cache_for_sm90 --nocapture \
        2>&1 | grep -E "cached for sm_90|panicked|test result"
else
    echo "prepare: no NVRTC here (run .ci/run once, or pip install nvidia-cuda-nvrtc): no kernel cache"
fi
cp target/release/tessera "$DEST/"
strip "$DEST"/tessera "$DEST"/tests/* "$DEST"/benches/*
echo "$PWD" > "$DEST/built_at"
du -sh "$DEST"; ls -la "$DEST/tests"
# One xz archive travels instead (58 MB of binaries and cubins are ~9 MB packed; a device call
# carries at most 64 MiB); check.sh unpacks it. PACK=0 leaves the folder as it is.
if [ "${PACK:-1}" != 0 ]; then
    tar cf - -C "$DEST" . | xz -T0 -6 > "$DEST.bundle.tmp"
    rm -rf "${DEST:?}"/* && mv "$DEST.bundle.tmp" "$DEST/bundle.tar.xz"
    du -sh "$DEST/bundle.tar.xz"
fi
