#!/usr/bin/env bash
# `make run`: a broker (unless KAFKA_BOOTSTRAP is set), the topics, one worker, a demo feed, and the stitched
# profiles printed as they change. Ctrl-C (or any failure) stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OMNI=.venv/bin/omnistitch
RUN_DIR=.run/local
mkdir -p "$RUN_DIR"
pids=()
started_broker=0

cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$started_broker" = 1 ]; then "$PY" deploy/kafka/localkafka.py down --state-dir .run/kafka; fi
  echo "stopped"
}
trap cleanup EXIT INT TERM

if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
  started_broker=1
  KAFKA_BOOTSTRAP=$("$PY" deploy/kafka/localkafka.py up --state-dir .run/kafka --port 9092)
  rm -rf "$RUN_DIR/worker"  # a fresh broker has no changelogs: local table state from an old run must go too
fi
export KAFKA_BOOTSTRAP
export OMNISTITCH_DATA_DIR=${OMNISTITCH_DATA_DIR:-$RUN_DIR/worker}
echo "broker: $KAFKA_BOOTSTRAP"

"$OMNI" topics create >/dev/null
"$OMNI" worker --loglevel warn >"$RUN_DIR/worker.log" 2>&1 &
pids+=($!)
echo "worker started (log: $RUN_DIR/worker.log, metrics: http://127.0.0.1:${OMNISTITCH_WEB_PORT:-6066}/metrics)"

"$OMNI" watch --from-beginning &
pids+=($!)

# Kolya: a pizzeria purchase, a web cart, then the app login that shows they are one person
for source in pos web app; do
  grep "\"source\":\"$source\"" deploy/demo/kolya.jsonl | "$OMNI" produce - --source "$source" --no-progress
  sleep 2
done
# then a small simulated population, at a gentle rate, through every channel's raw topic
"$OMNI" simulate --people 200 --days 3 --seed 7 --out "$RUN_DIR/demo" >/dev/null
for file in "$RUN_DIR"/demo/raw.*.jsonl; do
  source=$(basename "$file" .jsonl)
  "$OMNI" produce "$file" --source "${source#raw.}" --rate 50 --no-progress >/dev/null &
  pids+=($!)
done
echo "demo events flowing; Ctrl-C to stop"
wait "${pids[0]}"
