"""python/demo.py's bookkeeping without a training: a finished run is reused only when trained as asked."""
from pathlib import Path

from conftest import load_script
from fsskern.engine.config import dump_yaml, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
METHOD = str(ROOT / "configs" / "dpcl" / "msrc_v2_mobilenet_v2.yaml")


demo = load_script(ROOT / "python" / "demo.py")


def test_a_run_trained_otherwise_is_named_not_reused(tmp_path):
    args = [f"out={tmp_path / 'dpcl-train'}", "data.root=/data/msrc_v2", "data.fold=0", "data.shots=1"]
    assert demo._changed_settings(tmp_path / "dpcl-train", METHOD, args) == []  # nothing trained yet
    (tmp_path / "dpcl-train").mkdir()
    (tmp_path / "dpcl-train" / "config.yaml").write_text(
        dump_yaml(to_dict(load_config(METHOD, args + ["train.iters=2"]))))
    # a smoke run's 2 iterations used to be reported as the recipe's training
    assert demo._changed_settings(tmp_path / "dpcl-train", METHOD, args) == ["train.iters 2 -> 300"]
    assert demo._changed_settings(tmp_path / "dpcl-train", METHOD, args + ["train.iters=2"]) == []


def test_a_resumed_or_epoch_counted_run_is_reused(tmp_path):
    """A resumed training saves resume: true, and one counted in epochs saves the iterations it counted: neither
    is another training (both once made every later make demo refuse the finished run)."""
    args = [f"out={tmp_path / 'dpcl-train'}", "data.root=/data/msrc_v2", "data.fold=0", "data.shots=1"]
    (tmp_path / "dpcl-train").mkdir()
    saved = to_dict(load_config(METHOD, args + ["resume=true", "train.epochs=2", "train.iters=0"]))
    saved["train"]["iters"] = 123  # what the trainer counted from the pool
    (tmp_path / "dpcl-train" / "config.yaml").write_text(dump_yaml(saved))
    assert demo._changed_settings(tmp_path / "dpcl-train", METHOD, args + ["train.epochs=2", "train.iters=0"]) == []
    assert demo._changed_settings(tmp_path / "dpcl-train", METHOD, args + ["train.epochs=3", "train.iters=0"]) \
        == ["train.epochs 2.0 -> 3.0"]


def test_a_folder_without_the_class_list_gets_the_layout_not_a_traceback(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    assert demo.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path}/class_counts.tsv" in capsys.readouterr().err
