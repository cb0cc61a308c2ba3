# xray-serve: TorchServe + the xray model, GPU inference through onnxruntime-gpu.
#
#   make docker-build                      # = the command below, with the CA bundle and torch wheel staged
#   mkdir -p .whl && ln /opt/wheels/torch-2.13.0+cpu-*.whl .whl/        # the CPU torch wheel, in the context
#   DOCKER_BUILDKIT=1 docker build -t xray-serve:latest \
#       --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt .   # [--build-arg BASE_IMAGE=...]
#   make docker-run                        # 127.0.0.1:8080-8082, --gpus all where nvidia-smi exists
#
# torch is only needed by TorchServe's worker (import) and the TorchScript backend: it is the
# CPU wheel from the build-context folder .whl/ (the Makefile links it there from /opt/wheels),
# so the image never downloads CUDA torch; CUDA inference is onnxruntime-gpu on the base's
# CUDA 13 + cuDNN 9 libraries. The base must offer python3.11, python3.11-venv,
# openjdk-17-jre-headless, nginx-light and tini through apt (Ubuntu 22.04 and Debian 12 do).
# The model archive: model_store/xray.mar is baked in when it exists at build time; otherwise
# (or to replace it) mount one: -v "$PWD/model_store:/app/model_store:ro".
# Secrets: none are baked in. Mount the clients' bearer tokens (one a line) and point
# XRAY_TOKEN_FILE at them (default /var/run/secrets/xray/token); without that file a fresh token is
# generated at every start into /var/lib/xray/keys/key_file.json (docker exec ... cat it).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Java 17 for TorchServe's frontend, Python 3.11 for the workers, nginx for the gateway in front,
# tini as PID 1 (signals, zombies). Debian's nginx package would start a default site: removed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3.11 python3.11-venv openjdk-17-jre-headless nginx-light tini \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
    && python3.11 --version && java -version && nginx -v

# The serving environment only: requirements-serve.lock (no test, lint, training or export
# packages; same pins as requirements.lock). The CA bundle (for a TLS-intercepting proxy) is a
# build secret, never a layer; the torch wheel is bind-mounted from the build context and
# installed first, offline, so the lock's torch==2.13.0 is already satisfied by 2.13.0+cpu.
WORKDIR /app
COPY requirements-serve.lock ./
RUN --mount=type=secret,id=ca_bundle,target=/run/secrets/ca_bundle.crt \
    --mount=type=bind,source=.whl,target=/wheels \
    if [ -s /run/secrets/ca_bundle.crt ]; then export PIP_CERT=/run/secrets/ca_bundle.crt; fi \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --no-deps /wheels/torch-2.13.0*.whl \
    && /opt/venv/bin/pip install --find-links /wheels -r requirements-serve.lock \
    && /opt/venv/bin/python -c "import torch, ts, onnxruntime, yaml; assert torch.version.cuda is None, torch.__version__; print('torch', torch.__version__, 'ort', onnxruntime.__version__, onnxruntime.get_available_providers())"

# The XRAY_* paths and the exposed ports are handlers/constants.py's CONTAINER_* and *_PORT (a test keeps them equal).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    HOME=/var/lib/xray \
    MPLCONFIGDIR=/tmp/matplotlib \
    XRAY_STATE_DIR=/var/lib/xray \
    XRAY_LOG_DIR=/var/log/xray \
    XRAY_MODEL_STORE=/app/model_store \
    XRAY_JAVA_LIBRARY_PATH=/opt/netty-native

# Only what serving runs (tests/test_runtime_image.py): the handler package and the modules the
# entrypoint imports; no training, export, client or benchmark code.
COPY handlers/ handlers/
COPY serving/__init__.py serving/settings.py serving/launcher.py serving/supervisor.py serving/gateway.py \
     serving/readiness.py serving/
COPY docker/entrypoint.sh docker/healthcheck.py docker/
# Empty of .mar unless `make archive` ran before the build (.dockerignore keeps only *.mar + README).
COPY model_store/ model_store/

# netty's epoll transport (TorchServe's unix sockets) on the image's own, read-only root: netty
# would otherwise copy it into java.io.tmpdir and load it from there, which a noexec tmpfs
# (`docker run --read-only --tmpfs ...`) refuses, and TorchServe exits (serving/settings.py).
RUN python -m serving.settings --extract-netty-native "$XRAY_JAVA_LIBRARY_PATH"

# The state and log dirs are 1777, as /tmp, because a tmpfs mounted on them (`docker run --read-only
# --tmpfs /var/lib/xray`) takes their mode but is owned by root; what the supervisor keeps in the
# state dir is in subdirectories of mode 0700 (serving/supervisor.py).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/xray --shell /usr/sbin/nologin xray \
    && install -d -o 10001 -g 10001 -m 1777 /var/lib/xray /var/log/xray \
    && chmod 0755 docker/entrypoint.sh docker/healthcheck.py

USER 10001:10001
# The gateway: 8080 inference (token), 8082 metrics. TorchServe's management API is only on a
# unix socket inside the container: it is never published.
EXPOSE 8080 8082

# Ready = the radiograph packed into the .mar answers 200 with a label (serving/readiness.py, the
# launcher's check too). /ping alone says Healthy before the model loads.
HEALTHCHECK --interval=30s --timeout=20s --start-period=120s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]

# The supervisor in the foreground: the gateway + TorchServe, restarted when TorchServe dies; on
# SIGTERM (tini forwards it) in-flight requests are drained first. Run with --restart unless-stopped.
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/app/docker/entrypoint.sh"]
