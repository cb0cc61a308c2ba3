#!/usr/bin/env bash
# make docker-run: start the image detached, ports published on 127.0.0.1 ONLY, `--gpus all` where
# the host has an NVIDIA GPU (nvidia-smi works; needs the NVIDIA Container Toolkit), the host's
# model_store/ mounted read-only when it holds xray.mar (else the archive baked into the image is
# served), then wait for the HEALTHCHECK (READY worker + a real prediction) to say healthy.
#
# Env: IMAGE, NAME (xray-serve), DOCKER (docker), INFERENCE_PORT, METRICS_PORT (host ports; default:
# the container's own, handlers/constants.py; the management API is never published), TOKEN_FILE
# (clients' tokens, one a line; else one is generated at each start), GPUS (auto|all|none|<docker
# --gpus value>), MODEL_STORE (./model_store), WAIT (300 s; 0 = no wait).
set -euo pipefail
cd "$(dirname "$0")/.."
const() { python3 -m handlers.constants "$@"; }
read -r c_inf c_met c_model c_mar c_store c_state c_key < <(const INFERENCE_PORT METRICS_PORT \
    MODEL_NAME MAR_NAME CONTAINER_MODEL_STORE CONTAINER_STATE_DIR KEY_FILE_NAME | paste -sd' ')
IMAGE=${IMAGE:-$(const IMAGE)}
NAME=${NAME:-xray-serve}
DOCKER=${DOCKER:-docker}
INFERENCE_PORT=${INFERENCE_PORT:-$c_inf}
METRICS_PORT=${METRICS_PORT:-$c_met}
GPUS=${GPUS:-auto}
MODEL_STORE=${MODEL_STORE:-$(const MODEL_STORE)}
WAIT=${WAIT:-300}

args=(-d --name "$NAME" --restart unless-stopped -p "127.0.0.1:$INFERENCE_PORT:$c_inf"
      -p "127.0.0.1:$METRICS_PORT:$c_met")
if [ -n "${TOKEN_FILE:-}" ]; then
    args+=(-v "$(cd "$(dirname "$TOKEN_FILE")" && pwd)/$(basename "$TOKEN_FILE"):$(const CONTAINER_TOKEN_FILE):ro")
fi
if [ "$GPUS" = auto ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && GPUS=all || GPUS=none
fi
[ "$GPUS" = none ] || args+=(--gpus "$GPUS")
if [ -f "$MODEL_STORE/$c_mar" ]; then
    args+=(-v "$(cd "$MODEL_STORE" && pwd):$c_store:ro")
    echo "docker-run: serving $MODEL_STORE/$c_mar (mounted read-only)"
else
    echo "docker-run: no $MODEL_STORE/$c_mar: serving the archive baked into $IMAGE"
fi
echo "docker-run: $DOCKER run ${args[*]} $IMAGE"
$DOCKER run "${args[@]}" "$IMAGE" >/dev/null

[ "$WAIT" != 0 ] || exit 0
deadline=$(( $(date +%s) + WAIT ))
while :; do
    state=$($DOCKER inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$NAME")
    [ "$state" = "running healthy" ] && break
    if [[ "$state" != running* ]] || [ "$(date +%s)" -ge "$deadline" ]; then
        echo "docker-run: container is '$state'; last log lines:" >&2
        $DOCKER logs --tail 40 "$NAME" >&2
        exit 1
    fi
    sleep 2
done
echo "docker-run: healthy on http://127.0.0.1:$INFERENCE_PORT (GPUs: $GPUS)"
echo "  token:   ${TOKEN_FILE:-$DOCKER exec $NAME cat $c_state/keys/$c_key   (new at every start)}"
echo "  predict: curl -H \"Authorization: Bearer \$INFERENCE_KEY\" --data-binary @image.jpeg" \
     "http://127.0.0.1:$INFERENCE_PORT/predictions/$c_model"
echo "  stop:    $DOCKER rm -f $NAME"
