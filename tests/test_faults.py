"""Load and faults against the live server: a 20-second soak, and a worker killed during evaluate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handlers.torchserve import READY
from serving.load import metric_sum
from serving.settings import ServeSettings
from tests.helpers import REPO, run_cli, workers

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_soak_20_seconds_at_concurrency_64(server: ServeSettings, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run_cli("serving.soak", "--seconds", "20", "--warmup", "8", "--concurrency", "64", "--url", server.inference_url,
            "--state-dir", str(server.state_dir),
            "--key-file", str(server.key_file), "--data-dir", str(data_dir), "--out", str(out),
            "--max-rss-growth", "0.10")
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["requests"] > 100
    assert report["rss_growth"] < 0.10
    print(f"soak: {report}")


def test_a_killed_worker_loses_no_image(server: ServeSettings, export_dir: Path, data_dir: Path,
                                        tmp_path: Path) -> None:
    before = workers(server)
    pid = before[0]["pid"]
    seen = metric_sum(server.metrics_url, "XrayRequests")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.evaluate", "--url", server.inference_url, "--key-file", str(server.key_file),
         "--data-dir", str(data_dir), "--expect", str(export_dir / "predictions_xraynet.json"),
         "--out-dir", str(tmp_path), "--concurrency", "16"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while metric_sum(server.metrics_url, "XrayRequests") < seen + 80 and time.monotonic() < deadline:
            time.sleep(0.1)  # evaluate is under way
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        def recovered() -> bool:  # every worker READY again, the killed one replaced
            now = workers(server)
            return len(now) == len(before) and all(w["status"] == READY and w["pid"] != pid for w in now)

        while not recovered():
            assert time.monotonic() - killed < 120, "TorchServe did not restart the worker"
            time.sleep(0.1)
        recovery = time.monotonic() - killed
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    report = json.loads((tmp_path / "evaluate.json").read_text())
    names = [p["file"] for p in report["predictions"]]
    assert report["answered"] == report["images"] == len(names) == len(set(names)), "an image lost or doubled"
    assert report["unanswered"] == []
    assert report["expect"]["compared"] == len(names) and report["expect"]["mismatches"] == []
    print(f"worker {pid} killed (of {len(before)}); all workers READY again after {recovery:.1f}s; "
          f"{report['retried_images']} images retried, {report['answered']}/{report['images']} answered once")
    assert recovery < 60
