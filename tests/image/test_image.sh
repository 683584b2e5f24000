#!/usr/bin/env bash
# test_image.sh - test a backend image the way the gateway uses it (`make test-image`).
#
#   tests/image/test_image.sh [IMAGE]        (default vllm-backend:cpu)
#
# Steps, each timed:
#   1. export   the image's filesystem (create a container, export it, untar) into a temp
#               dir, as the gateway unpacks a backend image into backends/<name>/
#   2. inspect  image and directory size; run.sh present; venv/bin/python a real file;
#               pyvenv.cfg without 'home'; no symlink pointing outside the directory
#   3. model    the tiny local model (repo venv: python -m tools.tiny_model)
#   4. start    <dir>/run.sh --addr 127.0.0.1:PORT, either
#                 container: in $RUN_BASE (default localhost/bookworm-minbase, a Debian
#                            minbase with no Python at all), host network, the unpacked
#                            dir and the model mounted read-only at other paths; or
#                 host:      on this machine with a cleared environment (env -i)
#   5. drive    tests/image/drive.py from the repo venv (repo stubs as the client):
#               Health, LoadModel (float32, max_model_len 2048, eager, 256 MiB KV cache),
#               Predict (Tokens=8, IgnoreEOS) -> exactly 8 tokens, Free
#   6. stop     SIGTERM, then the worker's log tail; an ERROR line or a traceback fails
# Clean-up (always, also on failure): the worker container, the temp dir, and, unless
# KEEP_IMAGE=1, the tested image plus Dockerfile.python's untagged intermediate images
# (labels vllm-backend.stage=builder / =final; other images are not touched). Base
# images are left alone (tests/image/local_build.sh removes the one it made).
#
# Environment:
#   CONTAINER_ENGINE    docker | podman (default: tests/image/engine.sh)
#   IMAGE_TEST_RUN      container | host | auto (default auto: container when $RUN_BASE
#                       exists locally, else host)
#   RUN_BASE            image to run the unpacked directory in (default
#                       localhost/bookworm-minbase)
#   KEEP_IMAGE=1        keep the tested image;  KEEP_WORK=1  keep the temp dir
#   PORT                worker port (default: a free one)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
IMAGE="${1:-vllm-backend:cpu}"
RUN_BASE="${RUN_BASE:-localhost/bookworm-minbase}"
MODE="${IMAGE_TEST_RUN:-auto}"
VPY="$ROOT/venv/bin/python"

log() { printf '[test-image] %s\n' "$*"; }
die() {
  printf '[test-image] FAILED: %s\n' "$*" >&2
  exit 1
}

[[ -x "$VPY" ]] || die "$VPY not found: run make install first (the client uses the repo venv)"
ENGINE="$(tests/image/engine.sh)"
case "$ENGINE" in
docker | podman) ;;
*) die "test-image needs docker or podman to export the image (engine: $ENGINE)" ;;
esac
"$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1 || die "image $IMAGE not found ($ENGINE): build it first (make docker-build-cpu)"
if [[ "$MODE" == auto ]]; then
  if "$ENGINE" image inspect "$RUN_BASE" >/dev/null 2>&1; then MODE=container; else MODE=host; fi
fi
[[ "$MODE" == container || "$MODE" == host ]] || die "IMAGE_TEST_RUN must be container, host or auto"

now() { date +%s.%N; }
T_ALL=$(now)
STEP="" STEP_T=""
SUMMARY=()
step() {
  step_end
  STEP="$1" STEP_T=$(now)
  log "==> $STEP"
}
step_end() {
  if [[ -n "$STEP" ]]; then
    local t
    t=$(awk -v a="$STEP_T" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    log "<== $STEP: ${t}s"
    SUMMARY+=("$(printf '%-10s %8ss' "$STEP" "$t")")
    STEP=""
  fi
}

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/vllm-image-test.XXXXXX")"
NAME="vllm-image-test-$$"
WORKER_PID=""
CID=""
cleanup() {
  local rc=$?
  set +e
  [[ -n "$CID" ]] && "$ENGINE" rm -f "$CID" >/dev/null 2>&1
  if [[ "$MODE" == container ]]; then
    "$ENGINE" rm -f "$NAME" >/dev/null 2>&1
  elif [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
    kill -KILL "$WORKER_PID" 2>/dev/null
  fi
  if [[ "${KEEP_WORK:-0}" == 1 ]]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  if [[ "${KEEP_IMAGE:-0}" != 1 ]]; then
    log "removing $IMAGE and dangling builder-stage images (KEEP_IMAGE=1 keeps them)"
    "$ENGINE" rmi -f "$IMAGE" >/dev/null 2>&1
    # builder stages are never tagged (-a is safe); final-stage leftovers only if dangling
    "$ENGINE" image prune -a -f --filter label=vllm-backend.stage=builder >/dev/null 2>&1
    "$ENGINE" image prune -f --filter label=vllm-backend.stage=final >/dev/null 2>&1
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------------
step export
mkdir -p "$WORK/backend"
CID="$("$ENGINE" create "$IMAGE" /run.sh)"
"$ENGINE" export "$CID" | tar -x -C "$WORK/backend"
"$ENGINE" rm "$CID" >/dev/null
CID=""
DIR="$WORK/backend"

# ------------------------------------------------------------------------------------
step inspect
size="$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")"
log "image $IMAGE: $((size / 1000000)) MB ($ENGINE image inspect)"
log "unpacked: $(du -sh "$DIR" | cut -f1) in $(find "$DIR" | wc -l) files; top level: $(find "$DIR" -mindepth 1 -maxdepth 1 -printf "%f " | sort)"
for d in venv lib backend; do log "  $d/: $(du -sh "$DIR/$d" | cut -f1)"; done
log "  largest in site-packages: $(du -s "$DIR"/venv/lib/python3.*/site-packages/* 2>/dev/null |
  sort -rn | head -n 6 | awk '{ n = split($2, p, "/"); printf "%s %d MB, ", p[n], $1 / 1024 }')"
[[ -x "$DIR/run.sh" ]] || die "run.sh missing or not executable at the image root"
py="$(find "$DIR/venv/bin" -maxdepth 1 -name 'python3.*' -type f | head -n 1)"
[[ -n "$py" && ! -L "$py" ]] || die "venv/bin/python3.X is not a real file: the interpreter is not in the image"
grep -q '^home' "$DIR/venv/pyvenv.cfg" && die "venv/pyvenv.cfg still names a 'home' outside the image"
outside="$(find "$DIR" -type l | while read -r l; do
  t="$(readlink -f "$l" || true)"
  [[ "$t" == "$DIR"/* ]] || echo "$l -> $(readlink "$l")"
done | head -n 5)"
[[ -z "$outside" ]] || die "symlinks pointing outside the directory (dangling on the gateway host):
$outside"
log "interpreter: ${py#"$DIR"/}, no 'home' in pyvenv.cfg, no symlink leaves the directory"

# ------------------------------------------------------------------------------------
step model
MODEL_HOST="$("$VPY" -m tools.tiny_model | tail -n 1)"
[[ -f "$MODEL_HOST/config.json" ]] || die "tools.tiny_model did not print a model directory (got '$MODEL_HOST')"
log "tiny model: $MODEL_HOST"

# ------------------------------------------------------------------------------------
step start
PORT="${PORT:-$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOG="$WORK/worker.log"
if [[ "$MODE" == container ]]; then
  if "$ENGINE" run --rm "$RUN_BASE" sh -c 'command -v python3 || command -v python' >/dev/null 2>&1; then
    log "WARNING: $RUN_BASE has a Python of its own; the run proves less"
  else
    log "$RUN_BASE has no python3/python: the worker can only use the image's own interpreter"
  fi
  GW_DIR=/srv/gateway/backends/vllm
  MODEL_IN=/models/tiny
  "$ENGINE" run -d --name "$NAME" --network host --shm-size 2g \
    -v "$DIR:$GW_DIR:ro" -v "$MODEL_HOST:$MODEL_IN:ro" \
    -e HOME=/tmp -e HF_HUB_OFFLINE=1 \
    "$RUN_BASE" "$GW_DIR/run.sh" --addr "127.0.0.1:$PORT" >/dev/null
  log "worker: $GW_DIR/run.sh --addr 127.0.0.1:$PORT in $ENGINE container $NAME ($RUN_BASE)"
  alive() { [[ "$("$ENGINE" inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" == true ]]; }
  worker_log() { "$ENGINE" logs "$NAME" >"$LOG" 2>&1 || true; }
else
  MODEL_IN="$MODEL_HOST"
  mkdir -p "$WORK/home"
  (cd / && exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$WORK/home" HF_HUB_OFFLINE=1 \
    "$DIR/run.sh" --addr "127.0.0.1:$PORT" >"$LOG" 2>&1) &
  WORKER_PID=$!
  log "worker: $DIR/run.sh --addr 127.0.0.1:$PORT on the host (pid $WORKER_PID, env -i)"
  alive() { kill -0 "$WORKER_PID" 2>/dev/null; }
  worker_log() { :; }
fi

# ------------------------------------------------------------------------------------
step drive
"$VPY" tests/image/drive.py --addr "127.0.0.1:$PORT" --model "$MODEL_IN" &
DRIVE_PID=$!
while kill -0 "$DRIVE_PID" 2>/dev/null; do
  if ! alive; then
    sleep 1
    kill "$DRIVE_PID" 2>/dev/null || true
    worker_log
    tail -n 40 "$LOG" >&2 || true
    die "the worker exited while being driven (log above)"
  fi
  sleep 1
done
if ! wait "$DRIVE_PID"; then
  worker_log
  tail -n 40 "$LOG" >&2 || true
  die "drive.py failed (worker log above)"
fi

# ------------------------------------------------------------------------------------
step stop
if [[ "$MODE" == container ]]; then
  "$ENGINE" stop -t 30 "$NAME" >/dev/null
  worker_log
  "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true
else
  kill -TERM "$WORKER_PID"
  wait "$WORKER_PID" || true
  WORKER_PID=""
fi
log "worker log (last lines):"
tail -n 8 "$LOG" | sed 's/^/    /'
# Free and the SIGTERM are normal stops: they log no error and no traceback
# (in a log that has the Free's own line, so the check looks at the real one).
grep -q 'Free: stopped the engine of' "$LOG" || die "the worker log has no line of the Free"
if grep -nE '(^|[ )])ERROR |Traceback' "$LOG" >&2; then
  die "the worker logged an error or a traceback (lines above) on a normal Free and stop"
fi
log "worker log: no ERROR line and no traceback through Free and the stop"
step_end

log "timings:"
for l in "${SUMMARY[@]}"; do log "  $l"; done
log "  $(printf '%-10s %8ss' total "$(awk -v a="$T_ALL" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')")"
log "PASSED: $IMAGE unpacked and run ($MODE mode): Health, LoadModel, Predict (8 tokens), Free"
