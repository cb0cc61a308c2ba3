"""The course profile's settings, the report's statistics, and publishing that keeps written conclusions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run_cli
from training import experiments
from training.models import build_model, count_parameters


def test_course_profile_settings() -> None:
    """No class weights, Adam, no augmentation; a scheduler only where the study names one (L2)."""
    for study in experiments.COURSE_STUDIES:
        for name, cfg, _ in experiments.plan(study, quick=False, only=None):
            assert cfg["balance"] == "none" and cfg["optimizer"] == "adam" and not cfg["augment"], name
            assert cfg["scheduler"] == ("step" if study == "l2" else "none"), name
    for _, cfg, _ in experiments.plan("l2", False, None):
        assert (cfg["step_size"], cfg["gamma"], cfg["epochs"]) == (10, 0.1, 50)
    lr_runs = experiments.plan("lr", False, None)
    assert {(c["head"], c["epochs"], tuple(c["arch_args"]["hidden"])) for _, c, _ in lr_runs} == \
        {("ce", 30, (32, 32, 32))}
    assert {(c["arch_args"]["dropout"], c["epochs"]) for _, c, _ in experiments.plan("loss", False, None)} \
        == {(0.7, 10)}
    assert sorted({c["arch_args"]["dropout"] for _, c, _ in experiments.plan("dropout", False, None)}) == \
        [0.0, 0.3, 0.5, 0.7]
    seeds = {n: c["seed"] for n, c, _ in experiments.plan("epochs", False, None)}
    assert [seeds[f"epochs-ce-100-s{i}"] for i in range(3)] == [0, 1, 2]
    for study in experiments.COURSE_STUDIES:  # every setting over seeds 0, 1, 2
        names = [n for n, _, _ in experiments.plan(study, False, None)]
        assert len(names) == 3 * len({experiments.setting_of(n) for n in names}), study
    assert {c["input_size"] for s in ("loss", "batch_size", "lr", "dropout", "epochs", "depth", "l2")
            for _, c, _ in experiments.plan(s, False, None)} == {256}


def test_course_ann_has_the_course_parameter_count() -> None:
    """The course's ANN had 2,099,329 parameters at 256 px: 3 hidden layers of 32 and one logit."""
    cfg = experiments.ANN
    model = build_model(cfg["arch"], cfg["head"], 256, cfg["arch_args"])
    assert count_parameters(model) == 2_099_329


def test_gap_study_pools_to_the_course_map() -> None:
    """The 4-pooling arm leaves the course's 4x4 map before GAP; the 2-pooling arm a larger one."""
    sides = {}
    for name, cfg, _ in experiments.plan("gap_pool", False, None, seeds=[0]):
        model = build_model(cfg["arch"], cfg["head"], cfg["input_size"], cfg["arch_args"]).eval()
        with torch.no_grad():
            sides[name] = model.forward_features(torch.zeros(1, 1, cfg["input_size"], cfg["input_size"])).shape[-1]
    assert sides == {"gap_pool-2x2x2-s0": 8, "gap_pool-4x2x2-s0": 4}


def test_statistics() -> None:
    assert experiments.mean_sd([0.9, 0.8]) == "0.8500 ± 0.0707"
    assert experiments.mean_sd([0.9]) == "0.9000"
    history = [{"epoch": e, "val_loss": 1.0 - 0.01 * e + (0.5 if e < 31 else 0.0)} for e in range(1, 51)]
    assert experiments.val_loss_slope(history) == pytest.approx(-0.01)
    assert experiments.setting_of("batch-16-e30-s2") == "batch-16-e30"


def fake_run(setting: str, seed: int, head: str, acc: float) -> dict[str, Any]:
    history = [{"epoch": e, "train_loss": 0.5 / e, "val_loss": 0.6 / e, "train_accuracy": acc,
                "val_accuracy": acc} for e in (1, 2, 3)]
    return {"name": f"{setting}-s{seed}", "setting": setting, "params": 10, "train_cpu_seconds_per_epoch": 1.0,
            "infer_cpu_seconds_test": 0.1, "train_accuracy": acc, "final_val_accuracy": acc, "final_test_accuracy": acc,
            "history": history, "test": {"balanced_accuracy": acc, "roc_auc": acc}, "note": "",
            "val": {"n": 10, "tp": 7, "fn": 0, "tn": 0, "fp": 3},
            "config": {"arch": "mlp", "head": head, "input_size": 64, "seed": seed, "arch_args": {}}}


def test_publish_keeps_written_conclusions(tmp_path: Path) -> None:
    reports, docs = tmp_path / "reports", tmp_path / "docs"
    runs = [fake_run(f"loss-{h}", s, h, acc) for h, accs in (("bce", (0.9, 0.8)), ("ce", (0.7, 0.7)))
            for s, acc in enumerate(accs)]
    entry = {"quick": False, "seconds": 3.0, "results": runs, "command": "x", "created": "now"}
    experiments.write_report({"loss": entry}, reports)
    out = experiments.publish(reports, docs)
    md = out.read_text()
    assert "| loss-bce | bce | mlp/bce@64px | 10 | 0,1 |" in md and "0.8500 ± 0.0707" in md
    assert (docs / "plots" / "loss_curves.png").stat().st_size > 1000
    out.write_text(md.replace("*Conclusion:* not written yet.", "BCE wins by 0.15.")
                   .replace("<!-- written: overview -->\n", "<!-- written: overview -->\nWhy we differ.\n")
                   .replace(f"<!-- written: {experiments.TUNING} -->\n*Not written yet.*",
                            f"<!-- written: {experiments.TUNING} -->\nEMA paid."))
    md = experiments.publish(reports, docs).read_text()
    assert "BCE wins by 0.15." in md and "Why we differ." in md and "not written yet" not in md
    assert "EMA paid." in md and "Not written yet" not in md
    assert json.loads((reports / "experiments.json").read_text())["studies"]["loss"]["results"][0]["name"] == \
        "loss-bce-s0"


def test_publishing_one_study_keeps_the_others(tmp_path: Path) -> None:
    """A rerun of one study (its runs alone on disk) republishes that study and leaves the others' tables."""
    first, second, docs = tmp_path / "r1", tmp_path / "r2", tmp_path / "docs"
    loss = [fake_run(f"loss-{h}", 0, h, 0.9) for h in ("bce", "ce")]
    batch = [fake_run("batch-2", 0, "bce", 0.6)]
    for study, runs in (("loss", loss), ("batch_size", batch)):
        experiments.write_report({study: {"quick": False, "seconds": 1.0, "results": runs, "command": study,
                                          "created": "then"}}, first)
    md = experiments.publish(first, docs).read_text()
    loss_section = md[md.index("## loss"):md.index("## batch_size")]
    docs.joinpath("experiments.md").write_text(md.replace("*Conclusion:* not written yet.", "Kept words.", 1))
    rerun = [fake_run("batch-2", s, "bce", acc) for s, acc in ((0, 0.6), (1, 0.8))]
    experiments.write_report({"batch_size": {"quick": False, "seconds": 1.0, "results": rerun,
                                             "command": "batch_size", "created": "now"}}, second)
    md = experiments.publish(second, docs).read_text()
    assert md[md.index("## loss"):md.index("## batch_size")] == loss_section.replace(
        "*Conclusion:* not written yet.", "Kept words.")
    assert "| batch-2 |  |  | mlp/bce@64px | 10 | 0,1 |" in md and "0.7000 ± 0.1414" in md
    assert "- [loss](#loss): 2 settings, 2 runs" in md and "- [batch_size](#batch_size): 1 settings, 2 runs" in md
    assert md.index("## loss") < md.index("## batch_size") < md.index("## xraynet")


def test_a_snapshot_is_the_shorter_run(data_dir: Path, tmp_path: Path) -> None:
    """The epochs study reads a k-epoch run from a longer one: that is honest only if the snapshot equals
    a k-epoch run trained on its own, and the long run goes on as if no snapshot were taken."""
    from training.train import TrainConfig, load_data, train

    base = experiments.COURSE | dict(arch="mlp", head="bce", input_size=32, epochs=3, data_dir=data_dir,
                                     out_dir=tmp_path, arch_args={"hidden": [8], "dropout": 0.5},
                                     limit_train=64, limit_eval=32, progress=False)
    long = TrainConfig.model_validate(base | {"name": "long"})
    data = load_data(long)
    with_snapshot = train(long, data, snapshots={2: long.model_copy(update={"epochs": 2, "name": "snap"})})
    (snap,) = with_snapshot.pop("snapshots")
    alone = {k: train(long.model_copy(update={"epochs": k, "name": f"alone{k}"}), data) for k in (2, 3)}

    def same(a: dict[str, Any], b: dict[str, Any]) -> None:
        drop = ("seconds",)
        assert [{k: v for k, v in h.items() if k not in drop} for h in a["history"]] == \
            [{k: v for k, v in h.items() if k not in drop} for h in b["history"]]
        assert (a["final_test_accuracy"], a["val"], a["test"]) == (b["final_test_accuracy"], b["val"], b["test"])
        wa = torch.load(a["checkpoint"], weights_only=True)["state_dict"]
        wb = torch.load(b["checkpoint"], weights_only=True)["state_dict"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)

    assert snap["epochs_run"] == 2 and snap["config"]["epochs"] == 2
    same(snap, alone[2])
    same(with_snapshot, alone[3])
    with pytest.raises(ValueError, match="snapshots"):
        train(long.model_copy(update={"scheduler": "cosine"}), data, snapshots={2: long})


def test_trajectories_read_shorter_runs_from_the_longest() -> None:
    """Across studies, runs that differ only in epochs share the longest planned run; cosine ones never."""
    plans = {s: experiments.plan(s, False, None) for s in experiments.COURSE_STUDIES}
    longest = experiments.trajectories(plans)
    bce = longest[experiments.trajectory_key(experiments.ann() | {"seed": 1})]
    assert (bce.name, bce.epochs) == ("epochs-50-s1", {5, 10, 25, 50})
    ce = longest[experiments.trajectory_key(experiments.ann(head="ce") | {"seed": 0})]
    assert (ce.name, ce.epochs) == ("epochs-ce-100-s0", {10, 30, 50, 100})
    assert experiments.trajectory_key(experiments.TUNED_MLP) is None


def test_reuse_finds_runs_saved_before_a_knob_existed(tmp_path: Path) -> None:
    """--reuse compares configs with defaults filled in: a run written before `ema` and `precision`
    existed is the same run as today's config, and a different setting is not."""
    cfg = experiments.run_config(experiments.ann(), "loss-bce-s0", "loss", argparse.Namespace(
        runs_dir=tmp_path, quick=False, data_dir=tmp_path / "data"))
    old = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("ema", "precision")}
    run = tmp_path / "loss" / "loss-bce-s0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"config": old}))
    (run / "best.pt").write_bytes(b"x")
    found = experiments.finished_runs(tmp_path)
    assert experiments.same_as(cfg.model_dump(mode="json")) in found
    assert experiments.same_as(cfg.model_copy(update={"lr": 1e-4}).model_dump(mode="json")) not in found
    future = tmp_path / "loss" / "loss-bce-s1"  # written by a version with a knob this one lacks
    future.mkdir()
    (future / "metrics.json").write_text(json.dumps({"config": old | {"seed": 1, "knob_from_the_future": 1}}))
    (future / "best.pt").write_bytes(b"x")
    assert len(experiments.finished_runs(tmp_path)) == 2


def test_every_course_study_runs_quick(data_dir: Path, tmp_path: Path) -> None:
    """`make experiments QUICK=1`, as CI runs it (~30 s): every course study trains its CI-sized grid and
    gets a table row per setting, its curves, and a published section; the default set is not published."""
    reports, docs = tmp_path / "reports", tmp_path / "docs"
    run_cli("training.experiments", "--study", "all", "--quick", "--data-dir", str(data_dir),
            "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(reports), "--best-dir", str(tmp_path / "best"))
    studies = json.loads((reports / "experiments.json").read_text())["studies"]
    assert sorted(studies) == sorted(experiments.COURSE_STUDIES)
    md = experiments.publish(reports, docs).read_text()
    for study, entry in studies.items():
        assert entry["quick"] and len(entry["results"]) >= 1, study
        assert all(len(r["history"]) == r["epochs_run"] >= 1 for r in entry["results"]), study
        assert f"## {study} (quick, CI-sized)" in md, study
        for setting in {r["setting"] for r in entry["results"]}:
            assert f"| {setting} |" in md, setting
        assert (docs / "plots" / f"{study}_curves.png").stat().st_size > 1000, study
    assert "## default" not in md
