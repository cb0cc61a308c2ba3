#!/usr/bin/env bash
# Container smoke test (make docker-test): build the image on a LOCAL base, run it, check it.
#
# No container registry is reachable here, so the CUDA base is replaced by a Debian 12 (bookworm)
# minbase made with debootstrap and `docker import`ed (it has python3.11, openjdk-17, tini).
# Everything else is the real Dockerfile: pinned pip install (PyPI through the host's CA bundle
# as a build secret), the CPU torch wheel from $WHEELS, the non-root user, HEALTHCHECK and
# ENTRYPOINT. Then: run it with a read-only root (tmpfs at /tmp and the state and log dirs, as the
# manifests' emptyDirs), the model store mounted read-only and ports published on
# 127.0.0.1 only, wait for the HEALTHCHECK to say healthy (READY worker + real prediction), send
# real test radiographs from $DATA_DIR with the token from the container's key file, validate
# every answer as handlers.schemas.Prediction, stop the container gracefully and remove it.
#
# Engine: a private dockerd (Debian's docker.io, installed with apt-get when missing) on its own
# socket, data root and exec root under a temp dir, with --iptables=false (published ports go
# through docker-proxy on 127.0.0.1; the build's RUN steps use the host network). Everything it
# starts or makes is removed on exit, failure included.
#
# Env: MAR (an existing xray.mar to serve; default: model_store/xray.mar, else a quick one is
# trained+exported+archived into the temp dir), DATA_DIR, WHEELS (/opt/wheels), PYTHON (.venv's),
# IMAGE (xray-serve:test); the host ports are free ones picked at run time, the container's are
# handlers/constants.py's (inference and metrics; management is never published),
# BASE_CACHE (a cached base tarball; default ~/.cache/xray-serve/bookworm-minbase.tar),
# KEEP_ENGINE=1 (leave the daemon and its data root: faster reruns, prints how to stop it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
t_start=$(date +%s)
log() { echo "[docker-test +$(( $(date +%s) - t_start ))s] $*" >&2; }

PYTHON=${PYTHON:-$REPO/.venv/bin/python}
WHEELS=${WHEELS:-/opt/wheels}
DATA_DIR=${DATA_DIR:-$(cd "$REPO/.." && pwd)/shared/data/chest_xray}
IMAGE=${IMAGE:-xray-serve:test}
BASE_IMAGE_TAG=xray-base:bookworm
const() { "$PYTHON" -m handlers.constants "$@"; }
read -r c_inf c_met c_mar c_store c_state c_logs c_key < <(const INFERENCE_PORT METRICS_PORT \
    MAR_NAME CONTAINER_MODEL_STORE CONTAINER_STATE_DIR CONTAINER_LOG_DIR KEY_FILE_NAME | paste -sd' ')
BASE_CACHE=${BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xray-serve/bookworm-minbase.tar}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-300}
export DATA_DIR

[ "$(id -u)" = 0 ] || { echo "docker-test: needs root (it starts its own dockerd)" >&2; exit 1; }
[ -x "$PYTHON" ] || { echo "docker-test: $PYTHON missing: make setup first" >&2; exit 1; }
[ -d "$DATA_DIR/test" ] || { echo "docker-test: no data at $DATA_DIR (set DATA_DIR)" >&2; exit 1; }
wheel=$(ls "$WHEELS"/torch-2.13.0*cpu*.whl 2>/dev/null | head -1 || true)
[ -n "$wheel" ] || { echo "docker-test: no CPU torch 2.13.0 wheel in $WHEELS" >&2; exit 1; }

# --- engine -----------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || [ -s "$BASE_CACHE" ] || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's docker CLI (20.10) has BuildKit built in; a newer CLI without the buildx plugin cannot
# build with RUN --mount, so prefer it over another docker on PATH.
DOCKER_BIN=${DOCKER_BIN:-$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker )}

XD=$(mktemp -d /tmp/xray-docker-test.XXXXXX)
had_bridge=0; [ -e /sys/class/net/docker0 ] && had_bridge=1
export DOCKER_HOST="unix://$XD/docker.sock" DOCKER_BUILDKIT=1
docker() { "$DOCKER_BIN" "$@"; }
CONTAINER=""
cleanup() {
    local rc=$?
    set +e
    if [ -n "$CONTAINER" ]; then
        if [ $rc -ne 0 ]; then
            log "container logs (tail):"; docker logs --tail 60 "$CONTAINER" 2>&1 | sed 's/^/    /' >&2
            docker inspect --format '{{json .State.Health}}' "$CONTAINER" 2>/dev/null | head -c 2000 >&2; echo >&2
        fi
        docker rm -f "$CONTAINER" >/dev/null 2>&1
    fi
    if [ "${KEEP_ENGINE:-0}" = 1 ] && [ -f "$XD/docker.pid" ]; then
        log "KEEP_ENGINE=1: dockerd left running: DOCKER_HOST=$DOCKER_HOST; stop: kill \$(cat $XD/docker.pid)"
    else
        if [ -f "$XD/docker.pid" ]; then
            pid=$(cat "$XD/docker.pid")
            kill "$pid" 2>/dev/null
            for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -9 "$pid" 2>/dev/null
        fi
        # anything the daemon left mounted under its roots, then the temp dir
        grep -o " $XD[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
        rm -rf "$XD"
        # the default bridge dockerd made, unless another engine had it before us
        if [ $had_bridge = 0 ] && [ -e /sys/class/net/docker0 ] && command -v ip >/dev/null; then
            ip link delete docker0 2>/dev/null
        fi
    fi
    log "done (exit $rc) after $(( $(date +%s) - t_start ))s"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting a private dockerd in $XD"
dockerd --data-root "$XD/root" --exec-root "$XD/exec" --pidfile "$XD/docker.pid" -H "$DOCKER_HOST" \
    --iptables=false --ip6tables=false --storage-driver "${STORAGE_DRIVER:-overlay2}" \
    > "$XD/dockerd.log" 2>&1 &
for _ in $(seq 60); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
docker version >/dev/null || { tail -20 "$XD/dockerd.log" >&2; exit 1; }

# --- base image -------------------------------------------------------------------------------
if [ ! -s "$BASE_CACHE" ]; then
    log "debootstrap bookworm minbase -> $BASE_CACHE"
    mkdir -p "$(dirname "$BASE_CACHE")"
    debootstrap --variant=minbase bookworm "$XD/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        > "$XD/debootstrap.log" 2>&1 || { tail -20 "$XD/debootstrap.log" >&2; exit 1; }
    rm -rf "$XD/rootfs/var/cache/apt/archives/"*.deb "$XD/rootfs/var/lib/apt/lists/"*
    tar -C "$XD/rootfs" -cf "$BASE_CACHE.part" . && mv "$BASE_CACHE.part" "$BASE_CACHE"
    rm -rf "$XD/rootfs"
fi
docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$BASE_CACHE" "$BASE_IMAGE_TAG" >/dev/null
log "base image $BASE_IMAGE_TAG imported"

# --- model archive ----------------------------------------------------------------------------
STORE="$XD/model_store"
mkdir -p "$STORE"
MAR=${MAR:-}
local_mar="$(const MODEL_STORE)/$c_mar"
[ -n "$MAR" ] || { [ -f "$local_mar" ] && MAR=$local_mar; } || true
if [ -n "$MAR" ]; then
    cp "$MAR" "$STORE/$c_mar"
    log "serving $MAR"
else
    log "no $local_mar: training a quick one (training.experiments --quick, export, export.archive)"
    q="$XD/quick"
    "$PYTHON" -m training.experiments --study default --quick --best-dir "$q/best" --runs-dir "$q/runs" \
        --reports-dir "$q/reports" > "$XD/quick.log" 2>&1 \
    && "$PYTHON" -m export --best-dir "$q/best" --out-dir "$q/export" >> "$XD/quick.log" 2>&1 \
    && "$PYTHON" -m export.archive --export-dir "$q/export" --model-store "$STORE" >> "$XD/quick.log" 2>&1 \
    || { tail -30 "$XD/quick.log" >&2; exit 1; }
    log "quick archive built"
fi
chmod 0755 "$XD" "$STORE"; chmod 0644 "$STORE/$c_mar"   # the container's user 10001 reads it

# --- build ------------------------------------------------------------------------------------
# torch comes from the build-context folder .whl/ (git- and docker-ignored except that wheel).
mkdir -p .whl
[ -f ".whl/$(basename "$wheel")" ] || ln "$wheel" .whl/ 2>/dev/null || cp "$wheel" .whl/
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
log "docker build (base $BASE_IMAGE_TAG)"
docker build --progress=plain --network host --build-arg "BASE_IMAGE=$BASE_IMAGE_TAG" \
    --secret "id=ca_bundle,src=$ca" -t "$IMAGE" . > "$XD/build.log" 2>&1 \
    || { tail -40 "$XD/build.log" >&2; exit 1; }
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

# --- run --------------------------------------------------------------------------------------
CONTAINER=xray-serve-test-$$
read -r p0 p1 p2 < <("$PYTHON" -c "from tests.helpers import free_ports; print(*free_ports(3))")
# As deploy/ runs it: a read-only root, writable only where the manifests mount emptyDirs (here
# tmpfs, which docker mounts noexec, owned by root: nothing may be executed or dlopen()ed from
# them, and the supervisor cannot chmod their roots).
docker run -d --name "$CONTAINER" --health-interval 5s --health-start-period 240s \
    --read-only --tmpfs /tmp:size=256m --tmpfs "$c_state:size=512m" --tmpfs "$c_logs:size=1g" \
    -p "127.0.0.1:$p0:$c_inf" -p "127.0.0.1:$p2:$c_met" \
    -v "$STORE:$c_store:ro" "$IMAGE" >/dev/null
user=$(docker inspect -f '{{.Config.User}}' "$CONTAINER")
[[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || { echo "container user '$user' is not a numeric non-root uid" >&2; exit 1; }
log "container $CONTAINER started as user $user; waiting for healthy (HEALTHCHECK: READY worker + prediction)"
deadline=$(( $(date +%s) + HEALTH_TIMEOUT ))
while :; do
    state=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$CONTAINER")
    [ "$state" = "running healthy" ] && break
    case "$state" in running*) ;; *) echo "container is $state" >&2; exit 1 ;; esac
    [ "$(date +%s)" -lt "$deadline" ] || { echo "not healthy after ${HEALTH_TIMEOUT}s ($state)" >&2; exit 1; }
    # a crash loop (TorchServe would retry for ever): fail fast, the logs are printed on exit
    deaths=$(docker logs "$CONTAINER" 2>&1 | grep -c "Backend worker process died" || true)
    [ "$deaths" -lt 2 ] || { echo "the model's worker keeps dying ($deaths times)" >&2; exit 1; }
    sleep 2
done
log "healthy: $(docker inspect -f '{{json .State.Health.Log}}' "$CONTAINER" \
    | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)[-1]["Output"].strip())')"

docker exec "$CONTAINER" cat "$c_state/keys/$c_key" > "$XD/key_file.json"
[ "$(docker exec "$CONTAINER" id -u)" != 0 ] || { echo "TorchServe runs as root" >&2; exit 1; }
"$PYTHON" docker/test_container.py --url "http://127.0.0.1:$p0" \
    --metrics-url "http://127.0.0.1:$p2" --key-file "$XD/key_file.json" --data-dir "$DATA_DIR"

# A graceful stop: SIGTERM reaches the supervisor through tini; it drains the gateway, stops
# TorchServe and the container exits well within 30 s.
t0=$(date +%s)
docker stop -t 30 "$CONTAINER" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
log "docker stop took $(( $(date +%s) - t0 ))s (exit code $code)"
case "$code" in 0|143) ;; *) echo "TorchServe did not stop on SIGTERM (exit code $code)" >&2; exit 1 ;; esac
log "docker-test passed"
