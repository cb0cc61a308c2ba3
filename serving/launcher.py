"""Start, check and stop the server for model_store/xray.mar: nginx gateway + TorchServe, supervised.

    python -m serving.launcher start   # returns once the model answers a real radiograph
    python -m serving.launcher status
    python -m serving.launcher stop    # drains in-flight requests first
    python -m serving.launcher supervise   # the supervisor itself, in the foreground (the container's)

`start` runs the supervisor (serving/supervisor.py) detached; it starts TorchServe on unix
sockets and the gateway on 127.0.0.1 (serving/gateway.py), and restarts TorchServe when it
dies. Readiness (serving/readiness.py, shared with the container's HEALTHCHECK) means: the
radiograph packed into the .mar answers 200 with a label through the gateway. Everything
(pid files, keys, sockets, temp dirs) goes under the state dir, logs under the log dir.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from handlers import torchserve
from handlers.constants import MODEL_NAME, REPO_ROOT
from handlers.schemas import Prediction
from serving import readiness, supervisor
from serving.settings import PORT_FIELDS, ServeSettings, read_keys


class LaunchError(RuntimeError):
    pass


def server_pid(s: ServeSettings) -> int | None:
    """The supervisor's pid, only if the process recorded for this state dir still runs as itself."""
    ident = supervisor.supervisor_identity(s.resolved())
    return ident.pid if ident else None


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def management_token(s: ServeSettings) -> str:
    """TorchServe's own management key (its key file in the private state dir); no client holds it."""
    return read_keys(s.resolved().ts_key_file, attempts=3)["management"]


def list_workers(s: ServeSettings, timeout: float = 10) -> list[dict]:
    """The model's workers (id, pid, status, ...) through the management API's unix socket; [] when
    it answers anything but 200. Raises OSError when nothing answers, ValueError/KeyError without keys."""
    s = s.resolved()
    return torchserve.list_workers(s.socket("management"), management_token(s), timeout=timeout)


def client_token(s: ServeSettings) -> str | None:
    """The bearer token a local client uses: the key file (the generated token, or the token file's first)."""
    s = s.resolved()
    return read_keys(s.key_file)["inference"] if s.key_file.is_file() else None


def log_tail(s: ServeSettings, n: int = 40, name: str = "model_log.log") -> str:
    """The worker's last log lines (its tracebacks land in model_log.log), without the log prefix."""
    path = s.log_dir / name
    lines = path.read_text(errors="replace").splitlines()[-n:] if path.is_file() else [f"(no {name})"]
    return "\n".join(line.split("MODEL_LOG - ", 1)[-1] for line in lines)


def worker_deaths(s: ServeSettings) -> int:
    path = s.log_dir / "model_log.log"
    return path.read_text(errors="replace").count("Backend worker process died") if path.is_file() else 0


def start(s: ServeSettings, timeout: float = 240) -> Prediction:
    s = s.resolved()
    mar = s.model_store / f"{MODEL_NAME}.mar"
    if not mar.is_file():
        raise LaunchError(f"{mar} not found: run `make train export archive` first")
    probe = readiness.probe_from_mar(mar)
    if pid := server_pid(s):
        raise LaunchError(f"the server already runs from {s.state_dir} (supervisor pid {pid}): `make stop` first")
    busy = [p for p in s.ports() if _port_open(p)]
    if busy:
        raise LaunchError(f"ports {busy} are already in use on 127.0.0.1")
    supervisor.prepare_dirs(s)
    settings_file = s.run_dir / "settings.json"
    settings_file.write_text(s.model_dump_json())
    with open(s.log_dir / "supervisor.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serving.launcher", "supervise", "--settings-json",
                                 str(settings_file)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=REPO_ROOT)
    try:
        return wait_ready(s, timeout, probe, proc)
    except LaunchError:
        stop(s)
        raise


def wait_ready(s: ServeSettings, timeout: float = 240, probe: bytes | None = None,
               proc: subprocess.Popen | None = None) -> Prediction:
    """Block until the probe radiograph answers 200 with a label; raise with the log tail if not."""
    s = s.resolved()
    probe = probe or readiness.probe_from_mar(s.model_store / f"{MODEL_NAME}.mar")
    t0 = time.monotonic()
    deaths0 = worker_deaths(s)
    reason = "no answer yet"
    while time.monotonic() < t0 + timeout:
        time.sleep(0.5)
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"the supervisor exited {proc.returncode}. Log tail:\n"
                              f"{log_tail(s, name='supervisor.log')}\n{log_tail(s, name='ts_log.log')}")
        if worker_deaths(s) - deaths0 >= 2:  # a crash loop: TorchServe would retry for ever
            raise LaunchError(f"the model's worker keeps dying. Worker log tail:\n{log_tail(s)}")
        token = client_token(s)
        if token is None:
            continue
        try:
            return readiness.check(s.inference_url, token, probe)
        except readiness.NotReady as exc:
            reason = str(exc)
    raise LaunchError(f"model not ready after {timeout:.0f}s ({reason}). Log tail:\n{log_tail(s)}")


def stop(s: ServeSettings, timeout: float | None = None) -> bool:
    """Drain and stop the server started from this state dir; True if one was running. Only the
    process recorded in the pid file, and only while it is still that process, is ever signalled."""
    s = s.resolved()
    ident = supervisor.supervisor_identity(s)
    if ident is None:
        return False
    ident.signal(signal.SIGTERM)
    deadline = time.monotonic() + (timeout or 2 * s.drain_timeout_s + 15)
    while time.monotonic() < deadline and ident.alive():
        time.sleep(0.2)
    if ident.signal(signal.SIGKILL):  # it would not stop: it, then what it started, by recorded identity
        supervisor.kill_children(s)
    (s.run_dir / supervisor.SUPERVISOR_PID).unlink(missing_ok=True)
    return True


def status(s: ServeSettings) -> str:
    s = s.resolved()
    pid = server_pid(s)
    if not pid:
        return "stopped"
    try:
        workers = [f"{w['id']}:{w['status']}" for w in list_workers(s, 5)]
    except (OSError, KeyError, ValueError):
        workers = []
    st = supervisor.read_state(s)
    return (f"running (supervisor pid {pid}) at {s.inference_url}; workers {workers or 'unknown'}; TorchServe "
            f"started {st.get('torchserve_starts')} time(s), last exit {st.get('last_exit')}; key file {s.key_file}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status", "supervise"])
    for name in PORT_FIELDS:
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--host")
    p.add_argument("--model-store", type=Path)
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--log-dir", type=Path)
    p.add_argument("--token-file", type=Path)
    p.add_argument("--java-library-path", type=Path)
    p.add_argument("--settings-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=240)
    ns = p.parse_args(argv)
    s = ServeSettings(**{k: v for k, v in vars(ns).items()
                         if v is not None and k not in ("command", "timeout", "settings_json")})
    running = s.resolved().run_dir / "settings.json"
    if ns.command in ("stop", "status") and running.is_file():
        ns.settings_json = running  # the running server's own ports and limits
    if ns.settings_json:
        s = ServeSettings.model_validate(json.loads(ns.settings_json.read_text()))
    try:
        if ns.command == "supervise":
            return supervisor.main(s)
        if ns.command == "start":
            start(s, ns.timeout)
            r = s.resolved()
            print(f"ready: POST {r.inference_url}/predictions/{MODEL_NAME} (bearer token: 'inference' key in "
                  f"{r.key_file}); metrics {r.metrics_url}/metrics; logs in {r.log_dir}")
        elif ns.command == "stop":
            print("stopped" if stop(s) else "not running")
        else:
            print(status(s))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
