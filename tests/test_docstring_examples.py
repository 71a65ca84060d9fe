"""Runs the `>>>` examples of the package's docstrings, one test per docstring.

Docstrings are found by walking every `keras_transfer` submodule (so code
that moves between modules keeps its test) plus every object of
`keras_transfer.__all__`, with `doctest.DocTestFinder`; each docstring with
examples becomes one test named after it. The examples share a namespace of
small offline fixtures (`FIXTURES`), built only when a docstring names
them, and run in a temporary working folder, so files they write (plots,
exports) go there. Lines that need the network or long training carry
`# doctest: +SKIP`.
"""

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
import tensorflow as tf

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
# Each fixture is a function of no arguments; those decorated with
# `functools.cache` are shared (never changed by an example), the others
# (models) are built fresh for every docstring that names them.
def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@functools.cache
def _x():
    return _images(24, 0)


@functools.cache
def _y():
    return np.arange(24) % 3


def _model():
    keras.utils.set_random_seed(0)
    return kt.ImageTransferModel("mobilenet_v2", num_classes=3, weights=None,
                                 input_shape=(32, 32, 3), pooling="avg", class_names=NAMES)


NAMES = ["cat", "dog", "fox"]
TEXTS = ["the food was great", "the service was bad", "very nice food",
         "awful slow service", "good food", "the food was awful"] * 2

FIXTURES = {
    "kt": lambda: kt,
    "np": lambda: np,
    "keras": lambda: keras,
    "tf": lambda: tf,
    "keras_hub": lambda: importlib.import_module("keras_hub"),
    "x": _x,
    "y": _y,
    "images": _x,
    "x_train": lambda: _x()[:16],
    "y_train": lambda: _y()[:16],
    "x_test": lambda: _x()[16:],
    "y_test": lambda: _y()[16:],
    "names": lambda: NAMES,
    "x1": lambda: _images(12, 1),
    "y1": lambda: np.arange(12) % 10,
    "x2": lambda: _images(8, 2),
    "y2": lambda: (np.arange(40).reshape(8, 5) % 3 == 0).astype("float32"),
    "texts": lambda: TEXTS,
    "labels": lambda: np.array([1, 0, 1, 0, 1, 0] * 2),
    "model": _model,
}


def _namespace(test: doctest.DocTest) -> dict:
    source = "\n".join(example.source for example in test.examples)
    used = set(re.findall(r"[A-Za-z_]\w*", source))
    return {name: FIXTURES[name]() for name in used & FIXTURES.keys()}


@pytest.mark.parametrize("test", DOCSTRINGS, ids=[t.name for t in DOCSTRINGS])
def test_docstring_examples(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files the examples write go here
    test = copy.copy(test)
    test.globs = {**test.globs, **_namespace(test)}
    report = []
    result = doctest.DocTestRunner(optionflags=FLAGS).run(test, out=report.append)
    assert not result.failed, "".join(report)
