"""Start, check and stop TorchServe for model_store/xray.mar.

    python -m serving.launcher start   # returns once a worker is READY and a real prediction succeeds
    python -m serving.launcher status
    python -m serving.launcher stop

`/ping` answers Healthy before the model is loaded (and while workers crash-loop), so
readiness here means: the management API lists a READY worker for the model, then an actual
POST /predictions/<model> answers 200 with a valid Prediction. Everything TorchServe writes
(pid file, key file, temp dirs) goes under the state dir, logs under the log dir.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from handlers.constants import MODEL_NAME
from handlers.schemas import Prediction
from handlers.torchserve import is_ready, list_workers, worker_statuses
from serving.settings import ServeSettings, read_keys

PID_FILE = ".model_server.pid"


class LaunchError(RuntimeError):
    pass


def _dirs(s: ServeSettings) -> dict[str, Path]:
    return {"tmp": s.state_dir / "tmp", "jtmp": s.state_dir / "jtmp", "keys": s.key_file.parent,
            "cwd": s.state_dir / "cwd", "logs": s.log_dir}


def _env(s: ServeSettings) -> dict[str, str]:
    d = _dirs(s)
    bin_dir = str(Path(sys.executable).parent)
    # Separate TMPDIR/TEMP keep the pid file and worker sockets apart from any other instance.
    return {**os.environ, "TMPDIR": str(d["tmp"]), "TEMP": str(d["jtmp"]), "LOG_LOCATION": str(d["logs"]),
            "METRICS_LOCATION": str(d["logs"]), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


def server_pid(s: ServeSettings) -> int | None:
    path = _dirs(s)["tmp"] / PID_FILE
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def probe_image() -> bytes:
    """A real test radiograph when the data folder is there, else a generated gray PNG."""
    from training.sources import default_data_dir

    for path in sorted((default_data_dir() / "test" / "PNEUMONIA").glob("*.jp*g"))[:1]:
        return path.read_bytes()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def log_tail(s: ServeSettings, n: int = 40, name: str = "model_log.log") -> str:
    """The worker's last log lines (its tracebacks land in model_log.log), without the log prefix."""
    path = s.log_dir / name
    lines = path.read_text(errors="replace").splitlines()[-n:] if path.is_file() else [f"(no {name})"]
    return "\n".join(line.split("MODEL_LOG - ", 1)[-1] for line in lines)


def worker_deaths(s: ServeSettings) -> int:
    path = s.log_dir / "model_log.log"
    return path.read_text(errors="replace").count("Backend worker process died") if path.is_file() else 0


def start(s: ServeSettings, timeout: float = 240) -> None:
    s = s.resolved()
    mar = s.model_store / f"{MODEL_NAME}.mar"
    if not mar.is_file():
        raise LaunchError(f"{mar} not found: run `make train export archive` first")
    if server_pid(s):
        raise LaunchError(f"TorchServe already runs from {s.state_dir} (pid {server_pid(s)}): `make stop` first")
    busy = [p for p in s.ports() if _port_open(p)]
    if busy:
        raise LaunchError(f"ports {busy} are already in use on 127.0.0.1")
    for d in _dirs(s).values():
        d.mkdir(parents=True, exist_ok=True)
    s.key_file.unlink(missing_ok=True)
    config = s.state_dir / "config.properties"
    config.write_text(s.properties())
    with open(s.log_dir / "torchserve.out", "ab") as out:
        proc = subprocess.run([sys.executable, "-m", "ts.model_server", "--start", "--ncs", "--ts-config",
                               str(config), "--model-store", str(s.model_store)],
                              cwd=_dirs(s)["cwd"], env=_env(s), stdout=out, stderr=subprocess.STDOUT, timeout=60)
    if proc.returncode != 0:
        raise LaunchError(f"torchserve --start exited {proc.returncode}; see {s.log_dir / 'torchserve.out'}")
    wait_ready(s, timeout)


def wait_ready(s: ServeSettings, timeout: float = 240) -> Prediction:
    """Block until a worker is READY and a real prediction answers 200; raise with the log tail if not."""
    s = s.resolved()
    t0 = time.monotonic()
    deaths0 = worker_deaths(s)
    status = "no answer yet"
    while time.monotonic() < t0 + timeout:
        time.sleep(0.5)
        if not server_pid(s) and time.monotonic() > t0 + 10:
            raise LaunchError(f"TorchServe exited during start-up. Log tail:\n{log_tail(s, name='ts_log.log')}")
        if worker_deaths(s) - deaths0 >= 2:  # a crash loop: TorchServe would retry for ever
            raise LaunchError(f"the model's worker keeps dying. Worker log tail:\n{log_tail(s)}")
        if not s.key_file.is_file():
            continue
        keys = read_keys(s.key_file)
        try:
            workers = list_workers(s.management_url, keys["management"], timeout=5)
        except OSError:
            continue
        status = worker_statuses(workers)
        if is_ready(workers):
            r = httpx.post(f"{s.inference_url}/predictions/{MODEL_NAME}", content=probe_image(), timeout=60,
                           headers={"Authorization": f"Bearer {keys['inference']}"})
            if r.status_code == 200:
                return Prediction.model_validate(r.json())
            status = f"probe prediction answered {r.status_code}: {r.text[:200]}"
    raise LaunchError(f"model not ready after {timeout:.0f}s (workers: {status}). Log tail:\n{log_tail(s)}")


def stop(s: ServeSettings, timeout: float = 30) -> bool:
    """Stop the server started from this state dir; True if one was running."""
    s = s.resolved()
    pid = server_pid(s)
    if pid is None:
        return False
    # --stop deletes ./key_file.json in its cwd: run it where ours lies so no stale key stays.
    subprocess.run([sys.executable, "-m", "ts.model_server", "--stop"], cwd=s.key_file.parent, env=_env(s),
                   capture_output=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server_pid(s):
        time.sleep(0.2)
    if server_pid(s):
        os.kill(pid, signal.SIGKILL)
    s.key_file.unlink(missing_ok=True)
    return True


def status(s: ServeSettings) -> str:
    s = s.resolved()
    pid = server_pid(s)
    if not pid:
        return "stopped"
    keys = read_keys(s.key_file) if s.key_file.is_file() else {}
    try:
        listed = list_workers(s.management_url, keys.get("management"), timeout=5)
        workers = [f"{w['id']}:{w['status']}" for w in listed]
    except (OSError, KeyError):
        workers = []
    return f"running (pid {pid}) at {s.inference_url}; workers {workers or 'unknown'}; key file {s.key_file}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status"])
    for name in ("inference_port", "management_port", "metrics_port", "grpc_inference_port",
                 "grpc_management_port", "initial_worker_port"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--model-store", type=Path)
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--log-dir", type=Path)
    p.add_argument("--timeout", type=float, default=240)
    ns = p.parse_args(argv)
    s = ServeSettings(**{k: v for k, v in vars(ns).items() if v is not None and k not in ("command", "timeout")})
    try:
        if ns.command == "start":
            start(s, ns.timeout)
            r = s.resolved()
            print(f"TorchServe ready: POST {r.inference_url}/predictions/{MODEL_NAME} "
                  f"(bearer token: 'inference' key in {r.key_file}); logs in {r.log_dir}")
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
