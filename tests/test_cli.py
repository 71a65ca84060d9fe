"""The keras-transfer command as people use it: end to end, its help, its errors."""

import json
import os
import subprocess
import sys

import pytest

from keras_transfer.cli import build_parser, main


def run_cli(*args, cwd=None, python_flags=()):
    """Runs the installed command line in a fresh process, as a user would."""
    return subprocess.run([sys.executable, *python_flags, "-m", "keras_transfer.cli", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def test_list_backbones(capsys):
    assert main(["list-backbones", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50 " in out and "caffe" in out and "vgg16" not in out
    assert main(["list-backbones", "nothing*"]) == 1


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["predict", "--help"],
                                  ["list-backbones"], ["cache", "list"]])
def test_help_and_list_backbones_do_not_import_tensorflow(args):
    result = run_cli(*args, python_flags=["-X", "importtime"])
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "keras_transfer" in imported
    assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "keras", "numpy")]
    assert "absl" not in result.stderr and "oneDNN" not in result.stderr


def test_every_option_says_what_it_does_and_its_default():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"list-backbones", "train", "export", "predict", "demo", "doctor",
                             "imagenet", "cache", "generate", "lr-find"}
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.option_strings and action.default not in (None, False):
                assert f"(default: {action.default})" in text, (name, action.dest)
            elif action.option_strings and not action.required:
                assert "default" in action.help, (name, action.dest)


@pytest.mark.tensorflow  # exports a SavedModel or reads tf.data
def test_train_export_predict_end_to_end(image_folder, tmp_path):
    output = tmp_path / "exported"
    result = run_cli("train", str(image_folder), "--backbone", "mobilenet_v2",
                     "--weights", "none", "--image-size", "32", "--head-epochs", "2",
                     "--head-solver", "adam",
                     "--fine-tune-epochs", "1", "--batch-size", "4",
                     "--validation-data", str(image_folder),
                     "--output", str(output),
                     "--save-keras", str(tmp_path / "new" / "folder" / "m.keras"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # Keras's progress, one line per epoch, then a summary row per phase.
    assert "Epoch 1/2" in out and "Epoch 3/3" in out and "val_loss" in out
    summary = out[out.index("Training summary"):].splitlines()
    assert summary[1].split()[:3] == ["phase", "epochs", "trainable"]
    assert summary[2].split()[:2] == ["head", "1-2"]
    assert summary[3].split()[:2] == ["fine_tune", "3-3"]
    assert "Metrics on the validation data" in out and "Exported a SavedModel" in out
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["class_names"] == ["cat", "dog", "fox"]
    assert os.path.isfile(tmp_path / "new" / "folder" / "m.keras")  # folders made
    report = json.loads((output / "report" / "metrics.json").read_text())
    assert set(report["metrics"]) == {"loss", "accuracy"}
    assert [p["name"] for p in report["phases"]] == ["head", "fine_tune"]
    assert len(report["history"]["loss"]) == 3
    assert (output / "report" / "history.png").stat().st_size > 1000

    images = [str(image_folder / "dog" / "0.png"), str(image_folder / "fox" / "1.png")]
    result = run_cli("predict", str(output), *images, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(result.stdout)
    assert [p["file"] for p in predictions] == images
    assert all(p["class"] in ("cat", "dog", "fox") and 0 <= p["probability"] <= 1
               for p in predictions)

    again = run_cli("train", str(image_folder), "--weights", "none", "--image-size", "32",
                    "--head-epochs", "1", "--fine-tune-epochs", "0", "--output", str(output))
    assert again.returncode == 2 and again.stdout == ""  # refused before training
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    # --quiet and --no-report: test_backends' run of `train` on JAX.


@pytest.fixture
def cases(tmp_path, image_folder):
    """Mistakes people make, each with a part of the one-line message expected."""
    one_class = tmp_path / "one_class"
    (one_class / "cat").mkdir(parents=True)
    (one_class / "cat" / "0.png").write_bytes((image_folder / "cat" / "0.png").read_bytes())
    text_export = tmp_path / "text_export"
    text_export.mkdir()
    (text_export / "saved_model.pb").write_bytes(b"")
    (text_export / "metadata.json").write_text(json.dumps({"kind": "text", "task": "x"}))
    no_saved_model = tmp_path / "no_saved_model"
    no_saved_model.mkdir()
    (no_saved_model / "metadata.json").write_text(json.dumps({"kind": "image"}))
    image_export = tmp_path / "image_export"
    image_export.mkdir()
    (image_export / "saved_model.pb").write_bytes(b"")
    (image_export / "metadata.json").write_text(json.dumps(
        {"kind": "image", "task": "classification", "signatures": ["serving_bytes"]}))
    (tmp_path / "old.keras").write_bytes(b"a model trained yesterday")
    (tmp_path / "model.h5").write_bytes(b"not keras")
    (tmp_path / "existing").mkdir()
    image = str(image_folder / "cat" / "0.png")
    train = ["train", str(image_folder), "--weights", "none", "--output", str(tmp_path / "out")]
    return {
        "negative epochs": ([*train, "--head-epochs", "-1"], "--head-epochs: expected a whole"),
        "dropout 1.5": ([*train, "--dropout", "1.5"], "--dropout: expected a rate in [0, 1)"),
        "no epochs": ([*train, "--head-epochs", "0", "--fine-tune-epochs", "0"],
                      "nothing to train"),
        "one class": (["train", str(one_class), "--weights", "none", "--output",
                       str(tmp_path / "out")], "one class ['cat']"),
        "missing data": (["train", str(tmp_path / "nope"), "--output", str(tmp_path / "out")],
                         "not a folder"),
        "existing output": (["train", str(image_folder), "--output", str(tmp_path / "existing")],
                            "already exists"),
        "save-keras name": ([*train, "--save-keras", str(tmp_path / "model.h5")],
                            "files ending in .keras"),
        "save-keras exists": ([*train, "--save-keras", str(tmp_path / "old.keras")],
                              "old.keras', which already exists. Pass --overwrite"),
        "predict text export": (["predict", str(text_export), image], "is a text model"),
        "predict no export": (["predict", str(tmp_path), image], "no metadata.json"),
        "predict no SavedModel": (["predict", str(no_saved_model), image],
                                  "no model file"),
        "predict missing image": (["predict", str(image_export), image, "nope.png"],
                                  "do not exist: nope.png"),
        "export a .h5 file": (["export", str(tmp_path / "model.h5"), str(tmp_path / "x")],
                              "expected a .keras file"),
        "export a missing file": (["export", str(tmp_path / "m.keras"), str(tmp_path / "x")],
                                  "does not exist"),
        "unknown option": ([*train, "--epochs", "3"],
                           "unrecognized arguments: --epochs 3"),
    }


CASES = ["negative epochs", "dropout 1.5", "no epochs", "one class", "missing data",
         "existing output", "save-keras name", "save-keras exists", "predict text export",
         "predict no export", "predict no SavedModel", "predict missing image",
         "export a .h5 file", "export a missing file", "unknown option"]


@pytest.mark.tensorflow  # exports a SavedModel or reads tf.data
@pytest.mark.parametrize("case", CASES)
def test_each_user_error_is_one_line_with_exit_status_2(cases, case):
    args, message = cases[case]
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.tensorflow  # exports a SavedModel or reads tf.data
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
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_predict_on_a_folder_that_is_not_an_export(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "a.png"]) == 2
    assert "no metadata.json" in capsys.readouterr().err


@pytest.mark.tensorflow  # exports a SavedModel or reads tf.data
def test_offline_imagenet_weights_name_the_cli_options(image_folder, tmp_path, offline):
    result = run_cli("train", str(image_folder), "--image-size", "96",
                     "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("keras-transfer")]
    assert len(error) == 1 and "--weights none" in error[0] and "--weights /path" in error[0]


@pytest.fixture(scope="module")
def multi_head_export(tmp_path_factory):
    import keras

    import keras_transfer as kt

    inputs = keras.Input((16, 16, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(2, 3, strides=4)(inputs))
    model = kt.MultiTaskModel(backbone, tasks={
        "animal": kt.Head(3, class_names=["cat", "dog", "fox"], pooling="avg"),
        "tags": kt.Head(2, kind="multilabel", class_names=["indoor", "night"], pooling="avg"),
        "size": kt.Head(1, kind="regression", pooling="avg")})
    return model.export(str(tmp_path_factory.mktemp("multi") / "export"))


@pytest.mark.tensorflow  # exports a SavedModel or reads tf.data
def test_predict_prints_every_head_by_name(multi_head_export, image_folder, capsys):
    images = [str(image_folder / "dog" / "0.png"), str(image_folder / "fox" / "1.png")]
    assert main(["predict", multi_head_export, *images, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == images
    for r in results:
        assert set(r["heads"]) == {"animal", "tags", "size"}
        assert r["heads"]["animal"]["class"] in ("cat", "dog", "fox")
        assert set(r["heads"]["tags"]["probabilities"]) == {"indoor", "night"}
        assert len(r["heads"]["size"]["outputs"]) == 1
    assert main(["predict", multi_head_export, *images]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert all("animal: " in line and "tags: " in line and "size: " in line for line in lines)


@pytest.mark.tensorflow  # exports a SavedModel or reads tf.data
def test_predict_names_a_file_that_is_no_image(multi_head_export, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["predict", multi_head_export, str(tmp_path / "notes.png")]) == 2
    err = capsys.readouterr().err
    assert "notes.png" in err and "JPEG, PNG, GIF, BMP or WebP" in err
    assert len(err.strip().splitlines()) == 1
