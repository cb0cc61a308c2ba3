#!/usr/bin/env bash
# Container entrypoint: the supervisor in the FOREGROUND (serving/supervisor.py): the nginx gateway
# on 0.0.0.0:8080 (inference, bearer token) and :8082 (metrics) inside the container's network
# namespace, TorchServe behind it on unix sockets, restarted with back-off if it dies; SIGTERM
# drains in-flight requests, then stops both. The container lives as long as the supervisor.
#
# Paths (env): XRAY_MODEL_STORE (/app/model_store, baked in or mounted read-only),
# XRAY_STATE_DIR (/var/lib/xray: sockets, keys, tmp dirs), XRAY_LOG_DIR (/var/log/xray),
# XRAY_TOKEN_FILE (/var/run/secrets/xray/token: clients' tokens, one a line, re-read on change;
# when the file is missing a token is generated into $XRAY_STATE_DIR/keys/key_file.json).
set -euo pipefail

store="${XRAY_MODEL_STORE:-/app/model_store}"
state="${XRAY_STATE_DIR:-/var/lib/xray}"
logs="${XRAY_LOG_DIR:-/var/log/xray}"

if [ ! -f "$store/xray.mar" ]; then
    echo "entrypoint: $store/xray.mar not found. Build it (make train export archive) and either rebuild" \
         "the image or mount it: -v \"\$PWD/model_store:$store:ro\"" >&2
    exit 2
fi
if [ -n "${XRAY_TOKEN_FILE:-}" ] && [ ! -f "$XRAY_TOKEN_FILE" ]; then
    echo "entrypoint: no token file at $XRAY_TOKEN_FILE: a token is generated into $state/keys/key_file.json" >&2
    unset XRAY_TOKEN_FILE
fi
mkdir -p "$state" "$logs" "${MPLCONFIGDIR:-/tmp/matplotlib}"
cd /app
exec python -m serving.launcher supervise --host 0.0.0.0 --model-store "$store" --state-dir "$state" \
    --log-dir "$logs" "$@"
