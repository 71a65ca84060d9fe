"""`keras-transfer doctor` and the distribution options of `keras-transfer train`."""

import json

import pytest

from keras_transfer import doctor
from keras_transfer.cli import build_parser, main


@pytest.mark.parametrize("available, verdict", [(2**40, ": fits."), (2**20, "DOES NOT FIT")])
def test_doctor_prints_versions_devices_and_whether_a_run_fits(capsys, monkeypatch, available,
                                                               verdict):
    # A terabyte fits any estimate and a megabyte none: the verdict is known.
    monkeypatch.setattr(doctor, "available_memory", lambda device: (available, "a test"))
    assert main(["doctor", "--backbone", "mobilenet_v2", "--image-size", "96",
                 "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    for expected in ("Versions: keras_transfer", "Keras backend: ", "keras_hub", "CPU: ",
                     "features: ", "Memory: ", "TPU: ", "strategy='auto' would use",
                     "Phase 'head' of mobilenet_v2 at 96 px, global batch 8",
                     "Phase 'fine_tune'", "activations", "optimizer"):
        assert expected in out, expected
    assert out.count(verdict) == 2, out  # both phases
    assert "fit unknown" not in out


def test_doctor_json_has_every_part(capsys):
    assert main(["doctor", "--backbone", "mobilenet_v2", "--image-size", "64",
                 "--phase", "fine_tune", "--unfreeze", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (estimate,) = report["estimates"]
    assert estimate["phase"] == "fine_tune" and estimate["total"] == sum(
        estimate[k] for k in ("weights", "gradients", "optimizer", "activations", "inputs",
                              "runtime"))
    assert set(report) >= {"versions", "cpu", "memory", "gpus", "tpu", "auto_strategy"}


@pytest.mark.tensorflow  # exports a SavedModel or reads tf.data
def test_train_takes_a_strategy_and_a_backup_folder(image_folder, tmp_path, capsys):
    args = ["train", str(image_folder), "--backbone", "mobilenet_v2", "--weights", "none",
            "--image-size", "32", "--head-epochs", "1", "--fine-tune-epochs", "0",
            "--batch-size", "4", "--strategy", "cpu", "--backup-dir", str(tmp_path / "run"),
            "--seed", "1", "--verbose", "--output", str(tmp_path / "export")]
    parsed = build_parser().parse_args(args)
    assert (parsed.strategy, parsed.backup_dir) == ("cpu", str(tmp_path / "run"))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Batch size 4 (one replica)." in out or "Global batch size 4" in out
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert [e["record"]["name"] for e in state["finished"]] == ["head"]
    # Rerunning the command resumes (tested on model.fit in test_backup.py).
