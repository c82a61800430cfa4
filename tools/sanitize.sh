#!/usr/bin/env bash
# Runs the crate's unsafe code under the checkers that can see into it:
#
#   1. Miri (nightly) on the unit tests of the store, the SIMD code and the .npy export: the
#      typed views of a store image (the alignment casts of `Store::vectors`, through
#      `Store::from_image` since Miri cannot map files), the f16/bf16 conversions and the top-k
#      tile kernels; once with the portable code and once with AVX2/FMA/F16C enabled, so the
#      intrinsic kernels' pointer arithmetic is checked too.
#   2. Valgrind memcheck on the store and top-k integration tests and the `index` unit tests,
#      built as usual: real memory maps, real SIMD dispatch.
#   3. AddressSanitizer (nightly) on the same tests and on the retriever (8 threads on one
#      shared retriever), bad-input and WordPiece tests, with `--asan` (a full instrumented build).
#
#   tools/sanitize.sh [--asan]
#
# Each step is skipped, with a note, when its tool is missing. The fuzz targets (tools/fuzz.sh)
# run under AddressSanitizer as well, on every reader and the store's mapped views.
set -uo pipefail
cd "$(dirname "$0")/.."
renice -n 10 $$ >/dev/null 2>&1 || true
export RRRA_NO_CUDA=1
asan=0
[ "${1:-}" = "--asan" ] && asan=1
status=0
step() { echo; echo "== $*"; }
fail() { echo "   FAILED: $*"; status=1; }

# The unit tests of the unsafe code (store views, SIMD kernels and conversions, the .npy
# header, the packed-panel GEMM and the adapter's serving path, whose threads write disjoint
# columns through raw pointers); test files that need real files are marked
# `cfg_attr(miri, ignore)`.
miri_filter=(index::store index::simd index::npy cpu::panel_gemm adapter::serving)
# Tree Borrows: rayon's crossbeam-epoch breaks the stricter Stacked Borrows rules in its own
# intrusive list (the searches in these tests run on rayon), which Tree Borrows accepts; rayon's
# pool threads outlive the tests, hence ignore-leaks.
export MIRIFLAGS="-Zmiri-disable-isolation -Zmiri-tree-borrows -Zmiri-ignore-leaks"

step "Miri: index unit tests (portable paths)"
if cargo +nightly miri --version >/dev/null 2>&1; then
    cargo +nightly miri test --lib -- "${miri_filter[@]}" || fail "Miri (portable)"
    step "Miri: index unit tests (AVX2, FMA, F16C kernels)"
    RUSTFLAGS="-Ctarget-feature=+avx,+avx2,+fma,+f16c" \
        cargo +nightly miri test --target-dir target/miri-avx2 --lib -- "${miri_filter[@]}" ||
        fail "Miri (AVX2)"
else
    echo "   skipped: no Miri (rustup +nightly component add miri rust-src)"
fi

step "Valgrind memcheck: tests/store.rs, tests/topk.rs, index, panel GEMM and serving unit tests"
if command -v valgrind >/dev/null; then
    # The test binaries as `cargo test --release` builds them (no rebuild when they are fresh).
    bins=$(cargo test --release --no-run --lib --test store --test topk 2>&1 |
        sed -n 's/.*Executable .*(\(.*\))$/\1/p')
    for bin in $bins; do
        filter=()
        case $bin in */rrra-*) filter=(index:: cpu::panel_gemm adapter::serving) ;; esac
        echo "-- $bin ${filter[*]}"
        RAYON_NUM_THREADS=2 valgrind --quiet --error-exitcode=99 --leak-check=no \
            --track-origins=no "$bin" --test-threads=2 "${filter[@]}" || fail "valgrind $bin"
    done
else
    echo "   skipped: valgrind not installed"
fi

if [ $asan = 1 ]; then
    step "AddressSanitizer: index unit tests, store, topk, retriever, bad inputs, WordPiece"
    # The std is not instrumented (no -Zbuild-std); the crate and its dependencies are.
    asan_test() {
        RUSTFLAGS="-Zsanitizer=address" ASAN_OPTIONS="detect_leaks=1" \
            cargo +nightly test --release --target x86_64-unknown-linux-gnu \
            --target-dir target/asan "$@"
    }
    asan_test --lib -- index:: || fail "AddressSanitizer (index unit tests)"
    asan_test --test store --test topk || fail "AddressSanitizer (store, topk)"
    # the serving path: 8 threads on one retriever (pooled scratch, mapped store), the
    # bad-input suite, and the tokenizer's reused buffers
    asan_test --test retriever --test bad_inputs --test wordpiece ||
        fail "AddressSanitizer (retriever, bad inputs, WordPiece)"
fi

echo
[ $status = 0 ] && echo "sanitizers: no findings" || echo "sanitizers: see FAILED above"
exit $status
