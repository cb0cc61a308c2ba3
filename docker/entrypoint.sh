#!/usr/bin/env bash
# Container entrypoint: the supervisor in the FOREGROUND (serving/supervisor.py): the nginx gateway
# on 0.0.0.0:<inference port> (bearer token) and :<metrics port> inside the container's network
# namespace, TorchServe behind it on unix sockets, restarted with back-off if it dies; SIGTERM
# drains in-flight requests, then stops both. The container lives as long as the supervisor.
#
# Paths (env, set by the Dockerfile; default: handlers/constants.py's CONTAINER_*): XRAY_MODEL_STORE
# (baked in or mounted read-only), XRAY_STATE_DIR (sockets, keys, tmp dirs), XRAY_LOG_DIR,
# XRAY_JAVA_LIBRARY_PATH (netty's epoll transport, extracted at build time),
# XRAY_TOKEN_FILE (clients' tokens, one a line, re-read on change; when the file is missing a
# token is generated into $XRAY_STATE_DIR/keys/<key file>). Extra arguments go to the launcher.
set -euo pipefail

const() { python -m handlers.constants "$@"; }
store="${XRAY_MODEL_STORE:-$(const CONTAINER_MODEL_STORE)}"
state="${XRAY_STATE_DIR:-$(const CONTAINER_STATE_DIR)}"
logs="${XRAY_LOG_DIR:-$(const CONTAINER_LOG_DIR)}"
mar=$(const MAR_NAME)

if [ ! -f "$store/$mar" ]; then
    echo "entrypoint: $store/$mar not found. Build it (make train export archive) and either rebuild" \
         "the image or mount it: -v \"\$PWD/model_store:$store:ro\"" >&2
    exit 2
fi
export XRAY_TOKEN_FILE="${XRAY_TOKEN_FILE:-$(const CONTAINER_TOKEN_FILE)}"
if [ ! -f "$XRAY_TOKEN_FILE" ]; then
    echo "entrypoint: no token file at $XRAY_TOKEN_FILE: a token is generated into $state/keys/" >&2
    unset XRAY_TOKEN_FILE
fi
mkdir -p "$state" "$logs" "${MPLCONFIGDIR:-/tmp/matplotlib}"
cd /app
# XRAY_JAVA_LIBRARY_PATH: netty's native transport, extracted at build time (the writable dirs may be noexec).
native=()
[ -z "${XRAY_JAVA_LIBRARY_PATH:-}" ] || native=(--java-library-path "$XRAY_JAVA_LIBRARY_PATH")
exec python -m serving.launcher supervise --host 0.0.0.0 --model-store "$store" --state-dir "$state" \
    --log-dir "$logs" "${native[@]}" "$@"
