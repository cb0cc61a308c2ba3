"""Data-parallel training: `torchrun --nproc_per_node 2 -m training.train` on CPU (gloo).

On a small generated data set (so that no decode of the real data is needed):
- full-batch training: one optimizer step per epoch over every image, so the data order cannot
  matter, and 2 ranks x B/2 images with DDP's averaged gradients must give the single-process
  weights (tolerance 1e-5: float32 sums in another order), by the global-batch rule;
- mini-batch training of our CNN with augmentation and BatchNorm: the 2-process run reaches the
  single-process validation metrics within 0.05 ROC AUC and 0.1 balanced accuracy (the order of
  the images, the augmentation draws and the per-rank BatchNorm statistics differ, by design),
  is reproducible bit for bit for its seed, and its checkpoint goes through export with parity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from export import parity
from export.__main__ import export_family
from tests.helpers import REPO, free_ports, make_image_folder
from training import distributed
from training.train import TrainConfig, train

AUC_TOLERANCE = 0.05
BALANCED_ACCURACY_TOLERANCE = 0.1
WEIGHT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 64 training images: even, so that DistributedSampler pads nothing and the full batch splits 32 + 32
    return make_image_folder(tmp_path_factory.mktemp("ddp_data"), {"train": (24, 40), "val": (12, 20),
                                                                  "test": (12, 20)})


def run_train(out: Path, data: Path, fields: dict[str, Any], nproc: int = 1) -> dict[str, Any]:
    """One run of TrainConfig `fields`: single-process in this process (the default path, as
    experiments calls it), or `torchrun --nproc_per_node nproc -m training.train` with the same
    fields as flags."""
    fields = {"name": "run", "input_size": 32, "progress": False, **fields}
    if nproc == 1:
        train(TrainConfig.model_validate({**fields, "data_dir": data, "out_dir": out}))
    else:
        flags = [f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool)
                 else f"--{k.replace('_', '-')}={json.dumps(v) if isinstance(v, dict) else v}"
                 for k, v in fields.items()]
        (port,) = free_ports(1)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "training.train", "--data-dir", str(data),
               "--out-dir", str(out), "--threads", "1", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((out / "run" / "metrics.json").read_text())
    result["state_dict"] = torch.load(out / "run" / "best.pt", weights_only=True)["state_dict"]
    return result


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()  # no "module." prefix: the plain model was saved
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_full_batch_ddp_equals_single_process(synth: Path, tmp_path: Path) -> None:
    fields = {"arch": "mlp", "arch_args": {"dropout": 0}, "epochs": 3, "batch_size": 64, "augment": False,
              "scheduler": "none"}
    single = run_train(tmp_path / "single", synth, fields)
    ddp = run_train(tmp_path / "ddp", synth, fields, nproc=2)
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    diff = max_weight_diff(single["state_dict"], ddp["state_dict"])
    assert diff < WEIGHT_TOLERANCE, diff
    assert ddp["val"]["roc_auc"] == pytest.approx(single["val"]["roc_auc"], abs=1e-6)
    assert ddp["threshold"] == pytest.approx(single["threshold"], abs=1e-4)


@pytest.mark.slow
def test_ddp_cnn_matches_single_process_is_reproducible_and_exports(synth: Path, tmp_path: Path) -> None:
    fields = {"arch": "xraynet", "epochs": 4, "batch_size": 16, "seed": 3}
    single = run_train(tmp_path / "single", synth, fields)
    ddp = run_train(tmp_path / "ddp", synth, fields, nproc=2)
    again = run_train(tmp_path / "again", synth, fields, nproc=2)

    for split in ("val", "test"):
        assert abs(ddp[split]["roc_auc"] - single[split]["roc_auc"]) <= AUC_TOLERANCE, (split, ddp, single)
        assert abs(ddp[split]["balanced_accuracy"] - single[split]["balanced_accuracy"]) \
            <= BALANCED_ACCURACY_TOLERANCE, split
    assert ddp["state_dict"].keys() == again["state_dict"].keys()
    assert all(torch.equal(v, again["state_dict"][k]) for k, v in ddp["state_dict"].items())
    assert ddp["val"] == again["val"] and ddp["best_epoch"] == again["best_epoch"]
    # a different run than single-process (else the 2 ranks would not have split the work)
    assert max_weight_diff(single["state_dict"], ddp["state_dict"]) > 0

    report = export_family("cnn", tmp_path / "ddp" / "run" / "best.pt", tmp_path,
                           parity.load_images(synth, "test"))
    assert parity.all_passed([report]), report


def test_global_batch_must_split_evenly() -> None:
    d = distributed.Dist(rank=1, world_size=4)
    assert distributed.per_rank_batch(32, d) == 8
    with pytest.raises(ValueError, match="multiple of the 4 processes"):
        distributed.per_rank_batch(30, d)


def test_shards_cover_every_item_once_in_order() -> None:
    for n, world in ((10, 3), (2, 4), (64, 2)):
        parts = [range(n)[distributed.shard(n, distributed.Dist(rank=r, world_size=world))] for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        orders = [distributed.train_order(n, 1, 0, distributed.Dist(rank=r, world_size=world)) for r in range(world)]
        assert {int(i) for o in orders for i in o} == set(range(n))
        assert len({len(o) for o in orders}) == 1  # equal step counts on every rank (DDP needs them)
