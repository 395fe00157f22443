#!/usr/bin/env bash
# Compress one seed of a recipe's config once, then recover it several ways, one after another (or
# PARALLEL=N at once, each with its own log <NAME>_s<SEED>.log), each a new run started from the same
# finished blocks (compression.blocks_from): the recovery settings
# are compared on one compressed model, and compression is paid once.
#
#   bash bench/recovery_variants.sh CONFIG SEED "COMMON OVERRIDES" NAME="OVERRIDES" [NAME="OVERRIDES" ...]
#
# Runs go to $RUNS (default /tmp/lit_cb_quality): $BASE_s<SEED> (compression only; BASE defaults to
# "base": set it when two configs share one $RUNS and its teacher text), then
# <NAME>_s<SEED> per variant, each with metrics.json, recovery_curve.json/png. The teacher text is
# generated once in $RUNS/teacher_text and shared. Collect with
#   python3 bench/quality_smollm2.py --recipe <recipe> --name <NAME> --seeds <SEED> --collect --out $OUT
# Under bench/background.sh every finished variant comes back in each later bg.tgz.
set -u
config=$1 seed=$2 common=$3
shift 3
RUNS=${RUNS:-/tmp/lit_cb_quality}
BASE=${BASE:-base}
shared="output_dir=$RUNS seed=$seed data.seed=$seed data.teacher_seed=0 data.teacher_cache_dir=$RUNS/teacher_text"
# Compression takes the common overrides except recovery's (`lit_cb compress` sets recovery.max_steps=0,
# and recovery settings are not part of what the blocks depend on).
compress_overrides=()
for o in $common; do [[ $o == recovery.* ]] || compress_overrides+=("$o"); done
echo "== compress ${BASE}_s$seed ($(date -u +%T))"
# shellcheck disable=SC2086  # the override lists are word lists
python3 -m lit_cb.cli compress --config "$config" run_name="${BASE}_s$seed" $shared "${compress_overrides[@]}" || exit $?
recover() {  # NAME OVERRIDES
  echo "== recover ${1}_s$seed: $2 ($(date -u +%T))"
  # shellcheck disable=SC2086
  python3 -m lit_cb.cli recover --config "$config" run_name="${1}_s$seed" \
    compression.blocks_from="$RUNS/${BASE}_s$seed" $shared $common $2
  echo "== ${1}_s$seed ended rc=$? ($(date -u +%T))"
}
lanes=${PARALLEL:-1}
for variant in "$@"; do
  name=${variant%%=*} overrides=${variant#*=}
  if ((lanes > 1)); then  # one log per variant, at most $lanes at once
    while (($(jobs -rp | wc -l) >= lanes)); do wait -n; done
    echo "== ${name}_s$seed starts in the background: $RUNS/${name}_s$seed.log"
    recover "$name" "$overrides" >"$RUNS/${name}_s$seed.log" 2>&1 &
  else
    recover "$name" "$overrides"
  fi
done
wait
if ((lanes > 1)); then for variant in "$@"; do tail -n 1 "$RUNS/${variant%%=*}_s$seed.log"; done; fi
