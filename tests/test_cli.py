"""The keras-transfer command end to end on a tiny image folder."""

import json
import os
import subprocess
import sys

from keras_transfer.cli import main


def run_cli(*args, cwd=None):
    """Runs the installed command line in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "keras_transfer.cli", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def test_list_backbones(capsys):
    assert main(["list-backbones", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50 " in out and "caffe" in out and "vgg16" not in out
    assert main(["list-backbones", "nothing*"]) == 1


def test_train_export_predict_end_to_end(image_folder, tmp_path):
    output = tmp_path / "exported"
    result = run_cli("train", str(image_folder), "--backbone", "mobilenet_v2",
                     "--weights", "none", "--image-size", "32", "--head-epochs", "1",
                     "--fine-tune-epochs", "1", "--batch-size", "4",
                     "--output", str(output), "--save-keras", str(tmp_path / "m.keras"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Exported a SavedModel" in result.stdout
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["class_names"] == ["cat", "dog", "fox"]
    assert os.path.isfile(tmp_path / "m.keras")

    images = [str(image_folder / "dog" / "0.png"), str(image_folder / "fox" / "1.png")]
    result = run_cli("predict", str(output), *images, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(result.stdout)
    assert [p["file"] for p in predictions] == images
    assert all(p["class"] in ("cat", "dog", "fox") and 0 <= p["probability"] <= 1
               for p in predictions)

    again = run_cli("train", str(image_folder), "--weights", "none", "--image-size", "32",
                    "--head-epochs", "1", "--fine-tune-epochs", "0", "--output", str(output))
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--overwrite" in again.stderr


def test_cli_errors_are_clear(image_folder, tmp_path):
    result = run_cli("train", str(image_folder), "--backbone", "resnet5", "--weights", "none",
                     "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "Did you mean" in result.stderr
    assert "Traceback" not in result.stderr
    bad = image_folder / "cat" / "bad.jpg"
    bad.write_bytes(b"garbage")
    result = run_cli("train", str(image_folder), "--weights", "none", "--image-size", "32",
                     "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "bad.jpg" in result.stderr
    assert not (tmp_path / "x").exists()


def test_predict_on_a_folder_that_is_not_an_export(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "a.png"]) == 2
    assert "no metadata.json" in capsys.readouterr().err
