"""Where a live server's time goes, per role, while it is under load: the evidence behind `make bench`'s CPU split.

- Python workers: py-spy (sampling, no restart, no code change) records every worker process;
  the samples are folded into TorchServe's and the handler's stages (model, image decode, request
  parsing and answer, metrics and logging, TorchServe's socket protocol) and the top functions.
  py-spy counts a thread that is running or waiting for a core (not one blocked in a read), so on
  a busy host the shares are of busy time, not strictly of CPU time.
- Java frontend: the JVM's own flight recorder (jcmd JFR.start; Java code only, sampled every
  2 ms), folded into TorchServe's and netty's parts: HTTP decoding, the inference API, encoding
  requests for the workers, reading the workers' stdout (metrics, logs), answering, log4j.
- Each role's CPU split by thread or process comes from serving.proccpu beside these.

Both tools are optional: without py-spy (or without ptrace rights) or without a JDK's jcmd/jfr the
section says why and the rest of the bench stands. A library.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# (stage, pattern on a py-spy frame "function (file:line)"); the first stage whose pattern
# matches any frame of a sample, walking from the innermost frame out, takes the sample.
WORKER_STAGES = (
    ("model (onnxruntime / torch)", r"^(Session\.run|OnnxRunner\.run|TorchScriptRunner\.run) "),
    ("metrics and logging lines", r"[(/](logging/__init__\.py|ts/metrics/)"),
    ("image decode + resize (handlers.preprocess)", r"\(handlers/preprocess\.py"),
    ("request parsing (handlers.request)", r"\(handlers/(request|multipart|trust)\.py"),
    ("answer JSON + status (postprocess)", r"^XrayHandler\.(postprocess|_answer) "),
    ("TorchServe protocol: read a batch", r"^(retrieve_msg|_retrieve_\w+|BufferedReads\.__call__) "),
    ("TorchServe protocol: encode answers", r"^create_predict_response "),
    ("TorchServe: batch to handler data", r"^Service\.retrieve_data_for_inference "),
    ("TorchServe worker loop (socket send)", r"^TorchModelServiceWorker\.handle_connection "),
)
# (part, pattern on a JFR frame "package.Class.method"), matched like WORKER_STAGES.
FRONTEND_PARTS = (
    ("log4j (log lines)", r"^org\.apache\.logging\."),
    ("worker stdout reader (metric lines, model log)", r"WorkerLifeCycle\$ReaderThread"),
    ("encode requests for the workers", r"ModelRequestEncoder|\.codec\.ModelResponseDecoder"),
    ("answer clients (RestJob, netty write)", r"RestJob\.response|BatchAggregator\.sendResponse"),
    ("batching (BatchAggregator, job queue)", r"BatchAggregator\.|Model\.pollBatch|WorkerThread\.run"),
    ("inference API (auth, routing, job)", r"org\.pytorch\.serve\.http\."),
    ("HTTP decode (netty)", r"io\.netty\.handler\.codec\.http\."),
    ("netty I/O (epoll, buffers)", r"^io\.netty\."),
)


def _fold(samples: Iterable[tuple[list[str], int]], stages: tuple[tuple[str, str], ...],
          top: int) -> dict[str, Any]:
    """(frames innermost first, count) -> share of samples per stage, and the top innermost frames."""
    compiled = [(name, re.compile(p)) for name, p in stages]
    by_stage: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, n in samples:
        total += n
        leaf[frames[0] if frames else "?"] += n
        stage = next((name for f in frames for name, rx in compiled if rx.search(f)), "other")
        by_stage[stage] += n
    if not total:
        return {"samples": 0, "stages": {}, "top": {}}
    pct = {name: round(100 * by_stage[name] / total, 1) for name, _ in (*stages, ("other", ""))
           if by_stage[name]}
    return {"samples": total, "stages": pct,
            "top": {f: round(100 * n / total, 1) for f, n in leaf.most_common(top)}}


def parse_pyspy_raw(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output, one 'outer;...;inner COUNT' a line -> (frames innermost
    first, with site-packages and line numbers cut from the file part, count)."""
    out = []
    for line in text.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [re.sub(r"\((?:.*/site-packages/|.*/(?=handlers/))?([^:)]*)(?::\d+)?\)", r"(\1)", f)
                  for f in stack.split(";")]
        out.append((frames[::-1], int(n)))
    return out


def fold_workers(samples: list[tuple[list[str], int]], top: int = 10) -> dict[str, Any]:
    return _fold(samples, WORKER_STAGES, top)


def py_spy(pids: list[int], seconds: float, rate: int = 200) -> dict[str, Any]:
    """py-spy on every worker pid at once for `seconds`; their samples folded together."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).is_file():
        return {"error": "py-spy is not installed (pip install py-spy; `make setup` does)"}
    if not pids:
        return {"error": "no worker process found"}
    with tempfile.TemporaryDirectory() as tmp:
        procs, outs = [], []
        for pid in pids:
            outs.append(Path(tmp) / f"{pid}.txt")
            procs.append(subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
                 "--format", "raw", "--nonblocking", "--output", str(outs[-1])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errors = [p.communicate(timeout=seconds + 60)[1] for p in procs]
        samples = [s for out in outs if out.is_file() for s in parse_pyspy_raw(out.read_text())]
    if not samples:
        return {"error": "py-spy recorded nothing: " + " ".join(e.strip().splitlines()[-1] for e in errors if e.strip())
                + " (it needs ptrace rights over the workers)"}
    return {"tool": f"py-spy, {rate} Hz, {len(pids)} worker(s)"} | fold_workers(samples)


def parse_jfr_samples(text: str) -> list[tuple[list[str], int]]:
    """`jfr print --events jdk.ExecutionSample` -> (frames innermost first, 1) per sample, the
    sampled thread's name (digits folded) appended as the outermost frame 'thread:NAME'."""
    out = []
    for thread, stack in re.findall(r'sampledThread = "([^"]*)".*?stackTrace = \[(.*?)\n\s*\]', text, re.S):
        frames = [re.sub(r"\(.*", "", f.strip()) for f in stack.strip().splitlines()]
        frames = [f for f in frames if f and f != "..."]
        out.append(([*frames, "thread:" + re.sub(r"\d+", "N", thread)], 1))
    return out


def fold_frontend(samples: list[tuple[list[str], int]], top: int = 10) -> dict[str, Any]:
    folded = _fold(samples, FRONTEND_PARTS, top)
    threads: collections.Counter[str] = collections.Counter()
    for frames, n in samples:
        threads[frames[-1].removeprefix("thread:")] += n
    total = sum(threads.values()) or 1
    folded["threads"] = {t: round(100 * n / total, 1) for t, n in threads.most_common(6)}
    return folded


def jfr(pid: int | None, seconds: float) -> dict[str, Any]:
    """The JVM's flight recorder on the frontend for `seconds`: execution samples every 2 ms, folded."""
    jcmd, jfr_tool = shutil.which("jcmd"), shutil.which("jfr")
    if not (jcmd and jfr_tool):
        return {"error": "jcmd/jfr not found (they come with a JDK, not with a bare JRE)"}
    if not pid:
        return {"error": "no frontend process found"}
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "frontend.jfr"
        start = subprocess.run([jcmd, str(pid), "JFR.start", "name=xraybench", f"duration={max(1, round(seconds))}s",
                                f"filename={rec}", "settings=profile", "jdk.ExecutionSample#period=2ms"],
                               capture_output=True, text=True, timeout=60)
        if start.returncode:
            return {"error": f"jcmd JFR.start failed: {(start.stdout + start.stderr).strip()[-300:]}"}
        for _ in range(int(seconds * 10) + 300):  # the JVM writes the file when the recording ends
            if rec.is_file() and rec.stat().st_size:
                break
            subprocess.run(["sleep", "0.1"], check=False)
        printed = subprocess.run([jfr_tool, "print", "--stack-depth", "48", "--events", "jdk.ExecutionSample",
                                  str(rec)], capture_output=True, text=True, timeout=120)
    samples = parse_jfr_samples(printed.stdout)
    if not samples:
        return {"error": f"JFR recorded no samples: {printed.stderr.strip()[-300:]}"}
    return {"tool": "JDK flight recorder, Java samples every 2 ms"} | fold_frontend(samples)


def markdown(profile: dict[str, Any]) -> list[str]:
    """The bench report's profile section."""
    lines = ["## Profile: where each role's time goes", "",
             f"Recorded during {profile.get('seconds', 0):g} s of wrk at concurrency {profile.get('concurrency')} "
             "after the measured levels (the profilers' own cost never enters the figures above). "
             "CPU ms per request by role, from /proc over the same window: "
             + ", ".join(f"{k} {v}" for k, v in (profile.get("server_cpu_ms") or {}).items() if v) + ".", ""]
    for title, key, unit in (("Python workers", "workers", "busy samples"),
                             ("Java frontend", "frontend", "Java samples")):
        part = profile.get(key) or {}
        if "error" in part:
            lines += [f"**{title}**: not profiled ({part['error']}).", ""]
            continue
        lines += [f"**{title}** ({part.get('tool')}, {part.get('samples')} samples): share of {unit} by stage",
                  "", "| stage | % |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(part["stages"].items(), key=lambda kv: -kv[1])]
        lines += ["", "Top innermost frames: " + "; ".join(f"`{k}` {v} %" for k, v in part["top"].items()) + "."]
        if part.get("threads"):
            lines += ["", "By thread: " + ", ".join(f"{k} {v} %" for k, v in part["threads"].items()) + "."]
        lines.append("")
    threads = profile.get("frontend_threads_ms")
    if threads:
        lines += ["Frontend CPU by JVM thread group (ms/request, /proc): "
                  + ", ".join(f"{k} {v}" for k, v in threads.items()) + ".", ""]
    return lines
