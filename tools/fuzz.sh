#!/usr/bin/env bash
# Fuzzes every file-format reader for a fixed time each (cargo-fuzz, libFuzzer + AddressSanitizer).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]     SECONDS per target (default 60); all targets by default
#   tools/fuzz.sh 0                         only minimise the corpora
#   RRRA_FUZZ_CMIN=0 tools/fuzz.sh          skip minimising the corpora afterwards
#
# The committed corpus is fuzz/corpus/<target>/ (seed-* files are the valid examples written by
# `tests/fuzz_corpus.rs`, the rest inputs libFuzzer found); libFuzzer grows a working corpus in
# fuzz/target/corpus/<target>/ (not in git). Crashes land in fuzz/artifacts/<target>/ (not in
# git), logs in fuzz/artifacts/logs/. Exits non-zero if any target crashed, leaked, timed out or
# ran out of memory. `cargo test --release --test fuzz_corpus` replays the committed corpus on the
# stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

budget=${1:-60}
shift || true
all=(jsonl_corpus jsonl_queries train_jsonl qrels_tsv trec_run store safetensors_meta bert_config adapter_file)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

# The fuzz builds are CPU-only: no CUDA kernels to compile.
export RRRA_NO_CUDA=1
# Low priority: fuzzing saturates a core.
renice -n 10 $$ >/dev/null 2>&1 || true

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# The seeds are committed; regenerate them if a corpus folder lost its own.
for t in "${targets[@]}"; do
    if ! compgen -G "fuzz/corpus/$t/seed-*" >/dev/null; then
        RRRA_WRITE_SEEDS=1 cargo test --release --test fuzz_corpus seeds_are_accepted
        break
    fi
done

max_len() {
    case $1 in
        store | safetensors_meta | adapter_file) echo 8192 ;;
        *) echo 4096 ;;
    esac
}
dict() {
    case $1 in
        jsonl_* | train_jsonl | bert_config) echo fuzz/dicts/json.dict ;;
        safetensors_meta | adapter_file) echo fuzz/dicts/safetensors.dict ;;
        store) echo fuzz/dicts/store.dict ;;
        *) echo fuzz/dicts/text.dict ;;
    esac
}

# Built once, then the binaries are run directly: a source edit during the runs must not
# rebuild (or change) the code being fuzzed halfway.
cargo +nightly fuzz build
bin_dir=fuzz/target/x86_64-unknown-linux-gnu/release
mkdir -p fuzz/artifacts/logs
failed=()
for t in "${targets[@]}"; do
    [ "$budget" -gt 0 ] || break
    # libFuzzer adds new inputs to the first folder: the working corpus, outside git.
    work=fuzz/target/corpus/$t
    mkdir -p "$work" "fuzz/artifacts/$t"
    log=fuzz/artifacts/logs/$t.log
    before=$(ls "fuzz/artifacts/$t" | wc -l)
    echo "== $t: ${budget}s (log $log)"
    if "$bin_dir/$t" -artifact_prefix="fuzz/artifacts/$t/" \
        -max_total_time="$budget" -max_len="$(max_len "$t")" -dict="$(dict "$t")" \
        -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=5 -print_final_stats=1 \
        "$work" "fuzz/corpus/$t" >"$log" 2>&1; then
        grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' "$log" |
            sed 's/^/   /' || true
    else
        grep -E '^(==[0-9]+==ERROR|SUMMARY)|panicked at' "$log" | head -5 | sed 's/^/   /' || true
        # A timeout that does not happen again was the machine stalling, not the reader.
        fresh=$(($(ls "fuzz/artifacts/$t" | wc -l) - before))
        flaky=$((fresh > 0))
        for a in $(ls -t "fuzz/artifacts/$t" | head -n "$fresh"); do
            case $a in
                timeout-*) "$bin_dir/$t" -timeout=5 "fuzz/artifacts/$t/$a" >/dev/null 2>&1 || flaky=0 ;;
                *) flaky=0 ;;
            esac
        done
        if [ $flaky = 1 ]; then
            echo "   a timeout that does not reproduce (machine stall); rerun the target to fuzz it"
        else
            echo "   FAILED: see $log and fuzz/artifacts/$t/"
        fi
        failed+=("$t")
    fi
done

# Minimised after all runs with libFuzzer's merge (what `cargo fuzz cmin` does). The working
# corpus keeps every input that adds coverage (hit counts included); the committed corpus
# fuzz/corpus/<target> keeps the seeds plus, of the inputs that add an edge, the smallest
# RRRA_FUZZ_KEEP (default 30), so git holds a small replayable set.
merge() { # target, output folder, extra flags, input folders...
    local t=$1 out=$2 flags=$3
    shift 3
    # shellcheck disable=SC2086
    "$bin_dir/$t" -merge=1 $flags -max_len="$(max_len "$t")" -rss_limit_mb=2048 \
        -malloc_limit_mb=2048 -timeout=5 "$out" "$@" >>"fuzz/artifacts/logs/$t.merge.log" 2>&1
}
if [ "${RRRA_FUZZ_CMIN:-1}" = 1 ]; then
    keep_n=${RRRA_FUZZ_KEEP:-30}
    for t in "${targets[@]}"; do
        work=fuzz/target/corpus/$t
        mkdir -p "$work"
        rm -f "fuzz/artifacts/logs/$t.merge.log"
        new=$(mktemp -d)
        if merge "$t" "$new" "" "$work" "fuzz/corpus/$t"; then
            rm -rf "$work" && mv "$new" "$work"
        else
            echo "== $t: minimising the working corpus failed (see fuzz/artifacts/logs/$t.merge.log)"
            rm -rf "$new"
        fi
        new=$(mktemp -d)
        if merge "$t" "$new" "-use_counters=0" "$work"; then
            # The seeds stay under their names; the merge's copies of them go.
            for s in "fuzz/corpus/$t"/seed-*; do
                [ -e "$s" ] || continue
                rm -f "$new/$(sha1sum "$s" | cut -d' ' -f1)"
                cp "$s" "$new/"
            done
            seeds=$(find "$new" -name 'seed-*' | wc -l)
            find "$new" -type f ! -name 'seed-*' -printf '%s %p\n' | sort -n |
                tail -n +$((keep_n - seeds + 1)) | cut -d' ' -f2- | xargs -r rm -f
            rm -rf "fuzz/corpus/$t" && mv "$new" "fuzz/corpus/$t" && chmod 755 "fuzz/corpus/$t"
        else
            echo "== $t: minimising the committed corpus failed (see fuzz/artifacts/logs/$t.merge.log)"
            rm -rf "$new"
        fi
        echo "== $t corpus: $(find "fuzz/corpus/$t" -type f | wc -l) files committed" \
            "($(du -sk --apparent-size "fuzz/corpus/$t" | cut -f1) KiB)," \
            "$(find "$work" -type f | wc -l) in the working corpus"
    done
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "findings in: ${failed[*]}"
    exit 1
fi
[ "$budget" -gt 0 ] && echo "no findings in ${#targets[@]} targets × ${budget}s" || echo "corpora minimised"
