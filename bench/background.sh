#!/usr/bin/env bash
# Long GPU work across several short device calls on one warm machine.
#
# A device call ends after at most 10 minutes and takes its processes with it, but a process that
# starts its own session (setsid) runs on until the machine is given back. So one call starts the
# jobs, and the calls after it (each issued within the machine's warm window) wait on them, print
# where they stand and bring back what they have written so far: nothing is lost if a later call
# never comes.
#
#   source bench/device_setup.sh
#   bash bench/background.sh start NAME CMD...   # CMD runs detached; its output goes to $BG/NAME.log
#   bash bench/background.sh wait SECONDS        # until every job ended or SECONDS passed; then status
#                                                # and $OUT/bg.tgz (logs, driver outputs, small run files)
#   bash bench/background.sh stop NAME           # SIGINT the job's process group (runs checkpoint)
#
# BG (default /tmp/lit_cb_bg) holds one folder per job state; RUNS (default /tmp/lit_cb_quality)
# is where bench/quality_smollm2.py keeps its run folders; only their small files are packed, and the
# finished shared teacher text ($RUNS/teacher_text/<hash>/tokens.safetensors + meta.json): unpack it into
# .teacher/ (tar xzf bg.tgz --strip-components=3 -C .teacher tmp/lit_cb_quality/teacher_text) and carry
# .teacher/ in a later session, where bench/device_setup.sh puts it back and the runs load it.
set -u
BG=${BG:-/tmp/lit_cb_bg}
RUNS=${RUNS:-/tmp/lit_cb_quality}
mkdir -p "$BG"

alive() { kill -0 "$(cat "$BG/$1.pid")" 2>/dev/null; }

status() {
  for pidfile in "$BG"/*.pid; do
    [ -e "$pidfile" ] || continue
    name=$(basename "$pidfile" .pid)
    if alive "$name"; then state=running; else state="ended rc=$(cat "$BG/$name.rc" 2>/dev/null || echo 'not recorded (interrupted)')"; fi
    echo "== $name: $state"
    tail -n 3 "$BG/$name.log" 2>/dev/null | cut -c1-300
  done
  for log in "$BG"/*/logs/*.log; do
    [ -e "$log" ] || continue
    echo "-- $(basename "$log"): $(tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -n 1 | cut -c1-240)"
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
}

pack() {
  [ -n "${OUT:-}" ] || return 0
  local list
  list=$(mktemp)
  find "$BG" -type f -size -4M >"$list"
  find "$RUNS" -maxdepth 2 -type f \( -name '*.json' -o -name '*.yaml' -o -name '*.png' -o -name '*.md' -o -name '*.log' \) \
    -size -4M 2>/dev/null >>"$list"
  find "$RUNS" -path '*/logs/*' -name '*.csv' -size -4M 2>/dev/null >>"$list"
  # finished shared teacher text, whatever its size (4 MB for 2 M tokens as uint16 ids; 16 MB in int64 before): carried as .teacher/ next time,
  # it saves the ~190 s of sampling (bench/device_setup.sh puts it back)
  find "$RUNS/teacher_text" -mindepth 2 -maxdepth 2 \( -name tokens.safetensors -o -name meta.json \) \
    2>/dev/null >>"$list"
  tar czf "$OUT/bg.tgz" -T "$list" 2>/dev/null
  rm -f "$list"
}

case "${1:-}" in
  start)
    name=$2
    shift 2
    # A job started with & would inherit an ignored SIGINT (bash does that without job control), and
    # then `stop` and the quality driver's budget could not interrupt it: start it from Python, which
    # restores the default handler, in a session of its own.
    python3 - "$BG/$name" "$@" <<'PY'
import os, signal, subprocess, sys
state, cmd = sys.argv[1], sys.argv[2:]
wrapped = ["bash", "-c", '"$@"; echo $? > "$0.rc"', state, *cmd]
with open(state + ".log", "w") as log:
    p = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
open(state + ".pid", "w").write(str(p.pid))
print(f"started {os.path.basename(state)} (pid {p.pid}): {' '.join(cmd)}")
PY
    ;;
  wait)
    end=$((SECONDS + ${2:-60}))
    packed=$SECONDS
    while [ $SECONDS -lt $end ]; do
      running=0
      for pidfile in "$BG"/*.pid; do
        [ -e "$pidfile" ] && alive "$(basename "$pidfile" .pid)" && running=1
      done
      [ $running = 0 ] && break
      sleep 5
      # pack once a minute too: a call cut short by its time limit still brings back what was written
      # (elapsed time since the last pack, not a phase window that a slow loop turn can step over)
      if [ $((SECONDS - packed)) -ge 60 ]; then pack; packed=$SECONDS; fi
    done
    status
    pack
    ;;
  stop)
    kill -INT -- "-$(cat "$BG/$2.pid")" 2>/dev/null && echo "stopped $2"
    ;;
  *)
    echo "usage: bash bench/background.sh start NAME CMD... | wait SECONDS | stop NAME" >&2
    exit 2
    ;;
esac
