"""benchmarks/methods.py's bookkeeping: per-fold recipes, runs.json written by concurrent tasks, the report."""
import json
import multiprocessing
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
methods = load_script(ROOT / "benchmarks" / "methods.py")


def test_a_fold_with_its_own_image_lists_gets_its_own_recipe():
    assert methods.recipe("umtfss", 1).name == "msrc_v2_mobilenet_v2_fold1.yaml"
    assert methods.recipe("umtfss", 0).name == "msrc_v2_mobilenet_v2.yaml"
    assert methods.recipe("panet", 1).name == "msrc_v2_mobilenet_v2.yaml"


def _save(path, key):
    methods.save_row(Path(path), key, {"method": key, "fold": 0})


def test_concurrent_tasks_keep_every_row(tmp_path):
    done = tmp_path / "runs.json"
    done.write_text(json.dumps({"old/fold0": {"method": "old"}}))
    keys = [f"m{i}/fold0" for i in range(8)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.starmap(_save, [(str(done), k) for k in keys])
    assert set(json.loads(done.read_text())) == {"old/fold0", *keys}


def test_report_names_losers_and_methods_without_a_recipe():
    def row(method, miou, fold=0):
        shot = {"miou": miou, "miou_std": 0.1, "fb_iou": miou, "fb_iou_std": 0.1}
        return {"method": method, "fold": fold, "1shot": shot, "steps": {"fused": {}, "reference": {}}}
    info = {"cpu": "cpu", "threads": 1, "jobs": 2, "torch": "t", "argv": [], "folds": [0], "episodes": 10,
            "seeds": [0], "iters": None}
    text = methods.report([row("baseline", 60.0), row("panet", 55.0), row("dpcl", 61.0)], info)
    assert "Below the training-free baseline (1-shot) on a fold: panet (fold 0)." in text
    # each fold against the baseline's own: dpcl's fold mean (63.0) is above the baseline's (62.5), its fold 1 is not
    two = [row("baseline", 60.0), row("baseline", 65.0, 1), row("dpcl", 62.0), row("dpcl", 64.0, 1),
           row("panet", 61.0, 1), row("panet", 66.0)]
    two_text = methods.report(two, {**info, "folds": [0, 1]})
    assert "| dpcl | 63.0 ± 0.1 | 62.0 / 64.0 |" in two_text
    assert "on a fold: dpcl (fold 1), panet (fold 1)." in two_text
    missing = methods.report(two[:-1], {**info, "folds": [0, 1]})  # panet's fold 0 failed: its cell says which
    assert "| panet | 61.0 ± 0.1 | - / 61.0 |" in missing
    assert "not in this table: popnet" in text
    assert "Failed" not in text
    failed = methods.report([row("baseline", 60.0)], {**info, "failed": ["umtfss/fold0"]})
    assert "**Failed, not in this table**" in failed and "umtfss/fold0" in failed
    # --shots 5 alone: no 1-shot figure to compare with (the report used to raise StatisticsError)
    five = [{"method": m, "fold": 0, "5shot": {"miou": v, "miou_std": 0.1, "fb_iou": v, "fb_iou_std": 0.1},
             "steps": {"fused": {}, "reference": {}}} for m, v in (("baseline", 60.0), ("panet", 55.0))]
    assert "Below the training-free baseline" not in methods.report(five, {**info, "shots": [5]})


def test_rows_made_with_other_settings_are_not_reused(tmp_path, capsys):
    """A rerun into a folder whose rows were made with other episodes (or seeds, shots, budget) is refused: it
    trained nothing and printed the old rows under the new command's header."""
    row = {"method": "baseline", "fold": 0, "1shot": {"miou": 60.0, "miou_std": 0.1, "fb_iou": 70.0, "fb_iou_std": 0.1},
           "steps": {"fused": {}, "reference": {}},
           "settings": {"shots": [1], "seeds": [0], "episodes": 200, "iters": None, "data": "msrc_v2"}}
    (tmp_path / "runs.json").write_text(json.dumps({"baseline/fold0": row}))
    argv = ["--methods", "baseline", "--folds", "0", "--shots", "1", "--seeds", "0", "--out", str(tmp_path)]
    assert methods.main([*argv, "--episodes", "5"]) == 2
    assert "rows made with other settings" in capsys.readouterr().err and not (tmp_path / "report.md").exists()
    assert methods.main([*argv, "--episodes", "200"]) == 0 and "| baseline |" in (tmp_path / "report.md").read_text()
