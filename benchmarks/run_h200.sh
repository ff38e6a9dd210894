#!/usr/bin/env bash
# Re-run every committed benchmark table on one H200 into benchmarks/results/*_h200.{md,json,png}
# (the *_h100 files stay untouched, as history). Every table reports "% of read BW": the fraction of
# the SM streaming-read bandwidth that benchmarks/_timing.bandwidth_ceilings measures in the same
# process, with the kernels' own timing (CUDA-graph replay); its header prints both SM ceilings
# (streaming read, SM copy) and the old captured torch copy_ number.
#
#   bash benchmarks/run_h200.sh                    # every part, in the order below
#   bash benchmarks/run_h200.sh caches attention   # some parts, in this order (names: see PARTS below)
#
# Environment: OUT (when set: the whole log goes to $OUT/run_h200.log and the tables written so far
# to $OUT/h200_results.tar.gz, refreshed after every part; unpack it in the repository root),
# RESULTS (where the tables go; default benchmarks/results), PYTHON (default python3),
# PART_TIMEOUT (seconds per part, default 240; 0 = none).
#
# The token / batch sweeps are those of the *_h100 tables, trimmed so that the whole run fits well
# inside one 10-minute command on an H200 with cold compile caches. Seen on one (torch 2.11, Triton
# 3.6, no CuTe DSL), with the full sweeps: attention 60 s, kv_backends 27 s, indexer_q 109 s (10 T),
# indexer_q_backends 28 s, caches over 150 s (5 T; mostly Inductor compiles), decode_step 60 s (bf16 weights
# only then: it now also runs weight_format="fp8"). indexer_topk (about 70 s), projections, host_dispatch (--step:
# about 50 s), full_mode (about 30 s), stack_compile (about 70 s, cold + warm) and stack_step
# were added after that run and have not been timed by this script yet. stack_step runs TP=1 only; its
# TP=2 rows need two GPUs: torchrun --nproc_per_node 2 benchmarks/stack_step.py --out $R/stack_step_h200.md
# (they merge into the same table).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results}
PART_TIMEOUT=${PART_TIMEOUT:-240}
mkdir -p "$RESULTS"
LOGDIR=${OUT:-}
if [ -n "$LOGDIR" ]; then mkdir -p "$LOGDIR"; LOG=$LOGDIR/run_h200.log; else LOG=$(mktemp /tmp/run_h200.XXXXXX.log); fi
export PYTHONUNBUFFERED=1
PARTLOG=$(mktemp /tmp/run_h200_part.XXXXXX.log)

say() { echo "$@" | tee -a "$LOG"; }

# dsv4_compile must import with its lowerings (installed as dsv4_compile.lowerings): use an install
# of this checkout when there is one, else a copy of the tree laid out as the wheel installs it.
# (checked from /tmp: python -c puts the current directory, whose dsv4_compile/ lacks lowerings/, first)
if ! (cd /tmp && $PY -c "import os, sys, dsv4_compile, dsv4_compile.lowerings; sys.exit(os.path.dirname(os.path.dirname(dsv4_compile.__file__)) != '$ROOT')") 2>/dev/null; then
  PKG=$(mktemp -d /tmp/dsv4_pkg.XXXXXX)
  cp -r "$ROOT/dsv4_compile" "$PKG/" && cp -r "$ROOT/lowerings" "$PKG/dsv4_compile/lowerings"
  export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! (cd /tmp && $PY -c "import torch, dsv4_compile.lowerings; assert torch.cuda.is_available()") >>"$LOG" 2>&1; then
  say "run_h200.sh: dsv4_compile does not import or no CUDA GPU (see $LOG)"; exit 1
fi
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown commit")
if [ "$COMMIT" != "unknown commit" ] && [ -n "$(git -C "$ROOT" status --porcelain -- dsv4_compile lowerings benchmarks 2>/dev/null)" ]; then
  COMMIT="$COMMIT + uncommitted changes"
fi
VERSIONS=$($PY -c "import torch, triton; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}', end='')" 2>/dev/null)
CUTE=$(cd /tmp && $PY -c "from dsv4_compile.kernels.cute import HAVE_CUTE; print('CuTe DSL present' if HAVE_CUTE else 'no CuTe DSL (CuTe columns n/a)', end='')" 2>/dev/null)
say "run_h200.sh on $VERSIONS; $CUTE; $COMMIT; $(date -u '+%Y-%m-%d %H:%M UTC')"

R=$RESULTS
B=benchmarks
# name | output table | command (the per-part arguments)
PARTS=(
  "attention|$R/attention_h200.md|$B/attention.py --out $R/attention_h200.md"
  "kv_backends|$R/kv_backends_h200.md|$B/caches.py --backends --tokens 1 128 1024 4096 16384 65536 --out $R/kv_backends_h200.md"
  "indexer_q|$R/indexer_q_h200.md|$B/indexer_q.py --tokens 1 32 128 1024 4096 16384 --out $R/indexer_q_h200.md"
  "indexer_q_backends|$R/indexer_q_backends_h200.md|$B/indexer_q.py --backends --tokens 1 32 128 1024 4096 16384 --out $R/indexer_q_backends_h200.md"
  "caches|$R/caches_h200.md|$B/caches.py --tokens 1 1024 4096 16384 --out $R/caches_h200.md"
  "decode_step|$R/decode_step_h200.md|$B/decode_step.py --batches 1 8 32 64 --contexts 8192 32768 --out $R/decode_step_h200.md"
  "indexer_topk|$R/indexer_topk_decode_h200.md|$B/attention.py --indexer --batches 1 8 32 64 --contexts 65536 --fmts fp8 mxfp4 --out $R/indexer_topk_decode_h200.md"
  "projections|$R/projections_h200.md|$B/projections.py --out $R/projections_h200.md"
  "host_dispatch|$R/host_dispatch_h200.md|$B/host_dispatch.py --device cuda --step --out $R/host_dispatch_h200.md"
  "full_mode|$R/full_mode_h200.md|$B/full_mode.py --out $R/full_mode_h200.md"
  "stack_compile|$R/stack_compile_h200.md|$B/stack_compile.py --preset real --models flash --ways stack --out $R/stack_compile_h200.md"
  "stack_step|$R/stack_step_h200.md|$B/stack_step.py --out $R/stack_step_h200.md"
)
ORDER=()
if [ $# -gt 0 ]; then
  for w in "$@"; do
    found=0
    for p in "${PARTS[@]}"; do [ "${p%%|*}" = "$w" ] && ORDER+=("$p") && found=1; done
    [ $found -eq 1 ] || { say "run_h200.sh: no part named $w (parts: $(printf '%s ' "${PARTS[@]%%|*}"))"; exit 2; }
  done
else
  ORDER=("${PARTS[@]}")
fi
SUMMARY=()
pack() {  # the tables written so far, as paths relative to the repository root
  [ -n "$LOGDIR" ] || return 0
  local files=()
  for f in "$R"/*_h200.*; do [ -e "$f" ] && files+=("$f"); done
  [ ${#files[@]} -gt 0 ] && tar czf "$LOGDIR/h200_results.tar.gz" "${files[@]}" 2>>"$LOG"
}
T_ALL=$SECONDS
for p in "${ORDER[@]}"; do
  IFS='|' read -r name md cmd <<<"$p"
  say ""
  say "=== $name: $PY $cmd"
  t0=$SECONDS
  if [ "$PART_TIMEOUT" -gt 0 ]; then
    timeout -k 10 "$PART_TIMEOUT" $PY $cmd 2>&1 | tee "$PARTLOG"
  else
    $PY $cmd 2>&1 | tee "$PARTLOG"
  fi
  rc=${PIPESTATUS[0]}
  cat "$PARTLOG" >>"$LOG"
  dt=$((SECONDS - t0))
  if [ -f "$md" ] && [ "$rc" -eq 0 ]; then  # provenance on the table's first line
    { echo "\`$PY $cmd\` (benchmarks/run_h200.sh) on $VERSIONS; $CUTE; $COMMIT."; echo; cat "$md"; } >"$md.tmp" && mv "$md.tmp" "$md"
  fi
  read_bw=$(grep -o 'streaming read [0-9.]* TB/s' "$PARTLOG" | head -1)
  status=$([ "$rc" -eq 0 ] && echo ok || ([ "$rc" -eq 124 ] && echo "TIMED OUT" || echo "FAILED rc=$rc"))
  SUMMARY+=("$(printf '%-19s %-10s %4ds  %s  %s' "$name" "$status" "$dt" "${read_bw:-no ceiling}" "$([ -f "$md" ] && echo "$md")")")
  say "=== $name: $status in ${dt}s"
  pack
done
say ""
say "summary ($((SECONDS - T_ALL))s in all; log $LOG):"
for s in "${SUMMARY[@]}"; do say "  $s"; done
if [ -n "$LOGDIR" ]; then say "  tables: $LOGDIR/h200_results.tar.gz (tar xzf it in the repository root)"; fi
