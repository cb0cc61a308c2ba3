"""The supervisor: runs the nginx gateway and TorchServe, restarts either when it dies, drains on stop.

One process per state dir (`python -m serving.launcher supervise`, detached by `launcher start`,
in the foreground in the container). It

- renders TorchServe's config.properties and log4j2.xml and the gateway's nginx.conf;
- starts TorchServe (`ts.model_server --foreground`, in its own process group so a stop reaches
  the JVM too) and restarts it with exponential back-off (1 s doubling to 30 s, reset after a
  minute up) whenever it exits: an exhausted heap (-XX:+ExitOnOutOfMemoryError), a crash, a kill;
- re-renders nginx.conf and reloads nginx (SIGHUP: graceful, in-flight requests finish) when
  TorchServe's internal key changes (each TorchServe start) or the token file changes;
- on SIGTERM/SIGINT: SIGQUIT to nginx, which stops accepting and lets every in-flight request
  finish (drain_timeout_s at most), then stops TorchServe.

Every pid file holds the pid and the process's start time and command line; nothing is ever
signalled unless the live process still matches (a reused pid is a stranger).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from handlers.constants import TOKEN_FILE_ENV
from serving import gateway
from serving.settings import ServeSettings, read_keys

log = logging.getLogger("xray.supervisor")

SUPERVISOR_PID = "supervisor.json"
CHILDREN_PID = "children.json"  # the gateway's and TorchServe's process groups, for a last-resort kill
STATE_FILE = "supervisor_state.json"  # restarts and the last exit, for `status` and make chaos
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0


@dataclass(frozen=True)
class Identity:
    """A process as it was when its pid file was written: reused pids do not match."""

    pid: int
    create_time: float
    cmdline: list[str]

    @classmethod
    def of(cls, pid: int) -> Identity:
        p = psutil.Process(pid)
        return cls(pid, p.create_time(), p.cmdline())

    def alive(self) -> bool:
        """True only when a process with this pid exists AND is the same one (start time, command)."""
        try:
            p = psutil.Process(self.pid)
            return (abs(p.create_time() - self.create_time) < 0.05 and p.cmdline() == self.cmdline
                    and p.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def signal(self, sig: int) -> bool:
        """Send sig only if the process is still this one; True when sent."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "create_time": self.create_time, "cmdline": self.cmdline}))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> Identity | None:
        """The recorded process if it still runs as recorded; None (and the stale file removed) if not."""
        try:
            raw = json.loads(path.read_text())
            ident = cls(int(raw["pid"]), float(raw["create_time"]), list(raw["cmdline"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if ident.alive():
            return ident
        path.unlink(missing_ok=True)
        return None


def supervisor_identity(s: ServeSettings) -> Identity | None:
    return Identity.read(s.run_dir / SUPERVISOR_PID)


def read_state(s: ServeSettings) -> dict:
    try:
        return json.loads((s.run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {"torchserve_starts": 0, "gateway_starts": 0}


def kill_children(s: ServeSettings) -> int:
    """SIGKILL the process groups of a supervisor that would not stop, if they are still ours."""
    try:
        groups = [Identity(int(g["pid"]), float(g["create_time"]), list(g["cmdline"]))
                  for g in json.loads((s.run_dir / CHILDREN_PID).read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    killed = 0
    for ident in groups:
        if ident.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ident.pid, signal.SIGKILL)  # each child leads its own group (process_group=0)
                killed += 1
    return killed


def nginx_binary() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError("nginx not found: run `make setup` (apt-get install nginx-light)")


def nginx_version(nginx: str) -> tuple[int, ...]:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def prepare_dirs(s: ServeSettings) -> None:
    for d in (s.state_dir, s.run_dir, s.key_file.parent, s.ts_key_file.parent, s.state_dir / "tmp",
              s.state_dir / "jtmp", s.log_dir):
        d.mkdir(parents=True, exist_ok=True)
    # Sockets, keys and TorchServe's temp dirs (worker sockets, the extracted model): nobody but
    # this user may reach them. We made these, so we own them.
    for d in (s.run_dir, s.key_file.parent, s.ts_key_file.parent, s.state_dir / "tmp", s.state_dir / "jtmp"):
        d.chmod(0o700)
    # The state dir itself may be a mount point owned by root (a Kubernetes emptyDir: root:fsGroup,
    # 2777; a docker --tmpfs: root, the mode of the image's directory), which only root may chmod.
    # What it holds is private anyway (above).
    if s.state_dir.stat().st_uid == os.geteuid():
        s.state_dir.chmod(0o700)


def ts_env(s: ServeSettings) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    # Separate TMPDIR/TEMP keep the pid file and worker sockets apart from any other instance.
    return {**os.environ, "TMPDIR": str(s.state_dir / "tmp"), "TEMP": str(s.state_dir / "jtmp"),
            "LOG_LOCATION": str(s.log_dir), "METRICS_LOCATION": str(s.log_dir),
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


class Supervisor:
    def __init__(self, s: ServeSettings) -> None:
        self.s = s.resolved()
        self.token_file = self.s.token_file or (Path(os.environ[TOKEN_FILE_ENV]) if os.environ.get(TOKEN_FILE_ENV)
                                                else None)
        self.ts: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None
        self.stopping = False
        self.tokens: list[str] = []
        self.token_stamp: tuple[float, int] | None = None
        self.ts_key = ""
        self.state = {"torchserve_starts": 0, "gateway_starts": 0, "last_exit": None, "since": time.time()}

    # --- the pieces ------------------------------------------------------------------------
    def _save_children(self) -> None:
        groups = []
        for child in (self.nginx, self.ts):
            if child is not None and child.poll() is None:
                with contextlib.suppress(psutil.Error):
                    groups.append(dataclasses.asdict(Identity.of(child.pid)))
        (self.s.run_dir / CHILDREN_PID).write_text(json.dumps(groups))

    def _save_state(self) -> None:
        tmp = self.s.run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.s.run_dir / STATE_FILE)

    def load_tokens(self) -> bool:
        """Read the token file when it changed (True then); generate a token when there is none."""
        if self.token_file is None:
            if not self.tokens:
                self.tokens = [gateway.generate_token()]
                gateway.write_key_file(self.s.key_file, self.tokens[0])
                return True
            return False
        try:
            st = self.token_file.stat()
        except OSError as exc:
            if not self.tokens:
                raise SystemExit(f"token file {self.token_file}: {exc}") from None
            return False
        stamp = (st.st_mtime, st.st_size)
        if stamp == self.token_stamp:
            return False
        self.token_stamp = stamp
        try:
            tokens = gateway.read_tokens(self.token_file)
        except (OSError, ValueError) as exc:
            if not self.tokens:
                raise SystemExit(str(exc)) from None
            log.error("token file unchanged in effect, the new one is refused: %s", exc)
            return False
        self.tokens = tokens
        gateway.write_key_file(self.s.key_file, tokens[0])  # local clients read the first token
        log.info("token file read: %d token(s)", len(tokens))
        return True

    def read_ts_key(self) -> bool:
        try:
            key = read_keys(self.s.ts_key_file, attempts=3)["inference"]
        except (OSError, ValueError, KeyError):
            return False
        if key == self.ts_key:
            return False
        self.ts_key = key
        return True

    def write_gateway_config(self) -> Path:
        conf = self.s.run_dir / "nginx.conf"
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(gateway.render(self.s, self.tokens, self.ts_key or "none-yet"))
        tmp.chmod(0o600)
        tmp.replace(conf)
        return conf

    def start_gateway(self) -> None:
        conf = self.write_gateway_config()
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.s.run_dir / sub).mkdir(exist_ok=True)
        out = open(self.s.log_dir / "gateway.out", "ab")  # noqa: SIM115 (the child keeps it)
        nginx = nginx_binary()
        # -e (nginx >= 1.19.5; Ubuntu 22.04 has 1.18) keeps a non-root nginx off /var/log/nginx from the start.
        early_log = ["-e", str(self.s.log_dir / "gateway_error.log")] if nginx_version(nginx) >= (1, 19, 5) else []
        self.nginx = subprocess.Popen([nginx, "-p", str(self.s.run_dir), *early_log, "-c", str(conf),
                                       "-g", "daemon off;"],
                                      stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      process_group=0)  # a group signal to us (tini -g) must not cut the drain
        out.close()
        self.state["gateway_starts"] += 1
        self._save_state()
        self._save_children()
        log.info("gateway (nginx pid %d) on %s and %s", self.nginx.pid, self.s.inference_url, self.s.metrics_url)

    def reload_gateway(self) -> None:
        self.write_gateway_config()
        if self.nginx and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGHUP)

    def start_torchserve(self) -> None:
        s = self.s
        config, log4j = s.run_dir / "config.properties", s.run_dir / "log4j2.xml"
        config.write_text(s.properties())
        log4j.write_text(s.log4j2())
        for api in ("inference", "management", "metrics"):
            s.socket(api).unlink(missing_ok=True)  # a socket file left by a crash blocks the bind
        (s.state_dir / "tmp" / ".model_server.pid").unlink(missing_ok=True)
        s.ts_key_file.unlink(missing_ok=True)
        _rotate(s.log_dir / "torchserve.out", s.log_max_mb * 2**20)
        out = open(s.log_dir / "torchserve.out", "ab")  # noqa: SIM115 (the child keeps it)
        self.ts = subprocess.Popen(
            [sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs", "--ts-config", str(config),
             "--model-store", str(s.model_store), "--log-config", str(log4j)],
            cwd=s.ts_key_file.parent, env=ts_env(s), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            process_group=0)
        out.close()
        self.state["torchserve_starts"] += 1
        self.ts_started = time.monotonic()
        self._save_state()
        self._save_children()
        log.info("TorchServe started (pid %d, start %d)", self.ts.pid, self.state["torchserve_starts"])

    def stop_torchserve(self, timeout: float) -> None:
        if self.ts is None or self.ts.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.ts.pid, signal.SIGTERM)  # our child's group: the wrapper and its JVM
        try:
            self.ts.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("TorchServe did not stop in %.0f s: SIGKILL", timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.ts.pid, signal.SIGKILL)  # whatever of the group is left (the JVM, workers)
        self.ts.wait()

    # --- the loop -----------------------------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(0.1)

    def run(self) -> int:
        s = self.s
        prepare_dirs(s)
        pid_file = s.run_dir / SUPERVISOR_PID
        if (other := Identity.read(pid_file)) is not None and other.pid != os.getpid():
            log.error("another supervisor (pid %d) runs from %s", other.pid, s.state_dir)
            return 1
        Identity.of(os.getpid()).write(pid_file)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        backoff = 1.0
        try:
            self.load_tokens()
            self.start_torchserve()
            self.start_gateway()
            while not self.stopping:
                time.sleep(0.2)
                if self.read_ts_key() or self.load_tokens():
                    self.reload_gateway()
                if self.nginx is not None and self.nginx.poll() is not None and not self.stopping:
                    log.error("gateway exited %s: starting it again", self.nginx.returncode)
                    self._sleep(1.0)
                    self.start_gateway()
                if self.ts is not None and self.ts.poll() is not None and not self.stopping:
                    up = time.monotonic() - self.ts_started
                    backoff = 1.0 if up > STABLE_S else backoff
                    self.state["last_exit"] = {"code": self.ts.returncode, "at": time.time(), "up_s": round(up, 1)}
                    log.error("TorchServe exited %s after %.0f s: restarting in %.0f s", self.ts.returncode, up,
                              backoff)
                    self._save_state()
                    with contextlib.suppress(ProcessLookupError):  # orphaned workers of the dead server
                        os.killpg(self.ts.pid, signal.SIGKILL)
                    self._sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    if not self.stopping:
                        self.start_torchserve()
        finally:
            self.shutdown()
            pid_file.unlink(missing_ok=True)
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d: draining", signum)
        self.stopping = True

    def shutdown(self) -> None:
        """Drain: nginx stops accepting and finishes in-flight requests, then TorchServe stops."""
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)
            try:
                self.nginx.wait(self.s.drain_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("requests still in flight after %d s: closing them", self.s.drain_timeout_s)
                self.nginx.terminate()
                self.nginx.wait()
        self.stop_torchserve(self.s.drain_timeout_s)
        if self.token_file is None:
            self.s.key_file.unlink(missing_ok=True)  # a generated token dies with its server
        self.s.ts_key_file.unlink(missing_ok=True)


def _rotate(path: Path, max_bytes: int) -> None:
    """Keep one previous copy of a stdout log once it passes max_bytes (checked at each start)."""
    if path.is_file() and path.stat().st_size > max_bytes:
        path.replace(path.with_suffix(path.suffix + ".1"))


def main(s: ServeSettings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Supervisor(s).run()
