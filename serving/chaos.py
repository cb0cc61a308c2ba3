"""make chaos: issue 12's attacks replayed against a live server, with good traffic beside each.

    python -m serving.chaos [--url http://127.0.0.1:8080] [--state-dir .serve] [--data-dir DIR]
                            [--out reports/chaos.md] [--quick]

For every case, eight threads send real test radiographs the whole time ("good requests") while
the attack runs; then the server must answer a good request again ("recovery"). The table: the
case, the status codes the attack saw, good requests answered 200 / sent, workers restarted (new
worker pids + TorchServe restarts), recovery time. Heavy cases (thousands of connections,
hundreds of large bodies, minutes of overload) live here, not in `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from handlers import constants as C
from serving import launcher, supervisor, trust_report
from serving.client import XrayClient
from serving.load import load_bodies, wrk_level
from serving.settings import ServeSettings
from training.sources import default_data_dir, list_image_folder


class Chaos:
    def __init__(self, s: ServeSettings, url: str, bodies: list[bytes], quick: bool) -> None:
        self.s, self.url, self.bodies, self.quick = s, url.rstrip("/"), bodies, quick
        self.token = launcher.client_token(s)
        self.rows: list[dict] = []

    def post(self, body: bytes, path: str = "predictions", timeout: float = 60, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}  # type: ignore[dict-item]
        return httpx.post(f"{self.url}/{path}/xray", content=None if "files" in kw else body, headers=headers,
                          timeout=timeout, **kw)

    def safe_post(self, body: bytes, **kw: object) -> int:
        try:
            return self.post(body, **kw).status_code
        except httpx.HTTPError as exc:
            return {httpx.ConnectError: -1, httpx.ReadError: -2}.get(type(exc), -3)

    def worker_pids(self) -> set[int]:
        try:
            return {int(w["pid"]) for w in launcher.list_workers(self.s, 5)}
        except (httpx.HTTPError, OSError, KeyError, ValueError):
            return set()

    def case(self, name: str, attack: Callable[[], list[int]], note: str = "") -> None:
        print(f"- {name} ...", flush=True)
        pids0, starts0 = self.worker_pids(), supervisor.read_state(self.s).get("torchserve_starts", 0)
        good: list[int] = []
        stop = threading.Event()

        def load(k: int) -> None:
            i = k
            while not stop.is_set():
                good.append(self.safe_post(self.bodies[i % len(self.bodies)]))
                i += 8

        threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(8)]
        for t in threads:
            t.start()
        t_attack = time.monotonic()
        try:
            codes = attack()
        except Exception as exc:  # the table says so; the next case still runs
            codes, note = [], f"attack failed: {type(exc).__name__}: {exc}"
        attack_s = time.monotonic() - t_attack
        stop.set()
        for t in threads:
            t.join()
        t0 = time.monotonic()
        while self.safe_post(self.bodies[0]) != 200 and time.monotonic() - t0 < 180:
            time.sleep(0.2)
        recovery = time.monotonic() - t0
        while len(self.worker_pids()) < len(pids0) and time.monotonic() - t0 < 180:
            time.sleep(0.2)
        pids1, starts1 = self.worker_pids(), supervisor.read_state(self.s).get("torchserve_starts", 0)
        restarted = len(pids0 - pids1) if starts1 == starts0 else f"server x{starts1 - starts0}"
        row = {"case": name, "codes": dict(sorted(Counter(codes).items())), "good_ok": good.count(200),
               "good": len(good), "good_codes": dict(sorted(Counter(good).items())), "restarted": restarted,
               "attack_s": round(attack_s, 1), "recovery_s": round(recovery, 2), "note": note}
        print(f"  {row}", flush=True)
        self.rows.append(row)

    # --- the attacks (issue 12's list) --------------------------------------------------------
    def big_bodies(self, n: int, size: int) -> list[int]:
        body = b"\x89PNG\r\n\x1a\n" + os.urandom(1024) * (size // 1024)
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: self.safe_post(body, headers={"Content-Type": "image/png"}), range(n)))

    def bad_targets(self) -> list[int]:
        def one(i: int) -> int:
            if i % 4:
                return self.safe_post(self.bodies[i % len(self.bodies)])
            return self.safe_post(b"", path="explanations", files={"data": ("x.jpeg", self.bodies[0], "image/jpeg"),
                                                                  "target": ("t", b"\xff\xfe", "text/plain")})
        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(one, range(100 if self.quick else 400)))

    def management(self) -> list[int]:
        codes = []
        for url in (self.url, self.s.metrics_url):
            for q in ("min_worker=0", "min_worker=50"):
                r = httpx.put(f"{url}/models/xray?{q}", headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
                codes.append(r.status_code)
        return codes

    def exif(self, images: list[Path]) -> tuple[list[int], str]:
        flips, codes = 0, []
        for path in images:
            upright = self.post(path.read_bytes())
            im = Image.open(path)
            exif = Image.Exif()
            exif[0x0112] = 6  # "rotate 90 CW to display": the pixels are stored turned the other way
            buf = io.BytesIO()
            im.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
            rotated = self.post(buf.getvalue())
            codes += [upright.status_code, rotated.status_code]
            if upright.status_code == rotated.status_code == 200:
                flips += upright.json()["label"] != rotated.json()["label"]
        return codes, f"{flips} of {len(images)} labels flipped by EXIF orientation 6"

    def idle_connections(self) -> tuple[list[int], str]:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        n = min(2000 if self.quick else 20000, hard - 200)
        socks = []
        try:
            for _ in range(n):
                try:
                    socks.append(socket.create_connection(("127.0.0.1", self.s.inference_port), timeout=2))
                except OSError:
                    break
            t0 = time.monotonic()
            code = self.safe_post(self.bodies[0])
            first = time.monotonic() - t0
            # slow clients: headers, then a byte now and then
            slow = []
            for _ in range(50):
                c = socket.create_connection(("127.0.0.1", self.s.inference_port))
                c.sendall(f"POST /predictions/xray HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.token}\r\n"
                          "Content-Length: 100000\r\n\r\n".encode())
                slow.append(c)
            time.sleep(self.s.client_timeout_s + 3)
            cut = 0
            for c in slow:
                c.settimeout(1)
                try:
                    cut += c.recv(100) in (b"",) or True
                except (ConnectionResetError, TimeoutError):
                    cut += 0 if isinstance(sys.exc_info()[1], TimeoutError) else 1
                c.close()
            return [code], (f"{len(socks)} idle connections open: a new client answered {code} in {first:.2f} s; "
                            f"{cut}/50 slow-body clients cut after {self.s.client_timeout_s} s")
        finally:
            for c in socks:
                c.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def killed_workers(self, images: list[tuple[str, Path]]) -> tuple[list[int], str]:
        async def run() -> list:
            async with XrayClient(self.url, token=self.token, concurrency=16) as c:
                task = asyncio.create_task(c.predict_many(images, progress=False))
                await asyncio.sleep(2.0)
                for pid in self.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                return await task

        results = asyncio.run(run())
        # A 422 not_chest_xray from the OOD gate is an answer, not a loss.
        refused = [r.name for r in results if trust_report.is_ood_refusal(r)]
        lost = [r.name for r in results if not r.ok and r.name not in refused]
        ok = len(results) - len(lost) - len(refused)
        retried = sum(r.attempts > 1 for r in results)
        return [200] * ok + [422] * len(refused), (
            f"both workers killed: {ok + len(refused)}/{len(results)} answered ({len(refused)} of them 422 "
            f"not_chest_xray), {len(lost)} lost, {retried} retried")

    def malformed_multipart(self) -> list[int]:
        form = "multipart/form-data; boundary=XX"
        bodies = [(b'--XX\r\nContent-Disposition: form-data; name=""\r\n\r\nabc\r\n--XX--\r\n', form),
                  (b'--XX\r\nContent-Disposition: form-data; name="data"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
                   b"aGVsbG8=\r\n--XX--\r\n", form),
                  (b'--XX\r\nContent-Disposition: form-data; name="data"\r\n\r\nabc\r\n--XX--\r\n',
                   form + "; charset=x-unknown"),
                  (b"--XX\r\ngarbage", form), (b"abc", "multipart/form-data")]
        return [self.safe_post(b, headers={"Content-Type": ct}) for b, ct in bodies for _ in range(5)]

    def log_growth(self) -> tuple[list[int], str]:
        out = self.s.log_dir / "torchserve.out"
        before = out.stat().st_size if out.is_file() else 0
        n = 1000 if self.quick else 5000
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda i: self.safe_post(self.bodies[i % len(self.bodies)]), range(n)))
        grown = (out.stat().st_size if out.is_file() else 0) - before
        logs = sum(p.stat().st_size for p in self.s.log_dir.glob("*") if p.is_file())
        return codes, f"torchserve.out +{grown} B over {n} requests; all logs {logs / 2**20:.1f} MiB (bounded)"

    def stale_pid(self, tmp: Path) -> tuple[list[int], str]:
        stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            s = ServeSettings(state_dir=tmp / "state", log_dir=tmp / "logs").resolved()
            s.run_dir.mkdir(parents=True, exist_ok=True)
            real = supervisor.Identity.of(stranger.pid)
            supervisor.Identity(stranger.pid, real.create_time - 50, real.cmdline).write(s.run_dir /
                                                                                         supervisor.SUPERVISOR_PID)
            stopped = launcher.stop(s)
            time.sleep(0.3)
            return [], f"stop signalled the stranger: {stopped}; stranger alive: {stranger.poll() is None}"
        finally:
            stranger.kill()

    def overload(self) -> tuple[list[int], str]:
        import shutil

        if not shutil.which("wrk"):
            return [], "wrk not installed (make bench installs it): skipped"
        seconds = 5 if self.quick else 15
        best = wrk_level(f"{self.url}/predictions/xray", self.token, self.bodies, 64, seconds)
        over = wrk_level(f"{self.url}/predictions/xray", self.token, self.bodies, 800, seconds)
        r = None
        with ThreadPoolExecutor(1) as pool:  # one 503 sample under the overload, for its headers
            fut = pool.submit(wrk_level, f"{self.url}/predictions/xray", self.token, self.bodies, 800, 4)
            time.sleep(2)
            for _ in range(50):
                r = self.post(self.bodies[0])
                if r.status_code == 503:
                    break
            fut.result()
        sample = (f"; a 503 says '{r.json()['message'][:80]}' with Retry-After {r.headers.get('retry-after')}"
                  if r is not None and r.status_code == 503 else "")
        return [], (f"goodput {best['throughput_rps']:.0f} req/s at 64 connections, {over['throughput_rps']:.0f} "
                    f"at 800 ({over['errors']} of {over['requests']} shed){sample}")

    def run(self, data_dir: Path, tmp: Path) -> list[dict]:
        test = list_image_folder(data_dir, "test")
        exif_images = [p for p, _ in test[:: max(1, len(test) // 30)]][:30]
        evaluate_images = [(str(p), p) for p, _ in (test[:200] if self.quick else test)]
        self.case("1 15.9 MB bodies x 60 at once", lambda: self.big_bodies(60, 15_900_000))
        self.case("1 4 MB bodies x 200 at once", lambda: self.big_bodies(200, 4_000_000))
        self.case("2 explain with a non-UTF-8 target among predictions", self.bad_targets)
        self.case("3 management: PUT min_worker=0 / 50 with the token", self.management)
        self._noted("4 EXIF orientation 6 on 30 test images", lambda: self.exif(exif_images))
        self._noted("5 idle connections + slow bodies", self.idle_connections)
        self._noted("6 both workers killed during an evaluate run", lambda: self.killed_workers(evaluate_images))
        self.case("7 malformed multipart", self.malformed_multipart)
        self._noted("8 log growth", self.log_growth)
        self._noted("9 stale pid file of another process", lambda: self.stale_pid(tmp))
        self._noted("10 overload: 800 connections", self.overload)
        return self.rows

    def _noted(self, name: str, attack: Callable[[], tuple[list[int], str]]) -> None:
        holder: dict = {}

        def run() -> list[int]:
            codes, holder["note"] = attack()
            return codes

        self.case(name, run)
        self.rows[-1]["note"] = self.rows[-1]["note"] or holder.get("note", "")


def markdown(rows: list[dict]) -> str:
    lines = ["| case | status codes seen | good requests 200 / sent | workers restarted | recovery s | note |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        codes = ", ".join(f"{k}: {v}" for k, v in r["codes"].items()) or "-"
        lines.append(f"| {r['case']} | {codes} | {r['good_ok']} / {r['good']} | {r['restarted']} | "
                     f"{r['recovery_s']} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="default: the state dir's gateway")
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=C.REPORTS_DIR / "chaos.md")
    p.add_argument("--quick", action="store_true", help="fewer connections and requests")
    ns = p.parse_args(argv)
    s = ServeSettings(**({"state_dir": ns.state_dir} if ns.state_dir else {})).resolved()
    settings_file = s.run_dir / "settings.json"
    if settings_file.is_file():  # the live server's own settings (ports, limits)
        s = ServeSettings.model_validate_json(settings_file.read_text()).resolved()
    if launcher.server_pid(s) is None:
        print(f"error: no server runs from {s.state_dir}: `make serve` first", file=sys.stderr)
        return 1
    data_dir = ns.data_dir or default_data_dir()
    bodies = load_bodies(data_dir, 32)
    chaos = Chaos(s, ns.url or s.inference_url, bodies, ns.quick)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = chaos.run(data_dir, Path(tmp))
    table = markdown(rows)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
