"""Training: reproducibility, the checkpoint's card, heads, run outputs, the default set, the studies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from handlers.trust import calibrated, margin_of
from training import experiments
from training.checkpoint import load_checkpoint
from training.metrics import binary_metrics
from training.models import ARCHS, arch_args, build_model
from training.train import TrainConfig, ema_step, load_data, make_criterion, predict, train, training_loss


def tiny_config(data_dir: Path, out_dir: Path, **kw: Any) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "tiny", "arch": "xraynet", "input_size": 64, "epochs": 2, "batch_size": 16,
        "limit_train": 80, "limit_eval": 60, "augment": True, "data_dir": data_dir, "out_dir": out_dir,
        "progress": False, **kw})


@pytest.fixture(scope="module")
def tiny_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return load_data(tiny_config(data_dir, tmp_path_factory.mktemp("unused")))


@pytest.fixture(scope="module")
def tiny_run(data_dir: Path, tiny_data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train(tiny_config(data_dir, tmp_path_factory.mktemp("runs_a")), tiny_data)


def test_same_seed_same_run(data_dir: Path, tiny_data: dict[str, Any], tiny_run: dict,
                            tmp_path: Path) -> None:
    again = train(tiny_config(data_dir, tmp_path), tiny_data)
    for key in ("val", "test", "final_val_accuracy", "final_test_accuracy", "threshold", "best_epoch"):
        assert again[key] == tiny_run[key], key
    first = torch.load(tiny_run["checkpoint"], weights_only=True)
    second = torch.load(again["checkpoint"], weights_only=True)
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for k, v in first["state_dict"].items():
        assert torch.equal(v, second["state_dict"][k]), k
    drop = {"seconds"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in first["history"]] == \
        [{k: v for k, v in h.items() if k not in drop} for h in second["history"]]


def test_bf16_training_repeats_and_differs_from_fp32(data_dir: Path, tiny_data: dict[str, Any],
                                                    tmp_path: Path) -> None:
    """precision=bf16 runs the training forward pass under autocast: the weights differ from the fp32
    run's (it is engaged), the same seed gives the same weights (reproducible), and the checkpoint
    holds float32 weights (evaluation and export stay fp32)."""
    states = [torch.load(train(tiny_config(data_dir, tmp_path / str(i), precision="bf16", epochs=1),
                               tiny_data)["checkpoint"], weights_only=True)["state_dict"] for i in range(2)]
    first_conv = "features.0.weight"
    assert states[0][first_conv].dtype == torch.float32
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    fp32_one_epoch = torch.load(train(tiny_config(data_dir, tmp_path / "fp32", epochs=1), tiny_data)["checkpoint"],
                                weights_only=True)["state_dict"]
    assert not torch.equal(states[0][first_conv], fp32_one_epoch[first_conv])


def test_another_seed_another_run(data_dir: Path, tiny_data: dict[str, Any], tiny_run: dict,
                                  tmp_path: Path) -> None:
    other = train(tiny_config(data_dir, tmp_path, seed=1), tiny_data)
    first = torch.load(tiny_run["checkpoint"], weights_only=True)["state_dict"]
    second = torch.load(other["checkpoint"], weights_only=True)["state_dict"]
    assert any(not torch.equal(v, second[k]) for k, v in first.items())


def test_checkpoint_card_and_reload(tiny_run: dict, tiny_data: dict[str, Any]) -> None:
    ckpt = torch.load(tiny_run["checkpoint"], map_location="cpu", weights_only=True)
    card = ckpt["card"]
    assert card["arch"] == "xraynet" and card["head"] == "bce" and card["input_size"] == 64
    assert card["arch_args"] == arch_args("xraynet", {})
    assert (card["mean"], card["std"]) == pytest.approx(tiny_data["stats"])
    assert list(card["class_names"]) == ["NORMAL", "PNEUMONIA"]
    assert 0.0 <= card["threshold"] <= 1.0 and card["threshold"] == tiny_run["threshold"]
    assert card["seed"] == 0 and card["val_metrics"]["roc_auc"] == tiny_run["val"]["roc_auc"]

    loaded_card, model, _ = load_checkpoint(tiny_run["checkpoint"])
    assert not model.training
    # the rebuilt model reproduces the stored validation metrics at the stored threshold, on the
    # calibrated probability the server gives ...
    val = tiny_data["val"]
    _, logits = predict(model, val.x, loaded_card.head)
    prob = calibrated(margin_of(logits.numpy(), loaded_card.head), loaded_card.calibration)
    again = binary_metrics(val.y.numpy(), prob, loaded_card.threshold)
    for k in ("accuracy", "balanced_accuracy", "roc_auc", "tp", "tn"):
        assert again[k] == pytest.approx(loaded_card.val_metrics[k]), k
    # ... and its outputs equal a model built by hand from the same state dict
    manual = build_model(card["arch"], card["head"], card["input_size"], card["arch_args"])
    manual.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(manual.eval()(val.x[:8]), logits[:8])


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("size", [32, 64])
def test_heads(arch: str, size: int) -> None:
    for head, n_out in (("bce", 1), ("ce", 2)):
        model = build_model(arch, head, size).eval()
        with torch.no_grad():
            out = model(torch.randn(3, 1, size, size))
        assert out.shape == (3, n_out), (arch, head, size)


def test_run_outputs(tiny_run: dict) -> None:
    run_dir = Path(tiny_run["checkpoint"]).parent
    history = json.loads((run_dir / "history.json").read_text())
    assert history == tiny_run["history"], "train() returns the history it writes"
    assert [h["epoch"] for h in history] == [1, 2]
    # "best" marks exactly the epochs whose validation ROC AUC beat every earlier one
    aucs = [h["val_roc_auc"] for h in history]
    assert [h["best"] for h in history] == [a > max(aucs[:i], default=-1.0) for i, a in enumerate(aucs)]
    assert tiny_run["best_epoch"] == max(h["epoch"] for h in history if h["best"])
    # the checkpoint holds the best epoch's weights: its card's val AUC is that epoch's
    card = torch.load(tiny_run["checkpoint"], weights_only=True)["card"]
    assert card["val_metrics"]["roc_auc"] == pytest.approx(aucs[tiny_run["best_epoch"] - 1], abs=1e-12)
    assert (run_dir / "curves.png").stat().st_size > 1000
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val"] == tiny_run["val"] and "history" not in metrics


def test_ema_ships_the_average(data_dir: Path, tiny_data: dict[str, Any], tiny_run: dict, tmp_path: Path) -> None:
    """With ema the checkpoint holds the averaged weights (not the last step's), the card's figures are
    theirs, and the run repeats bit for bit."""
    runs = [train(tiny_config(data_dir, tmp_path / d, ema=0.99), tiny_data) for d in ("a", "b")]
    states = [torch.load(r["checkpoint"], weights_only=True)["state_dict"] for r in runs]
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k
    plain = torch.load(tiny_run["checkpoint"], weights_only=True)["state_dict"]
    assert any(not torch.equal(v, plain[k]) for k, v in states[0].items() if v.is_floating_point())
    card, model, _ = load_checkpoint(runs[0]["checkpoint"])
    val = tiny_data["val"]
    _, logits = predict(model, val.x, card.head)
    prob = calibrated(margin_of(logits.numpy(), card.head), card.calibration)
    assert binary_metrics(val.y.numpy(), prob, card.threshold)["roc_auc"] == pytest.approx(card.val_metrics["roc_auc"])


def test_ema_step_ramps_up_then_holds() -> None:
    step = ema_step(0.99)
    avg, cur = torch.zeros(3), torch.ones(3)
    # after n updates the decay is min(0.99, (1 + n) / (10 + n)): 0.1 at the first, 0.99 from n = 890
    assert step(avg, cur, torch.tensor(0))[0].item() == pytest.approx(0.9)
    assert step(avg, cur, torch.tensor(2000))[0].item() == pytest.approx(0.01)
    counter = torch.tensor(5)
    assert step(torch.tensor(1), counter, torch.tensor(7)) is counter  # BatchNorm's step count is copied


def test_xraynet_blocks_of_several_convolutions() -> None:
    """convs adds convolutions inside blocks: the output side is the same, Grad-CAM still reads block 3's
    maps (side / 8, widths[2] channels), and features then head is the model."""
    x = torch.randn(2, 1, 64, 64)
    for convs in (None, [1, 1, 1, 2, 2], [2, 1, 3, 1, 2]):
        model = build_model("xraynet", "bce", 64, {"convs": convs} if convs else {}).eval()
        n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        assert n_conv == (sum(convs) if convs else 5)
        with torch.no_grad():
            feats = model.forward_features(x)
            assert feats.shape == (2, 32, 8, 8)
            torch.testing.assert_close(model.forward_head(feats), model(x))
    with pytest.raises(ValueError, match="convs"):
        build_model("xraynet", "bce", 64, {"convs": [1, 1, 0, 1, 1]})


def packed(singles: list[torch.nn.Module], args: dict[str, Any], head: str = "bce") -> torch.nn.Module:
    """An XrayNet of len(SINGLES) members holding exactly those networks' weights."""
    ens = build_model("xraynet", head, 64, args | {"members": len(singles)})
    state = ens.state_dict()
    for value, *parts in zip(state.values(), *(m.state_dict().values() for m in singles), strict=True):
        if value.dim():  # per-member tensors are stacked along the output channels; the 1x1 head is a conv
            value.copy_(torch.cat([p.reshape(-1, *value.shape[1:]) for p in parts]))
    return ens


@pytest.mark.parametrize("head", ["bce", "ce"])
def test_members_are_independent_networks(head: str) -> None:
    """members=2 is two XrayNets side by side: served, the mean of their logits; in training each takes
    its own loss, so every weight gets the gradient it would get alone (halved: the loss is their mean)."""
    args = {"convs": [1, 1, 1, 2, 2], "dropout": 0.0}
    torch.manual_seed(0)
    singles = [build_model("xraynet", head, 64, args) for _ in range(2)]
    ens = packed(singles, args, head)
    x, y = torch.randn(6, 1, 64, 64), torch.tensor([0, 1, 1, 0, 1, 1])
    with torch.no_grad():
        expected = (singles[0].eval()(x) + singles[1].eval()(x)) / 2
        torch.testing.assert_close(ens.eval()(x), expected)
        torch.testing.assert_close(ens.forward_head(ens.forward_features(x)), expected)
    cfg = TrainConfig(arch="xraynet", head=head)
    criterion = make_criterion(cfg, y)
    loss, logits = training_loss(criterion, ens.train()(x), y, cfg)
    assert logits.shape == expected.shape
    loss.backward()
    for m in singles:
        m.train()
        training_loss(criterion, m(x), y, cfg)[0].backward()
    alone = packed(singles, args, head)  # a model to hold the singles' gradients, stacked
    for p_ens, p_alone, grads in zip(ens.parameters(), alone.parameters(),
                                     zip(*(m.parameters() for m in singles), strict=True), strict=True):
        stacked = torch.cat([g.grad.reshape(-1, *p_alone.shape[1:]) for g in grads])
        torch.testing.assert_close(p_ens.grad, stacked / 2, rtol=1e-4, atol=1e-6)


def result(name: str, val_auc: float, val_bal: float, test_auc: float) -> dict[str, Any]:
    return {"name": name, "config": {"select": "roc_auc"},
            "val": {"roc_auc": val_auc, "balanced_accuracy": val_bal}, "test": {"roc_auc": test_auc}}


def test_select_best_uses_validation_only() -> None:
    best = experiments.select_best([
        result("xraynet-a", 0.95, 0.90, 0.999),  # best on test: must not win
        result("xraynet-b", 0.97, 0.85, 0.90),
        result("xraynet-c", 0.97, 0.88, 0.80),  # ties b on val AUC, wins on val balanced accuracy
        result("mlp_bce-x", 0.90, 0.90, 0.90),
    ])
    assert {k: v["name"] for k, v in best.items()} == {"xraynet": "xraynet-c", "mlp_bce": "mlp_bce-x"}


def test_study_grids_are_valid() -> None:
    """Every run of every study validates as a TrainConfig; --quick keeps at most 2 small one-seed runs per grid."""
    for study in experiments.STUDIES:
        full = experiments.plan(study, quick=False, only=None)
        quick = experiments.plan(study, quick=True, only=None)
        assert full and len({name for name, _, _ in full}) == len(full)
        for name, cfg, _ in full + quick:
            TrainConfig.model_validate(cfg | {"name": name})
        if study != "default":
            assert 1 <= len(quick) <= 2
        assert all(cfg["epochs"] <= 2 and cfg["input_size"] <= 64 for _, cfg, _ in quick)
    assert {experiments.family(n) for n, _, _ in experiments.plan("default", True, None)} == \
        set(experiments.FAMILIES)
    assert [cfg["epochs"] for _, cfg, _ in experiments.plan("epochs", True, None)] == [1, 2]
    assert [n for n, _, _ in experiments.plan("lr", False, ["lr-0.001"])] == ["lr-0.001-s0", "lr-0.001-s1",
                                                                             "lr-0.001-s2"]
    assert [n for n, _, _ in experiments.plan("lr", False, ["lr-0.001-s1"])] == ["lr-0.001-s1"]


def test_default_set_best_checkpoints(best_dir: Path) -> None:
    summary = json.loads((best_dir / "summary.json").read_text())
    assert set(summary["models"]) == {"mlp_bce", "mlp_ce", "xraynet"}
    assert summary["quick"] is True
    for fam, m in summary["models"].items():
        card, model, _ = load_checkpoint(best_dir / m["checkpoint"])
        assert m["checkpoint"] == f"{fam}.pt" and card.name == fam
        assert card.head == ("ce" if fam == "mlp_ce" else "bce")
        assert (card.arch == "mlp") == fam.startswith("mlp")
        assert experiments.family(m["run"]) == fam
        assert 0.0 <= m["val"]["roc_auc"] <= 1.0 and m["test"]["n"] > 0 and m["params"] > 0
        assert np.isfinite(m["train_seconds"])
        with torch.no_grad():
            assert model(torch.zeros(2, 1, card.input_size, card.input_size)).shape == (2, card.n_outputs)


@pytest.mark.slow
def test_quick_studies_report(data_dir: Path, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    common = ["--quick", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path / "runs"),
              "--best-dir", str(tmp_path / "best"), "--reports-dir", str(reports)]
    experiments.main(["--study", "loss", *common])
    experiments.main(["--study", "gap_pool", *common])  # merged into the same report
    md = (reports / "experiments.md").read_text()
    data = json.loads((reports / "experiments.json").read_text())["studies"]
    expected = {"loss": ["loss-bce-s0", "loss-ce-s0"], "gap_pool": ["gap_pool-2x2x2-s0", "gap_pool-4x2x2-s0"]}
    assert list(data) == ["loss", "gap_pool"]
    for study, runs in expected.items():
        assert f"## {study} (quick, CI-sized)" in md
        assert [r["name"] for r in data[study]["results"]] == runs
        rows = [line for line in md.splitlines() if line.startswith(f"| {study}-")]
        assert len(rows) == len(runs)
        assert all(line.count(" | ") == rows[0].count(" | ") for line in rows)
        assert (reports / "plots" / f"{study}_curves.png").stat().st_size > 1000
        assert f"](plots/{study}_curves.png)" in md
        for r in data[study]["results"]:
            assert Path(r["curves"]).is_file() and r["note"] == "quick"
            assert len(r["history"]) == r["epochs_run"]
            assert r["infer_cpu_seconds_test"] > 0 and r["train_cpu_seconds_per_epoch"] > 0
    assert [r["config"]["head"] for r in data["loss"]["results"]] == ["bce", "ce"]
    assert [r["config"]["arch_args"]["pool"] for r in data["gap_pool"]["results"]] == [[2, 2, 2], [4, 2, 2]]
