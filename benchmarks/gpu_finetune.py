"""GPU fine-tuning throughput on any Keras 3 backend: keras_transfer versus plain Keras.

What it measures
    Examples per second of fine-tuning (backbone unfrozen, BatchNormalization
    kept frozen, Adam with the library's warmup + cosine schedule) for three
    networks, with mixed precision off (`float32`) and on (`mixed_float16`):

    * ``mobilenet_v2`` and ``resnet50``: 224 px images, ``weights=None`` (no
      downloads). Ours is ``kt.ImageTransferModel(name, num_classes,
      weights=None, input_shape=(224, 224, 3), pooling="avg")`` trained with
      ``model.fit(x, y, phases=[kt.FineTunePhase(epochs=E)], batch_size=B)``;
      the hand-written side is the ``keras.applications`` network
      (``include_top=False``, called with ``training=False``) ->
      GlobalAveragePooling2D -> Dense, unfrozen with every BatchNormalization
      frozen, ``Adam(kt.WarmupDecay(...))`` and plain ``keras.Model.fit`` on
      the same numpy arrays (uint8 pixels, cast inside the model on both
      sides).
    * ``minilm``: a MiniLM-sized BERT (6 layers, hidden 384, 12 heads,
      intermediate 1536, vocabulary 30,522) built from its config with
      ``keras_hub.models.BertBackbone``, random weights, full-length random
      sequences. Ours is ``kt.TextTransferModel`` on that backbone; it takes
      text, so it gets strings of synthetic words from a generated vocabulary
      and tokenises them in its input pipeline (a cost the hand-written side
      does not pay). The hand-written side gets the very same token ids as
      numpy arrays -> the backbone -> mean over the padding mask -> Dense.
      Where the tokenizer cannot run, the output says so and times the
      hand-written side alone.

    Every fit runs E epochs of S full batches; a callback records each
    epoch's wall time and the first epoch of every fit is dropped (tracing,
    XLA compilation, optimizer variables). Each side is fitted ``--rounds``
    times, alternating which goes first, each time with a fresh optimizer and
    a recompile (as the library does per phase); the median is reported.
    On JAX, compiled XLA programs are kept in ``<tmp>/gpu_finetune_xla_cache``
    so that later rounds and runs compile less (the dropped first epoch still
    holds whatever tracing and compiling remains).

How to read the output
    The first lines name the backend and its devices. Without a GPU the
    script runs a small CPU configuration (64 px images, short sequences,
    a few batches, one round) and says that its figures are not GPU figures:
    it only shows that the script and both training paths work. For each
    network and precision it prints per-round throughput of both sides, then
    ``ratio ours / hand-written`` (medians; 1.00x is parity, above 1 the
    library is faster) and the median of the per-round ratios. Trainable and
    frozen parameter counts are printed so you can check that both sides
    train the same weights. A table at the end repeats every configuration.
    Absolute figures belong to the machine that printed them; compare ratios
    only within one run. Nothing is asserted.

Usage:
    python benchmarks/gpu_finetune.py                      # all 3 networks x 2 precisions
    python benchmarks/gpu_finetune.py --quick              # 1 round, fewer steps
    python benchmarks/gpu_finetune.py --models resnet50 --precisions mixed_float16
    KERAS_BACKEND=jax python benchmarks/gpu_finetune.py --batch-size 128 --rounds 5

    On an offline JAX GPU machine (JAX with CUDA installed), carry the wheels
    and this checkout. On a machine with internet and the same Python version
    and platform::

        pip download -d wheels/ keras scipy pillow kagglehub regex tokenizers sentencepiece
        pip download -d wheels/ --no-deps keras-hub    # else tensorflow-text pulls in TensorFlow

    then, on the GPU machine, in the checkout (the script imports
    keras_transfer from it)::

        pip install --no-index --find-links wheels/ keras scipy pillow kagglehub \\
            regex tokenizers sentencepiece
        pip install --no-index --no-deps wheels/keras_hub-*.whl
        KERAS_BACKEND=jax python benchmarks/gpu_finetune.py

    The first ``pip download`` brings keras's own dependencies (namex, optree,
    ml_dtypes, rich, absl-py, h5py, packaging) and keras-hub's; keras-hub
    imports kagglehub, regex, tokenizers and sentencepiece when it loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import logging
import os
import statistics
import string
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_transfer as kt  # noqa: E402
from handwritten import pooled_features  # noqa: E402  (benchmarks/handwritten.py)
from machine import print_load  # noqa: E402  (benchmarks/machine.py)

# The library's fine-tuning schedule (FineTunePhase), mirrored by hand.
PEAK_LEARNING_RATE = 1e-5
WARMUP_FRACTION = 0.1
DECAY = "cosine"

IMAGE_MODELS = ("mobilenet_v2", "resnet50")
TEXT_MODELS = ("minilm",)
PRECISIONS = ("float32", "mixed_float16")
SIDES = ("keras_transfer", "hand-written")

# MiniLM-L6 sizes (all-MiniLM-L6-v2) with BERT's uncased vocabulary size.
MINILM = dict(vocabulary_size=30522, num_layers=6, num_heads=12, hidden_dim=384,
              intermediate_dim=1536, max_sequence_length=512)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# name: (GPU, CPU) values of the settings a flag left unset.
DEFAULTS = {
    "size": (224, 64), "sequence_length": (128, 32), "batch_size": (64, 8),
    "steps": (20, 2), "epochs": (3, 2), "rounds": (3, 1),
}
QUICK = {"steps": (8, 1), "epochs": (2, 2), "rounds": (1, 1)}


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every epoch of a `fit` call.

    Not `async_safe`: Keras then turns each batch's logs into Python numbers,
    which waits for the device, so an epoch's time includes its last step.

    Attributes:
        times: list of float. Wall-clock seconds per epoch, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter() - self._start)

    def rate(self, examples_per_epoch: int) -> float:
        """Examples per second over the epochs after the first."""
        return examples_per_epoch * (len(self.times) - 1) / sum(self.times[1:])


# ------------------------------------------------------------------ devices
def backend_devices() -> tuple[list[str], bool]:
    """Names the backend's devices and whether one of them is a GPU.

    Returns:
        `(lines to print, has_gpu)`.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = jax.devices()
        return [f"jax {jax.__version__}: {devices}"], any(d.platform == "gpu" for d in devices)
    if backend == "torch":
        import torch

        count = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(count)]
        return [f"torch {torch.__version__}: CUDA devices {names or 'none'}"], count > 0
    if backend == "tensorflow":
        import tensorflow as tf  # the backend itself: already imported by Keras

        gpus = tf.config.list_physical_devices("GPU")
        return [f"tensorflow {tf.__version__}: GPUs {gpus or 'none'}"], bool(gpus)
    return [f"{backend}: devices unknown"], False


def use_compilation_cache() -> None:
    """Lets JAX reuse XLA programs across rounds (each recompile retraces)."""
    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(tempfile.gettempdir(), "gpu_finetune_xla_cache"))


# ------------------------------------------------------------------- models
def handwritten_image(backbone: str, input_shape: tuple[int, int, int],
                      num_classes: int) -> keras.Model:
    """The plain-Keras image classifier, unfrozen except BatchNormalization.

    Only the constructor name and preprocessing mode come from the
    keras_transfer registry; the model is plain Keras.

    Returns:
        An uncompiled functional `keras.Model` taking uint8 images.
    """
    inputs = keras.Input(shape=input_shape, dtype="uint8")
    features = pooled_features(backbone, inputs)
    # float32 logits keep the loss stable under mixed precision, as the library's heads.
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(features)
    return keras.Model(inputs, outputs, name="handwritten")


def minilm_backbone():
    """A MiniLM-sized `keras_hub.models.BertBackbone` with random weights."""
    import keras_hub

    return keras_hub.models.BertBackbone(**MINILM)


def handwritten_text(num_classes: int) -> keras.Model:
    """The plain-Keras text classifier: BERT -> mean over real tokens -> Dense.

    The pooler feeds no loss under mean pooling and is frozen, as the
    library does.

    Returns:
        An uncompiled functional `keras.Model` taking the token dict.
    """
    backbone = minilm_backbone()
    inputs = {
        "token_ids": keras.Input(shape=(None,), dtype="int32", name="token_ids"),
        "segment_ids": keras.Input(shape=(None,), dtype="int32", name="segment_ids"),
        "padding_mask": keras.Input(shape=(None,), dtype="bool", name="padding_mask"),
    }
    sequence = backbone(inputs, training=False)["sequence_output"]
    mask = keras.ops.cast(keras.ops.expand_dims(inputs["padding_mask"], -1), sequence.dtype)
    pooled = keras.ops.sum(sequence * mask, axis=1) / keras.ops.sum(mask, axis=1)
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(pooled)
    for layer in backbone.layers:
        if layer.name.startswith("pooled_dense"):
            layer.trainable = False
    return keras.Model(inputs, outputs, name="handwritten")


def synthetic_vocabulary() -> list[str]:
    """BERT's special tokens and letter words ("aaa", "aab", ...) to the MiniLM size."""
    words = ("".join(letters) for n in (3, 4)
             for letters in itertools.product(string.ascii_lowercase, repeat=n))
    return SPECIAL_TOKENS + list(itertools.islice(
        words, MINILM["vocabulary_size"] - len(SPECIAL_TOKENS)))


def ours_text(num_classes: int, sequence_length: int, vocabulary: list[str]):
    """`kt.TextTransferModel` on a MiniLM-sized backbone and a local-vocabulary tokenizer."""
    import keras_hub

    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length)
    return kt.TextTransferModel(minilm_backbone(), num_classes,
                                sequence_length=sequence_length, preprocessor=preprocessor)


def param_counts(model: keras.Model) -> tuple[int, int]:
    """Returns `(trainable, frozen)` parameter counts."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, frozen


# --------------------------------------------------------------------- data
def image_data(rng, examples: int, size: int, num_classes: int):
    """Random uint8 images and labels."""
    x = rng.integers(0, 256, size=(examples, size, size, 3), dtype=np.uint8)
    return x, rng.integers(0, num_classes, size=(examples,))


def text_data(rng, examples: int, sequence_length: int, num_classes: int,
              vocabulary: list[str]):
    """Random full-length sequences, both as texts and as their token ids.

    Every word is one vocabulary entry, so the tokenizer gives back exactly
    `[CLS] words [SEP]` and both sides train on the same ids.

    Returns:
        `(texts, token dict, labels)`.
    """
    first = len(SPECIAL_TOKENS)
    words = rng.integers(first, len(vocabulary), size=(examples, sequence_length - 2))
    texts = [" ".join(vocabulary[i] for i in row) for row in words]
    cls, sep = vocabulary.index("[CLS]"), vocabulary.index("[SEP]")
    ids = np.concatenate([np.full((examples, 1), cls), words, np.full((examples, 1), sep)],
                         axis=1).astype("int32")
    tokens = {"token_ids": ids, "segment_ids": np.zeros_like(ids),
              "padding_mask": np.ones(ids.shape, bool)}
    return texts, tokens, rng.integers(0, num_classes, size=(examples,))


# ------------------------------------------------------------------ fitting
def fit_ours(model, x, y, epochs: int, batch_size: int) -> float:
    """One library fine-tuning fit (a `FineTunePhase` alone); examples/s."""
    timer = EpochTimer()
    phase = kt.FineTunePhase(epochs=epochs, learning_rate=PEAK_LEARNING_RATE,
                             warmup=WARMUP_FRACTION, decay=DECAY)
    model.fit(x, y, phases=[phase], batch_size=batch_size, callbacks=[timer], verbose=0)
    return timer.rate(len(y))


def fit_handwritten(model: keras.Model, x, y, epochs: int, batch_size: int) -> float:
    """One plain-Keras fit with a fresh optimizer and a recompile; examples/s."""
    total = epochs * -(-len(y) // batch_size)
    schedule = kt.WarmupDecay(PEAK_LEARNING_RATE, total_steps=total,
                              warmup_steps=int(round(WARMUP_FRACTION * total)), decay=DECAY)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    timer = EpochTimer()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, callbacks=[timer], verbose=0)
    return timer.rate(len(y))


@dataclasses.dataclass
class Result:
    """The rounds of one network at one precision.

    Attributes:
        name: str. The network.
        precision: str. The Keras dtype policy.
        unit: str. `"images"` or `"sequences"`.
        rates: dict side -> list of examples/s per round.
        params: dict side -> `(trainable, frozen)`.
        note: str. Why a side is missing, if one is.
    """

    name: str
    precision: str
    unit: str
    rates: dict = dataclasses.field(default_factory=dict)
    params: dict = dataclasses.field(default_factory=dict)
    note: str = ""

    def median(self, side: str) -> float | None:
        return statistics.median(self.rates[side]) if self.rates.get(side) else None

    def ratio(self) -> float | None:
        ours, hand = self.median(SIDES[0]), self.median(SIDES[1])
        return ours / hand if ours and hand else None


def _not_timed(error: Exception, stage: str, text: bool) -> str:
    """The note for a keras_transfer side that failed; the traceback goes to stderr."""
    traceback.print_exc()
    why = (" Its text model takes strings and tokenises them in its input pipeline; "
           "it has no path for pre-tokenised ids." if text else "")
    return (f"keras_transfer not timed: {stage} failed on this backend "
            f"({type(error).__name__}: {str(error)[:200]}).{why} The hand-written side "
            "alone is timed; the traceback is on stderr.")


def measure(name: str, precision: str, args: argparse.Namespace) -> Result:
    """Builds both sides of one network under `precision` and times `args.rounds` fits each.

    A failure of the keras_transfer side is noted and the hand-written side
    still timed; a failure of the hand-written side stops the script.
    """
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    examples = args.steps * args.batch_size
    text = name in TEXT_MODELS
    if text:
        result = Result(name, precision, "sequences")
        vocabulary = synthetic_vocabulary()
        texts, tokens, y = text_data(rng, examples, args.sequence_length, args.classes,
                                     vocabulary)
        models = {"hand-written": handwritten_text(args.classes)}
        data = {"hand-written": tokens, "keras_transfer": texts}
        build_ours = lambda: ours_text(args.classes, args.sequence_length, vocabulary)  # noqa: E731
    else:
        result = Result(name, precision, "images")
        input_shape = (args.size, args.size, 3)
        x, y = image_data(rng, examples, args.size, args.classes)
        models = {"hand-written": handwritten_image(name, input_shape, args.classes)}
        data = {side: x for side in SIDES}
        build_ours = lambda: kt.ImageTransferModel(  # noqa: E731
            name, args.classes, weights=None, input_shape=input_shape, pooling="avg")
    try:
        models["keras_transfer"] = build_ours()
    except Exception as error:  # e.g. a tokenizer whose ops this install lacks
        result.note = _not_timed(error, "building the model", text)

    sides = [side for side in SIDES if side in models]
    result.rates = {side: [] for side in sides}
    for round_index in range(args.rounds):
        for side in list(sides if round_index % 2 == 0 else sides[::-1]):
            try:
                if side == "keras_transfer":
                    rate = fit_ours(models[side], data[side], y, args.epochs, args.batch_size)
                else:
                    rate = fit_handwritten(models[side], data[side], y, args.epochs,
                                           args.batch_size)
            except Exception as error:
                if side != "keras_transfer":
                    raise
                result.note = _not_timed(error, "model.fit", text)
                sides.remove(side)
                del result.rates[side]
                continue
            result.rates[side].append(rate)
            print(f"  round {round_index + 1}: {side:<15} {rate:9.1f} {result.unit}/s",
                  flush=True)
    result.params = {side: param_counts(models[side]) for side in sides}
    return result


def report(result: Result) -> None:
    """Prints one configuration's medians, ratio and parameter counts."""
    for side in SIDES:
        if side in result.rates:
            rounds = " ".join(f"{r:.1f}" for r in result.rates[side])
            trainable, frozen = result.params[side]
            print(f"  {side:<15} median {result.median(side):9.1f} {result.unit}/s "
                  f"(rounds: {rounds}); trainable {trainable:,}, frozen {frozen:,}")
    if result.note:
        print(f"  NOTE: {result.note}")
    elif result.params[SIDES[0]] != result.params[SIDES[1]]:
        print("  NOTE: the two sides do not train the same parameters; not like for like.")
    ratio = result.ratio()
    if ratio is not None:
        paired = statistics.median(
            a / b for a, b in zip(result.rates[SIDES[0]], result.rates[SIDES[1]]))
        print(f"  ratio ours / hand-written: {ratio:.2f}x (medians); "
              f"median of per-round ratios {paired:.2f}x", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line; unset sizes are filled in by `settle`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(IMAGE_MODELS + TEXT_MODELS),
                        help="comma-separated, from mobilenet_v2, resnet50, minilm "
                             "(default all three)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated Keras dtype policies "
                             "(default float32,mixed_float16)")
    parser.add_argument("--batch-size", type=int, help="batch size (GPU 64, CPU 8)")
    parser.add_argument("--rounds", type=int,
                        help="fits per side, interleaved; the median is reported (GPU 3, CPU 1)")
    parser.add_argument("--epochs", type=int,
                        help="epochs per fit, the first dropped (default 3 on GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, help="batches per epoch (GPU 20, CPU 2)")
    parser.add_argument("--size", type=int, help="image side in pixels (GPU 224, CPU 64)")
    parser.add_argument("--sequence-length", type=int,
                        help="tokens per sequence (GPU 128, CPU 32)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps (GPU 8, CPU 1) and epochs (2), one round")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [m for m in args.models if m not in IMAGE_MODELS + TEXT_MODELS]
    if unknown or not args.models:
        parser.error(f"--models received {args.models}; expected some of "
                     f"{IMAGE_MODELS + TEXT_MODELS}")
    bad = [p for p in args.precisions if p not in PRECISIONS]
    if bad or not args.precisions:
        parser.error(f"--precisions received {args.precisions}; expected some of {PRECISIONS}")
    return args


def settle(args: argparse.Namespace, has_gpu: bool) -> argparse.Namespace:
    """Fills unset sizes with the GPU or the small CPU values and checks them."""
    column = 0 if has_gpu else 1
    table = {**DEFAULTS, **(QUICK if args.quick else {})}
    for name, values in table.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2 (the first epoch of every fit is dropped)")
    for name in ("rounds", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.sequence_length < 3:
        raise SystemExit("--sequence-length must be >= 3 ([CLS], a word, [SEP])")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs every network at every precision and prints the tables.

    Returns:
        The exit status: 1 when the keras_transfer side of some
        configuration could not be timed, else 0.
    """
    args = parse_args(argv)
    # Random labels: the library's "training ended at chance" warning is expected;
    # TensorFlow's retracing warnings come from the recompile per round.
    logging.getLogger("keras_transfer").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    lines, has_gpu = backend_devices()
    args = settle(args, has_gpu)
    use_compilation_cache()
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"{os.cpu_count()} CPU cores")
    for line in lines:
        print(line)
    if not has_gpu:
        print(f"NO GPU FOUND: running the small CPU configuration ({args.size} px images, "
              f"{args.sequence_length}-token sequences, {args.steps} batches of "
              f"{args.batch_size} per epoch, {args.rounds} round(s)). These are NOT GPU "
              "figures: they only show that the script and both training paths run.")
    print(f"models={','.join(args.models)} precisions={','.join(args.precisions)} "
          f"batch={args.batch_size} steps/epoch={args.steps} classes={args.classes}; "
          f"{args.rounds} round(s) x {args.epochs} epochs per side, first epoch of each "
          "fit dropped")
    print_load()

    results = []
    start = time.perf_counter()
    try:
        for precision in args.precisions:
            keras.mixed_precision.set_global_policy(precision)
            for name in args.models:
                shape = (f"{args.size} px" if name in IMAGE_MODELS
                         else f"{args.sequence_length} tokens")
                print(f"\n{name} ({shape}), {precision}:", flush=True)
                result = measure(name, precision, args)
                report(result)
                results.append(result)
                keras.backend.clear_session()
                gc.collect()
    finally:
        keras.mixed_precision.set_global_policy("float32")

    print(f"\n{'network':<14}{'precision':<15}{'unit/s':<11}{'ours':>10}"
          f"{'hand-written':>14}{'ratio':>8}")
    for r in results:
        ours, hand, ratio = r.median(SIDES[0]), r.median(SIDES[1]), r.ratio()
        print(f"{r.name:<14}{r.precision:<15}{r.unit:<11}"
              f"{f'{ours:.1f}' if ours else '-':>10}{f'{hand:.1f}' if hand else '-':>14}"
              f"{f'{ratio:.2f}x' if ratio else '-':>8}")
    print(f"total {time.perf_counter() - start:.0f} s"
          + ("" if has_gpu else "; CPU figures, not GPU figures"))
    print_load(end=True)
    missing = [f"{r.name} {r.precision}" for r in results if r.note]
    if missing:
        print(f"keras_transfer could not be timed for: {', '.join(missing)} (see the NOTEs)")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
