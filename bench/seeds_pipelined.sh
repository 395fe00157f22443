#!/usr/bin/env bash
# Several seeds of one config on one GPU, pipelined: the compressions run one after another (they are
# GPU-bound: three side by side took 13.8 s a block each against 4.7 s alone, session 18), and each
# seed's recovery starts in the background as soon as its blocks are done, beside the next compression
# (recoveries share a GPU well: four at once took 490-496 s each, session 9). The first recovery samples
# the shared teacher text; the others wait on its lock and load it.
#
#   bash bench/seeds_pipelined.sh CONFIG "SEEDS" NAME ["COMMON OVERRIDES"]
#
# A seed whose $RUNS/${BASE}_s<SEED>/blocks/progress.json exists is not compressed again (blocks from an earlier
# call, or unpacked by bench/device_setup.sh from a carried .blocks/).
#
# COMPRESS_ONLY=1: compress the seeds in turn and recover none; once the first seed's blocks are there, sample the
# seeds' shared teacher text beside the next compressions (a 1-step recovery of that seed, run ${NAME}_teacher,
# which generates and caches the text, then ends). For a session whose device budget holds the compressions but
# not the recoveries: pack the blocks (bench/blocks_carry.py) and the teacher text (bench/background.sh's bg.tgz),
# carry them to the next session, and run this script there without COMPRESS_ONLY: it finds both.
#
# Same run folders as bench/recovery_variants.sh: $RUNS/${BASE}_s<SEED> (compression only) and
# $RUNS/<NAME>_s<SEED> (recovered from those blocks, log <NAME>_s<SEED>.log), so they are collected
# the same way:
#   python3 bench/quality_smollm2.py --recipe <recipe> --config <config> --name <NAME> --seeds 0,1,2 \
#       --collect --runs-dir $RUNS --out $OUT
set -u
config=$1 seeds=$2 name=$3 common=${4:-}
RUNS=${RUNS:-/tmp/lit_cb_quality}
BASE=${BASE:-base}
mkdir -p "$RUNS"
teacher_started=""
compress_overrides=()
for o in $common; do [[ $o == recovery.* ]] || compress_overrides+=("$o"); done
for seed in $seeds; do
  shared="output_dir=$RUNS seed=$seed data.seed=$seed data.teacher_seed=0 data.teacher_cache_dir=$RUNS/teacher_text"
  if [ -f "$RUNS/${BASE}_s$seed/blocks/progress.json" ]; then
    # blocks there already (an earlier call, or carried in by bench/blocks_carry.py): not compressed again;
    # compression.blocks_from checks that they fit this config, and a partial set is finished by the recovery
    echo "== blocks of ${BASE}_s$seed found: not compressed again"
  else
    echo "== compress ${BASE}_s$seed ($(date -u +%T))"
    # shellcheck disable=SC2086  # the override lists are word lists
    python3 -m lit_cb.cli compress --config "$config" run_name="${BASE}_s$seed" $shared "${compress_overrides[@]}" \
      >"$RUNS/${BASE}_s$seed.log" 2>&1 || { echo "== compress ${BASE}_s$seed failed rc=$?"; continue; }
  fi
  if [ "${COMPRESS_ONLY:-0}" = 1 ]; then
    [ -n "$teacher_started" ] && continue
    teacher_started=1
    echo "== teacher text for the seeds starts in the background: $RUNS/${name}_teacher.log ($(date -u +%T))"
    # shellcheck disable=SC2086
    (python3 -m lit_cb.cli recover --config "$config" run_name="${name}_teacher" \
      compression.blocks_from="$RUNS/${BASE}_s$seed" $shared $common recovery.max_steps=1 \
      >"$RUNS/${name}_teacher.log" 2>&1
     echo "== ${name}_teacher ended rc=$? ($(date -u +%T))") &
    continue
  fi
  echo "== recover ${name}_s$seed starts in the background: $RUNS/${name}_s$seed.log ($(date -u +%T))"
  # shellcheck disable=SC2086
  (python3 -m lit_cb.cli recover --config "$config" run_name="${name}_s$seed" \
    compression.blocks_from="$RUNS/${BASE}_s$seed" $shared $common >"$RUNS/${name}_s$seed.log" 2>&1
   echo "== ${name}_s$seed ended rc=$? ($(date -u +%T))") &
done
wait
