#!/usr/bin/env bash
# Prepare a lent GPU machine (no network) for lit_cb runs. Source it from the repo root:
#   source bench/device_setup.sh
# Calls that carry .gguf_a/ or .gguf_b/ (the two halves of the embedded model's GGUF, each under the
# 64 MiB carry limit) copy their half to /tmp/lit_cb; once both halves are there they are joined and
# checked. Calls that carry .whl/ install the wheels the machine lacks (datasets, gguf, bitsandbytes); calls that
# carry .teacher/ restore a teacher-text cache; calls that carry .blocks/ bring compressed blocks (bench/blocks_carry.py).
set -e
STATE=/tmp/lit_cb
mkdir -p "$STATE"
[ -f .gguf_a/part0 ] && cp .gguf_a/part0 "$STATE/part0"
[ -f .gguf_b/part1 ] && cp .gguf_b/part1 "$STATE/part1"
if [ ! -f "$STATE/smollm2.gguf" ] && [ -f "$STATE/part0" ] && [ -f "$STATE/part1" ]; then
  cat "$STATE/part0" "$STATE/part1" > "$STATE/smollm2.gguf"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $STATE/smollm2.gguf" | sha256sum -c -
fi
# .teacher/<hash>/ (teacher text packed by bench/background.sh in an earlier session): into the shared cache
# the quality runs use, where lit_cb loads it if its fingerprint is theirs (the folder name is its hash)
if [ -d .teacher ]; then
  mkdir -p "${RUNS:-/tmp/lit_cb_quality}/teacher_text"
  cp -rn .teacher/. "${RUNS:-/tmp/lit_cb_quality}/teacher_text/"
fi
for d in .whl .whl_bnb; do
  if ls $d/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $d/*.whl
  fi
done
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export LIT_CB_SMOLLM2_GGUF=$STATE/smollm2.gguf LIT_CB_CACHE=$STATE/cache PYTHONUNBUFFERED=1
# .blocks/ (compressed blocks packed by bench/blocks_carry.py in an earlier session; parts may come over several
# calls, each of which replaces .blocks/): gathered in $STATE/blocks, and each run whose parts are all there is
# unpacked into ${RUNS}/<run>, where bench/seeds_pipelined.sh finds it and does not compress that seed again
if [ -d .blocks ]; then
  mkdir -p "$STATE/blocks"
  cp -n .blocks/* "$STATE/blocks/" 2>/dev/null || true
fi
for m in "$STATE"/blocks/*.manifest.json; do
  [ -e "$m" ] || continue
  run=$(basename "$m" .manifest.json)
  dest="${RUNS:-/tmp/lit_cb_quality}/$run"
  [ -d "$dest" ] || python3 bench/blocks_carry.py unpack "$m" "$dest" || echo "blocks of $run: not all parts here yet"
done
set +e
