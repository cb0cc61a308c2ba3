#!/usr/bin/env bash
# make docker-run: start the image detached, ports published on 127.0.0.1 ONLY, `--gpus all` where
# the host has an NVIDIA GPU (nvidia-smi works; needs the NVIDIA Container Toolkit), the host's
# model_store/ mounted read-only when it holds xray.mar (else the archive baked into the image is
# served), then wait for the HEALTHCHECK (READY worker + a real prediction) to say healthy.
#
# Env: IMAGE (xray-serve:latest), NAME (xray-serve), DOCKER (docker), PORT (8080; +2 metrics; the
# management API is never published), GPUS (auto|all|none|<docker --gpus value>), MODEL_STORE (./model_store), WAIT (300 s; 0 = no wait).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-xray-serve:latest}
NAME=${NAME:-xray-serve}
DOCKER=${DOCKER:-docker}
PORT=${PORT:-8080}
GPUS=${GPUS:-auto}
MODEL_STORE=${MODEL_STORE:-$PWD/model_store}
WAIT=${WAIT:-300}

args=(-d --name "$NAME" --restart unless-stopped
      -p "127.0.0.1:$PORT:8080" -p "127.0.0.1:$((PORT + 2)):8082")
if [ -n "${TOKEN_FILE:-}" ]; then  # clients' tokens, one a line; else one is generated at each start
    args+=(-v "$(cd "$(dirname "$TOKEN_FILE")" && pwd)/$(basename "$TOKEN_FILE"):/var/run/secrets/xray/token:ro")
fi
if [ "$GPUS" = auto ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && GPUS=all || GPUS=none
fi
[ "$GPUS" = none ] || args+=(--gpus "$GPUS")
if [ -f "$MODEL_STORE/xray.mar" ]; then
    args+=(-v "$(cd "$MODEL_STORE" && pwd):/app/model_store:ro")
    echo "docker-run: serving $MODEL_STORE/xray.mar (mounted read-only)"
else
    echo "docker-run: no $MODEL_STORE/xray.mar: serving the archive baked into $IMAGE"
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
echo "docker-run: healthy on http://127.0.0.1:$PORT (GPUs: $GPUS)"
echo "  token:   ${TOKEN_FILE:-$DOCKER exec $NAME cat /var/lib/xray/keys/key_file.json   (new at every start)}"
echo "  predict: curl -H \"Authorization: Bearer \$INFERENCE_KEY\" --data-binary @image.jpeg" \
     "http://127.0.0.1:$PORT/predictions/xray"
echo "  stop:    $DOCKER rm -f $NAME"
