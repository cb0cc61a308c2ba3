#!/usr/bin/env bash
# Container entrypoint: render TorchServe's config for the container (every port on 0.0.0.0
# inside the container's network namespace, token auth on, model API off) and run TorchServe in
# the FOREGROUND, so the container lives exactly as long as the server.
#
# Paths (env, set by the Dockerfile; default: handlers/constants.py's CONTAINER_*): XRAY_MODEL_STORE
# (baked in or mounted read-only), XRAY_STATE_DIR (config, keys/<key file>, tmp dirs), XRAY_LOG_DIR.
# Extra arguments are passed on to `python -m ts.model_server`.
set -euo pipefail

const() { python -m handlers.constants "$@"; }
store="${XRAY_MODEL_STORE:-$(const CONTAINER_MODEL_STORE)}"
state="${XRAY_STATE_DIR:-$(const CONTAINER_STATE_DIR)}"
logs="${XRAY_LOG_DIR:-$(const CONTAINER_LOG_DIR)}"
mar=$(const MAR_NAME)
key_file="$state/keys/$(const KEY_FILE_NAME)"

if [ ! -f "$store/$mar" ]; then
    echo "entrypoint: $store/$mar not found. Build it (make train export archive) and either rebuild" \
         "the image or mount it: -v \"\$PWD/model_store:$store:ro\"" >&2
    exit 2
fi

mkdir -p "$state/keys" "$state/tmp" "$state/jtmp" "$state/cwd" "$logs" "${MPLCONFIGDIR:-/tmp/matplotlib}"
# A key file left by an earlier run of this state dir would be stale: TorchServe writes a new one.
rm -f "$key_file"
python -m serving.settings --host 0.0.0.0 --model-store "$store" --state-dir "$state" --log-dir "$logs" \
    > "$state/config.properties"

# TMPDIR: pid file and worker sockets; TEMP: TorchServe's extracted models; logs via LOG_LOCATION.
export TMPDIR="$state/tmp" TEMP="$state/jtmp" LOG_LOCATION="$logs" METRICS_LOCATION="$logs"
rm -f "$TMPDIR/.model_server.pid"
cd "$state/cwd"
echo "entrypoint: TorchServe for $store/$mar; bearer tokens in $key_file" >&2
exec python -m ts.model_server --start --foreground --ncs \
    --ts-config "$state/config.properties" --model-store "$store" "$@"
