"""CPU time of a running server's processes, split by role, from /proc (psutil).

The server is found from the launcher's root process (TorchServe's pid file, or a supervisor
in front of it) and everything below it, never by port: a gateway in front of TorchServe, the
Java frontend and the Python workers each get their share. CPU seconds per request stay
comparable on a shared, noisy machine where wall-clock throughput does not. A library.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil

ROLES = ("gateway", "frontend", "workers", "other")
Snapshot = dict[int, tuple[str, float]]  # pid -> (role, user + system CPU seconds)


def role_of(cmdline: list[str]) -> str:
    """The role of a server process from its command line: 'frontend' (TorchServe's JVM),
    'workers' (a Python model worker), 'gateway' (nginx or another proxy) or 'other'
    (launcher, supervisor, TorchServe's Python wrapper)."""
    if not cmdline:
        return "other"
    exe = Path(cmdline[0]).name
    joined = " ".join(cmdline)
    if exe == "java" or "org.pytorch.serve.ModelServer" in joined:
        return "frontend"
    if "model_service_worker" in joined:
        return "workers"
    if exe.startswith(("nginx", "envoy", "haproxy", "caddy")) or joined.startswith("nginx:"):
        return "gateway"
    return "other"


def process_tree(root_pid: int) -> list[psutil.Process]:
    """The root process and all its descendants (empty when the root is gone)."""
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def snapshot(root_pid: int) -> Snapshot:
    """Every process of the tree with its role and CPU seconds so far (user + system, own threads)."""
    out: Snapshot = {}
    for p in process_tree(root_pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = (role_of(p.cmdline()), t.user + t.system)
    return out


def delta(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds spent per role between two snapshots. A process that appeared in between
    (a restarted worker) counts from zero; one that vanished counts nothing after `before`."""
    spent = dict.fromkeys(ROLES, 0.0)
    for pid, (role, cpu) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        spent[role] += max(cpu - start, 0.0)
    return spent


def per_request_ms(spent_s: Mapping[str, float], requests: int) -> dict[str, float | None]:
    """CPU seconds per role -> CPU ms per request, per role and in total (None for no requests)."""
    out: dict[str, float | None] = {}
    for role in (*ROLES, "total"):
        value = sum(spent_s.values()) if role == "total" else spent_s.get(role, 0.0)
        out[role] = round(value * 1000 / requests, 3) if requests else None
    return out


def counts(snap: Snapshot) -> dict[str, int]:
    """How many processes each role has."""
    found = dict.fromkeys(ROLES, 0)
    for role, _ in snap.values():
        found[role] += 1
    return found


def self_cpu_s() -> float:
    """This process's user + system CPU seconds (all its threads)."""
    t = os.times()
    return t.user + t.system


def pids_cpu_s(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


ThreadSnapshot = dict[int, tuple[str, float]]  # tid -> (thread group, CPU seconds)


def thread_group(comm: str) -> str:
    """A thread's name (/proc comm, 15 characters at most) with its numbers folded, so the
    threads of one pool add up: 'epollEventLoopG' (netty), 'W-N-xray_N.' (TorchServe's
    per-worker threads), 'GC Thread#N', 'CN CompilerThre' (the JIT)."""
    return re.sub(r"\d+", "N", comm.strip())


def thread_snapshot(pids: Iterable[int]) -> ThreadSnapshot:
    """CPU seconds of every thread of these processes, by thread group (from /proc/PID/task)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: ThreadSnapshot = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                comm = (task / "comm").read_text()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                # utime and stime are fields 14 and 15 of stat; 3.. after the ')' of the name
                out[int(task.name)] = (thread_group(comm), (int(fields[11]) + int(fields[12])) / tick)
    return out


def pids_of(snap: Snapshot, role: str) -> list[int]:
    return [pid for pid, (r, _) in snap.items() if r == role]


def top_threads(before: ThreadSnapshot, after: ThreadSnapshot, requests: int, n: int = 8) -> dict[str, float]:
    """CPU ms per request of the busiest thread groups between two snapshots (the rest as 'rest')."""
    spent: dict[str, float] = {}
    for tid, (group, cpu) in after.items():
        spent[group] = spent.get(group, 0.0) + max(cpu - before.get(tid, (group, 0.0))[1], 0.0)
    if not requests:
        return {}
    ranked = sorted(spent.items(), key=lambda kv: -kv[1])
    out = {g: round(v * 1000 / requests, 3) for g, v in ranked[:n]}
    rest = sum(v for _, v in ranked[n:])
    if rest:
        out["rest"] = round(rest * 1000 / requests, 3)
    return out
