#!/usr/bin/env bash
# Builds dataset configs of tfds_omniref into a TFDS data directory as array_record files (no TensorFlow).
#
#   launch/build_datasets.sh [options] CONFIG [CONFIG ...]
#
# CONFIG is anything `python -m tfds_omniref.build --config` takes: an omniref config (shapes, shapes_tiny,
# released, rebuilt) or <builder>/<config> (ris/grefcoco, ris/refcoco, ris/refcoco_plus, ris/refcocog, ...);
# `--list` prints them. Options:
#   --data_dir DIR      TFDS data directory (default ~/tensorflow_datasets)
#   --manual_dir DIR    the manually downloaded files (default <data_dir>/downloads/manual)
#   --jobs N            configs built at the same time, one process each (default 1)
#   --workers N         processes per build that generate examples, where the builder supports it (rebuilt)
#   --stats             print each config's Fig. 4 statistics when it is built
#   --interval S        seconds between overall progress lines (default 10)
#
# Several processes: TFDS's own parallel build needs Apache Beam, which this project does not install. The
# closest without it: (1) --jobs builds several configs in parallel processes (a config's splits are written
# one after the other by TFDS, so one config is one process); (2) --workers spreads the decoding and PNG
# encoding of one config's examples over forked processes (omniref/rebuilt; the writer stays in the main
# process). benchmarks/RESULTS.md has the measured speed-ups. Give --jobs x --workers about the number of cores.
#
# Progress: TFDS's bars count examples per split; on top, each build writes its overall progress (examples
# done / total, examples/s, ETA) to <data_dir>/build_logs/<config>.progress.json and its output to
# <config>.log, and this script prints one overall line (all configs) every --interval seconds. A config whose
# builder does not know its split sizes up front (released, ris) counts examples without a total; the ETA then
# covers the configs with known totals. Building an already-built config is a quick no-op. Exit status: 0 when
# every config built; otherwise 1, after printing the end of each failed config's log.
set -euo pipefail

PYTHON="${PYTHON:-python}"
DATA_DIR="${HOME}/tensorflow_datasets"
MANUAL_DIR=""
JOBS=1
WORKERS=""
STATS=""
INTERVAL=10
CONFIGS=()

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --data_dir) DATA_DIR="$2"; shift 2 ;;
    --manual_dir) MANUAL_DIR="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --stats) STATS="--stats"; shift ;;
    --interval) INTERVAL="$2"; shift 2 ;;
    --list) "$PYTHON" -c "from tfds_omniref import build; print('\n'.join(build.known_names()))"; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "build_datasets.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) CONFIGS+=("$1"); shift ;;
  esac
done
if [[ ${#CONFIGS[@]} -eq 0 ]]; then
  echo "build_datasets.sh: name at least one config, e.g. 'launch/build_datasets.sh rebuilt' (--list shows them)" >&2
  exit 2
fi
if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then
  echo "build_datasets.sh: --jobs $JOBS must be a positive integer" >&2; exit 2
fi

LOG_DIR="${DATA_DIR}/build_logs"
mkdir -p "$LOG_DIR"
# Unknown names fail here, before anything starts.
"$PYTHON" - "${CONFIGS[@]}" <<'EOF'
import sys
from tfds_omniref import build
known = build.known_names()
bad = [name for name in sys.argv[1:] if not build._is_known(name, known)]  # pylint: disable=protected-access
if bad:
  sys.exit(f"build_datasets.sh: unknown config(s) {bad}; known: {known}")
EOF

safe_name() { echo "${1//\//_}"; }
declare -A PIDS=()
declare -A STATUS=()
START=$(date +%s)

print_overall() {
  local files=()
  for config in "${CONFIGS[@]}"; do files+=("${LOG_DIR}/$(safe_name "$config").progress.json"); done
  "$PYTHON" - "$START" "${#CONFIGS[@]}" "$1" "${files[@]}" <<'EOF'
import json, os, sys, time
start, n_configs, finished, files = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
done = total = sized_done = 0
unsized = 0
rate = 0.0
for path in files:
  if not os.path.exists(path):
    continue
  with open(path) as f:
    state = json.load(f)
  done += state["done"]
  if state["elapsed_s"] > 0:
    rate += state["done"] / state["elapsed_s"]
  if state["total"]:
    total += state["total"]
    sized_done += state["done"]
  else:
    unsized += 1
elapsed = time.time() - start
fmt = lambda s: f"{int(s) // 3600}:{int(s) // 60 % 60:02d}:{int(s) % 60:02d}"
line = f"[build_datasets] {finished}/{n_configs} configs done, {done} examples written"
if total:
  line += f" ({sized_done}/{total} of the sized configs, {100 * sized_done / total:.1f}%)"
line += f", {rate:.1f} examples/s, elapsed {fmt(elapsed)}"
if total and rate > 0:
  line += f", ETA {fmt((total - sized_done) / rate)}"
if unsized:
  line += f" (+{unsized} config(s) without a known total)"
print(line, flush=True)
EOF
}

run_one() {
  local config="$1" name
  name="$(safe_name "$config")"
  rm -f "${LOG_DIR}/${name}.progress.json"
  local args=(-m tfds_omniref.build --config "$config" --data_dir "$DATA_DIR"
              --progress_file "${LOG_DIR}/${name}.progress.json" --progress_interval 2)
  [[ -n "$MANUAL_DIR" ]] && args+=(--manual_dir "$MANUAL_DIR")
  [[ -n "$WORKERS" ]] && args+=(--workers "$WORKERS")
  [[ -n "$STATS" ]] && args+=(--stats)
  "$PYTHON" "${args[@]}" >"${LOG_DIR}/${name}.log" 2>&1
}

running() { local n=0 pid; for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && n=$((n + 1)); done; echo $n; }

reap() {  # records the exit status of every finished build
  local config
  for config in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$config]}" 2>/dev/null; then
      if wait "${PIDS[$config]}"; then STATUS[$config]=0; else STATUS[$config]=$?; fi
      unset "PIDS[$config]"
      if [[ "${STATUS[$config]}" == 0 ]]; then
        echo "[build_datasets] built ${config}: $(grep -E ' in .*: \{' "${LOG_DIR}/$(safe_name "$config").log" | tail -1)"
        [[ -n "$STATS" ]] && sed -n '/^Statistics of/,$p' "${LOG_DIR}/$(safe_name "$config").log"
      else
        echo "[build_datasets] FAILED ${config} (exit ${STATUS[$config]}); log: ${LOG_DIR}/$(safe_name "$config").log"
      fi
    fi
  done
}

echo "[build_datasets] building ${CONFIGS[*]} into ${DATA_DIR} (${JOBS} at a time; logs in ${LOG_DIR})"
trap 'for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done' INT TERM
LAST=0
for config in "${CONFIGS[@]}"; do
  while [[ $(running) -ge $JOBS ]]; do
    sleep 1; reap
    if (( $(date +%s) - LAST >= INTERVAL )); then print_overall "${#STATUS[@]}"; LAST=$(date +%s); fi
  done
  run_one "$config" &
  PIDS[$config]=$!
done
while [[ ${#PIDS[@]} -gt 0 ]]; do
  sleep 1; reap
  if [[ ${#PIDS[@]} -gt 0 ]] && (( $(date +%s) - LAST >= INTERVAL )); then
    print_overall "${#STATUS[@]}"; LAST=$(date +%s)
  fi
done
print_overall "${#STATUS[@]}"

FAILED=0
for config in "${CONFIGS[@]}"; do
  if [[ "${STATUS[$config]}" != 0 ]]; then
    FAILED=1
    echo "---- end of ${LOG_DIR}/$(safe_name "$config").log ----"
    tail -n 15 "${LOG_DIR}/$(safe_name "$config").log"
  fi
done
exit $FAILED
