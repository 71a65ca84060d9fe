"""`keras-transfer lr-find`: the learning-rate finder on an image folder.

Kept apart from `lr_finder` so that building the command line imports no Keras.
"""

from __future__ import annotations


def add_command_arguments(parser) -> None:
    """The options of `keras-transfer lr-find` (cli.py registers the command)."""
    parser.add_argument("data", help="folder with one subfolder of images per class")
    parser.add_argument("--backbone", default="mobilenet_v2",
                        help="backbone name; keras-transfer list-backbones lists them")
    parser.add_argument("--weights", default="imagenet",
                        help="'imagenet', 'none' or the path of a weights file")
    parser.add_argument("--image-size", type=int, metavar="PIXELS",
                        help="side of the square input (default: the backbone's own size)")
    parser.add_argument("--unfreeze", default="all",
                        help="what trains during the run, after the head is solved by the "
                             "probe: 'all', a number of top layers, a layer name, or 'none' "
                             "(the head alone)")
    parser.add_argument("--steps", type=int, default=100, help="batches, one rate each")
    parser.add_argument("--start", type=float, default=1e-7, help="first rate")
    parser.add_argument("--end", type=float, default=1.0, help="last rate")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    parser.add_argument("--plot", metavar="FILE.png", help="save the loss curve there (default: no plot)")


def run_command(args) -> int:
    """`keras-transfer lr-find`: solve the head, run the finder, print the suggestion."""
    # lazy: Keras; building the command's parser imports no Keras
    import keras_transfer as kt
    from keras_transfer.image_data import folder_class_names
    from keras_transfer.lr_finder import find_learning_rate

    class_names = folder_class_names(args.data)
    weights = None if args.weights == "none" else args.weights
    model = kt.ImageTransferModel(args.backbone, len(class_names), weights=weights,
                                  input_shape=args.image_size, class_names=class_names)
    model.fit(args.data, phases=[kt.HeadPhase()], batch_size=args.batch_size, seed=args.seed,
              verbose=0)
    unfreeze = None if args.unfreeze == "none" else (
        int(args.unfreeze) if args.unfreeze.isdigit() else args.unfreeze)
    found = find_learning_rate(model, args.data, start=args.start, end=args.end,
                               steps=args.steps, batch_size=args.batch_size,
                               unfreeze=unfreeze, seed=args.seed, plot=args.plot)
    print(f"Ran {len(found.rates)} batches, rates {found.rates[0]:.3g} to "
          f"{found.rates[-1]:.3g}; lowest smoothed loss at {found.minimum_rate:.3g}.")
    print(f"Suggested learning rate: {found.suggestion:.3g} (steepest fall of the smoothed "
          "loss)")
    if args.plot:
        print(f"Saved the curve to {args.plot}")
    return 0
