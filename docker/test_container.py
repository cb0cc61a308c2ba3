"""Talk to a running xray-serve container through its published 127.0.0.1 ports.

    python docker/test_container.py --url http://127.0.0.1:18080 \
        --key-file KEYS.json [--data-dir DIR] [--per-class 3]

KEYS.json is the container's /var/lib/xray/keys/key_file.json (docker exec CONTAINER cat ...).
Checks: real test radiographs of both classes predict 200 with a valid handlers.schemas.Prediction,
/ping answers without a token, a wrong token gets 401, the management API is unreachable, and
/metrics answers. Prints one line per check and "container: N passed, N failed"; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: run as a script

from handlers.constants import MODEL_NAME
from handlers.schemas import Prediction
from serving.settings import read_keys
from training.sources import default_data_dir


def images(data_dir: Path, per_class: int) -> list[tuple[str, Path]]:
    out = []
    for label in ("NORMAL", "PNEUMONIA"):
        found = sorted((data_dir / "test" / label).glob("*.jp*g"))[:per_class]
        if not found:
            raise SystemExit(f"no test images under {data_dir / 'test' / label} (set DATA_DIR)")
        out += [(label, p) for p in found]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="inference API, e.g. http://127.0.0.1:18080")
    p.add_argument("--metrics-url")
    p.add_argument("--key-file", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=None, help="default: $DATA_DIR or ../shared/data/chest_xray")
    p.add_argument("--per-class", type=int, default=3)
    ns = p.parse_args(argv)
    keys = read_keys(ns.key_file)
    auth = {"Authorization": f"Bearer {keys['inference']}"}
    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Callable[[], str]) -> None:
        try:
            results.append((name, True, fn()))
        except Exception as exc:
            results.append((name, False, f"{type(exc).__name__}: {exc}"))

    with httpx.Client(timeout=60) as c:
        def ready() -> str:
            r = c.get(f"{ns.url}/ping")  # liveness: no token needed
            assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
            return r.json()["status"]

        check("GET /ping answers without a token", ready)
        correct = 0
        for label, path in images(ns.data_dir or default_data_dir(), ns.per_class):
            def predict(path: Path = path, label: str = label) -> str:
                nonlocal correct
                r = c.post(f"{ns.url}/predictions/{MODEL_NAME}", content=path.read_bytes(), headers=auth)
                assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
                pred = Prediction.model_validate(r.json())
                correct += pred.label == label
                return (f"true {label}: {pred.label} p={pred.probability:.3f} "
                        f"({pred.model} {pred.version}, {pred.backend} on {pred.device})")

            check(f"predict {path.name}", predict)

        def wrong_token() -> str:
            r = c.post(f"{ns.url}/predictions/{MODEL_NAME}", content=b"x", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401, f"a wrong token got HTTP {r.status_code}"
            r = c.post(f"{ns.url}/predictions/{MODEL_NAME}", content=b"x")
            assert r.status_code == 401, f"no token got HTTP {r.status_code}"
            return f"refused ({r.status_code})"

        check("a missing or wrong token is refused", wrong_token)

        def management_unreachable() -> str:
            r = c.put(f"{ns.url}/models/{MODEL_NAME}", params={"min_worker": 0}, headers=auth)
            assert r.status_code == 404, f"PUT /models/xray through the gateway got HTTP {r.status_code}"
            return f"PUT /models/xray?min_worker=0 -> {r.status_code}"

        check("management API is not reachable (scaling workers to 0)", management_unreachable)
        if ns.metrics_url:
            def metrics() -> str:
                r = c.get(f"{ns.metrics_url}/metrics")
                assert r.status_code == 200, f"HTTP {r.status_code}"
                return f"{len(r.text.splitlines())} lines"

            check("metrics endpoint answers", metrics)

    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    n_pred = sum(1 for name, _, _ in results if name.startswith("predict "))
    print(f"container: {correct}/{n_pred} images labelled as their folder (informational)")
    passed = sum(ok for _, ok, _ in results)
    print(f"container: {passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
