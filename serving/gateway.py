"""The nginx gateway in front of TorchServe: the only thing a client can reach.

TorchServe's frontend holds every request body on the Java heap, never times out a slow or
idle client, accepts connections until it runs out of file descriptors, parses multipart
forms itself (500 with Java internals on a malformed one) and lets any management-token
holder scale the workers to zero. nginx, in front, on `host`:inference_port and :metrics_port:

- checks the bearer token itself (tokens from XRAY_TOKEN_FILE, one a line, re-read when the
  file changes; else one generated into the key file clients read) and answers 401 JSON;
- refuses a body over max_request_size (413 JSON) and a body without Content-Length (411);
  buffers bodies to disk, so TorchServe gets whole bodies and its heap only what is let in;
- lets max_inflight requests (max_large_inflight of them >= large_body_bytes) through at
  once and sheds the rest at once with 503 JSON + Retry-After (the heap is sized from these);
- times out slow headers, slow bodies and idle keep-alive connections, caps connections and
  closes idle ones first when it runs out;
- passes multipart bodies on untouched as application/octet-stream, with the client's
  Content-Type in X-Xray-Content-Type, so the handler parses them (4xx for every malformed one);
- turns TorchServe's "Worker died." 500, its 507, its own 503s and an unreachable TorchServe
  (while the supervisor restarts it) into 503 JSON + Retry-After, which clients retry;
- answers GET /ping without a token and never sheds it (liveness), and /metrics on the
  metrics port without a token.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
from pathlib import Path

from handlers.constants import CONTENT_TYPE_HEADER
from serving.settings import ServeSettings

TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")  # nothing nginx would read as syntax
PROXIED = r"^/(predictions|explanations)/"


def greater_than(n: int) -> str:
    """A regex matching the decimal integers > n (Content-Length values, leading zeros allowed)."""
    digits = str(n)
    alternatives = [rf"[1-9]\d{{{len(digits)},}}"]  # more digits
    for i, d in enumerate(digits):
        if d != "9":
            rest = len(digits) - i - 1
            alternatives.append(f"{digits[:i]}[{int(d) + 1}-9]" + (rf"\d{{{rest}}}" if rest else ""))
    return rf"^0*({'|'.join(alternatives)})$"


def read_tokens(path: Path) -> list[str]:
    """The token file's tokens (one a line, blank lines and # comments skipped); raise on a bad one."""
    tokens = [line.strip() for line in path.read_text().splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    bad = [i for i, t in enumerate(tokens) if not TOKEN_PATTERN.match(t)]
    if not tokens:
        raise ValueError(f"{path}: no token")
    if bad:
        raise ValueError(f"{path}: token(s) number {bad} are not 16-256 characters of [A-Za-z0-9._~+/=-]")
    return tokens


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def write_key_file(path: Path, token: str) -> None:
    """The client's key file, in TorchServe's key-file format, written atomically, mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"inference": {"key": token}}))
    tmp.chmod(0o600)
    tmp.replace(path)


def _error(code: int, type_: str, message: str) -> str:
    return json.dumps({"code": code, "type": type_, "message": message}).replace("'", "\\'")


def render(s: ServeSettings, tokens: list[str], ts_inference_key: str) -> str:
    """nginx.conf for these settings; `tokens` are the clients' bearer tokens, `ts_inference_key`
    TorchServe's own inference key, which the gateway adds to every request it forwards."""
    run, logs = s.run_dir, s.log_dir
    host = str(s.host)
    token_map = "".join(f'        "Bearer {t}" 1;\n' for t in tokens)
    retry = s.retry_after_s
    mib = s.max_request_size / 2**20
    unavailable = _error(503, "unavailable", f"the model server is restarting a worker or itself; retry after "
                         f"{retry} s")
    overloaded = _error(503, "overloaded", f"the server is at its limit of {s.max_inflight} requests in flight "
                        f"({s.max_large_inflight} over {s.large_body_bytes} bytes); retry after {retry} s")
    forward = f"""
            proxy_pass http://torchserve;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_set_header Authorization "Bearer {ts_inference_key}";
            proxy_set_header Content-Type application/octet-stream;
            proxy_set_header {CONTENT_TYPE_HEADER} $content_type;"""
    # A root master would run its workers as nobody, who cannot open the private sockets.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    return f"""# Rendered by serving/gateway.py; do not edit.
{user}worker_processes 1;
pid {run}/nginx.pid;
error_log {logs}/gateway_error.log error;
worker_rlimit_nofile {2 * s.max_connections + 64};
events {{ worker_connections {s.max_connections}; }}

http {{
    access_log off;
    server_tokens off;
    default_type application/json;
    map_hash_bucket_size 256;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;

    client_max_body_size {s.max_request_size};
    client_body_buffer_size 64k;
    client_header_buffer_size 1k;
    large_client_header_buffers 4 8k;
    client_header_timeout {s.client_timeout_s}s;
    client_body_timeout {s.client_timeout_s}s;
    keepalive_timeout {s.client_timeout_s}s;
    keepalive_requests 10000;
    send_timeout {s.upstream_timeout_s}s;
    reset_timedout_connection on;
    proxy_request_buffering on;
    proxy_buffering on;
    proxy_connect_timeout 2s;
    proxy_read_timeout {s.upstream_timeout_s}s;
    proxy_send_timeout {s.upstream_timeout_s}s;

    map $http_authorization $xray_token_ok {{
        default 0;
{token_map}    }}
    map $uri $xray_public {{ default 0; /ping 1; }}
    map "$xray_public$xray_token_ok" $xray_deny {{ default 1; "~1" 0; }}
    map $http_transfer_encoding $xray_chunked {{ default 0; "~." 1; }}
    map $content_length $xray_too_large {{ default 0; "~{greater_than(s.max_request_size)}" 1; }}
    map $content_length $xray_large {{ default ""; "~^0*[1-9]\\d{{{len(str(s.large_body_bytes)) - 1},}}$" large; }}
    map $host $xray_all {{ default all; }}
    limit_conn_zone $xray_all zone=inflight:1m;
    limit_conn_zone $xray_large zone=large:1m;
    limit_conn_status 429;
    limit_conn_log_level warn;

    upstream torchserve {{
        server unix:{s.socket('inference')};
        keepalive 32;
    }}

    server {{
        listen {host}:{s.inference_port} backlog=4096;
        error_page 401 @unauthorized;
        error_page 411 @length_required;
        error_page 413 @too_large;
        error_page 404 @not_found;
        error_page 400 @bad_request;
        error_page 408 @timeout;

        # Server level, before any location: one error page per status, and the handler's own
        # 4xx answers (e.g. 413 image_too_large) are never replaced below.
        if ($xray_deny) {{ return 401; }}
        if ($xray_chunked) {{ return 411; }}
        if ($xray_too_large) {{ return 413; }}

        location = /ping {{{forward}
            proxy_intercept_errors on;
            error_page 500 502 503 504 507 =503 @unavailable;
        }}
        location ~ {PROXIED} {{
            limit_conn inflight {s.max_inflight};
            limit_conn large {s.max_large_inflight};{forward}
            proxy_intercept_errors on;
            error_page 429 =503 @overloaded;
            error_page 500 502 503 504 507 =503 @unavailable;
        }}
        location / {{ return 404; }}

        location @unauthorized {{
            add_header WWW-Authenticate Bearer always;
            return 401 '{_error(401, "unauthorized", "send Authorization: Bearer <token> with a valid token")}';
        }}
        location @length_required {{
            return 411 '{_error(411, "length_required", "send the body with a Content-Length (no chunked encoding)")}';
        }}
        location @too_large {{
            return 413 '{_error(413, "body_too_large", f"the body is over {mib:g} MiB")}';
        }}
        location @not_found {{
            return 404 '{_error(404, "not_found", "POST /predictions/xray or /explanations/xray; GET /ping")}';
        }}
        location @bad_request {{
            return 400 '{_error(400, "bad_request", "malformed HTTP request")}';
        }}
        location @timeout {{
            return 408 '{_error(408, "request_timeout", f"no request within {s.client_timeout_s} s")}';
        }}
        location @overloaded {{
            add_header Retry-After {retry} always;
            return 503 '{overloaded}';
        }}
        location @unavailable {{
            add_header Retry-After {retry} always;
            return 503 '{unavailable}';
        }}
    }}

    server {{
        listen {host}:{s.metrics_port};
        location = /metrics {{
            proxy_pass http://unix:{s.socket('metrics')}:/metrics;
            proxy_set_header Authorization "Bearer {ts_inference_key}";
        }}
        location / {{ return 404 '{_error(404, "not_found", "GET /metrics")}'; }}
    }}
}}
"""
