"""Nothing silent: wrong input gets a clear error or a warning, never a wrong result (issue #10).

Each test here failed on the code before the issue was fixed: the input
was silently misread (truncated labels, class names matched by position, one
image read as many) or failed with a raw NumPy or TensorFlow error.
"""

import logging

import keras
import numpy as np
import pytest

import keras_transfer as kt

keras_hub = pytest.importorskip("keras_hub")

from test_text import TEXTS, tiny_bert  # noqa: E402


def tiny_backbone():
    """A one-layer image backbone: builds in a blink."""
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(inputs)
    return keras.Model(inputs, outputs, name="tiny")


def image_model(num_classes=3, **kwargs):
    return kt.ImageTransferModel(tiny_backbone(), num_classes, pooling="avg", **kwargs)


def text_model(num_classes=2, **kwargs):
    backbone, preprocessor = tiny_bert()
    return kt.TextTransferModel(backbone, num_classes, preprocessor=preprocessor,
                                sequence_length=8, **kwargs)


def labels_of(model, x, y):
    """The labels a model trains on for (x, y), as one array."""
    made = model.make_dataset(x, y, batch_size=4)
    dataset = made[0] if isinstance(made, tuple) else made
    return np.concatenate([np.asarray(batch[1]) for batch in dataset])


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 32, 32, 3)).astype("uint8")


# ------------------------------------------------------------------ labels
@pytest.mark.parametrize("targets", [[0.25, 2.75, -1.5], ["0.25", "2.75", "-1.5"]])
def test_text_regression_targets_stay_floats(targets):
    model = text_model(1, kind="regression")
    labels = labels_of(model, TEXTS[:3], targets)
    np.testing.assert_allclose(labels.reshape(-1), [0.25, 2.75, -1.5])


def test_one_hot_text_labels_are_class_indices():
    model = text_model(3)
    indices = [2, 0, 1, 2, 1, 0]
    labels = labels_of(model, TEXTS[:6], np.eye(3)[indices])
    assert labels.tolist() == indices


@pytest.mark.parametrize("bad, message", [
    (0.9, "not whole numbers: \\[0.9\\]"),
    (float("nan"), "NaN or infinite labels at positions \\[1\\]"),
])
@pytest.mark.parametrize("kind", ["text", "image"])
def test_fractional_and_nan_class_labels_are_refused(kind, bad, message, images):
    y = [1.0, bad, 0.0, 1.0]
    with pytest.raises(kt.DataError, match=message):
        if kind == "text":
            text_model().fit(TEXTS[:4], y, head_epochs=1, verbose=0)
        else:
            image_model(2).fit(images[:4], y, head_epochs=1, verbose=0)


def test_image_string_labels_map_to_class_names(images):
    model = image_model(2)
    names = ["dog", "cat", "cat", "dog"] * 3
    model.fit(images, names, head_epochs=1, verbose=0)
    assert model.class_names == ["cat", "dog"]
    assert labels_of(model, images, names).tolist() == [1, 0, 0, 1] * 3
    with pytest.raises(kt.DataError, match="\\['fox'\\] that are not among the class names"):
        model.fit(images[:2], ["cat", "fox"], head_epochs=1, verbose=0)


def test_non_utf8_bytes_texts_are_refused():
    with pytest.raises(kt.DataError, match="bytes text that is not UTF-8"):
        text_model().fit([b"good food", b"\xff\xfe bad"], [1, 0], head_epochs=1, verbose=0)


def test_string_regression_targets_of_a_multitask_model(images):
    model = kt.MultiTaskModel(tiny_backbone(), tasks={
        "kind": kt.Head(2, pooling="avg"),
        "size": kt.Head(1, kind="regression", pooling="avg")})
    sizes = ["1.5", "-2", "0.25", "3"] * 3
    batches = model.head_dataset("size", images, sizes, batch_size=4)
    labels = np.concatenate([np.asarray(targets) for _, targets in batches])
    np.testing.assert_allclose(labels.reshape(-1), [float(s) for s in sizes])
    model.fit({"kind": (images, [0, 1] * 6), "size": (images, sizes)}, head_epochs=1, verbose=0)
    with pytest.raises(kt.DataError, match="Head 'size'.*\\['big', 'small'.*expected numbers"):
        model.fit({"size": (images, ["big", "small"] * 6)}, head_epochs=1, verbose=0)


def test_single_task_text_model_trains_on_multilabel_targets():
    model = text_model(3, kind="multilabel")
    targets = np.random.default_rng(0).integers(0, 2, (len(TEXTS), 3))
    history = model.fit(TEXTS, targets, head_epochs=1, fine_tune_epochs=1, batch_size=8,
                        verbose=0)
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    probabilities = model.predict(TEXTS[:4])
    assert probabilities.shape == (4, 3)
    assert ((probabilities > 0) & (probabilities < 1)).all()
    assert set(model.evaluate(TEXTS, targets)) >= {"loss", "binary_accuracy"}


# ------------------------------------------------------------------ images
def test_one_image_without_a_batch_axis_is_refused(images):
    model = image_model()
    with pytest.raises(kt.DataError, match="one RGB image.*x\\[np.newaxis\\]"):
        model.predict(images[0])
    with pytest.raises(kt.DataError, match="one grayscale image.*x\\[np.newaxis\\]"):
        model.predict(images[0, :, :, :1])
    assert model.predict(images[0][np.newaxis]).shape == (1, 3)


def test_pixels_scaled_to_0_1_warn_once_per_call(images, caplog):
    model = image_model()
    y = np.arange(12) % 3
    scaled = images.astype("float32") / 255.0

    def warnings():
        found = [r.getMessage() for r in caplog.records
                 if r.levelno == logging.WARNING and "0-255" in r.getMessage()]
        caplog.clear()
        return found

    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        model.fit(scaled, y, validation_data=(scaled, y), head_epochs=1, fine_tune_epochs=1,
                  batch_size=4, verbose=0)
        found = warnings()
        assert len(found) == 1 and "x * 255" in found[0]
        model.predict(scaled)
        assert len(warnings()) == 1  # again in the next call
        model.fit(images, y, head_epochs=1, verbose=0)
        model.predict(images.astype("float32"))
        assert warnings() == []


@pytest.mark.parametrize("input_shape", [32.7, "abc", -5, 0, (32.5, 32, 3), (32, "32"),
                                         True, (32, 32, 3, 1)])
def test_input_shape_must_be_positive_whole_numbers(input_shape):
    with pytest.raises(kt.BackboneError, match="Received input_shape=.*positive int"):
        kt.ImageTransferModel("mobilenet_v2", 2, weights=None, input_shape=input_shape)
    with pytest.raises(kt.BackboneError, match="Received input_shape=.*positive int"):
        kt.ImageTransferModel(tiny_backbone(), 2, input_shape=input_shape)


def test_input_shape_as_an_int_side_or_a_pair():
    assert kt.get_backbone_spec("mobilenet_v2").check_input_shape(np.int64(40)) == (40, 40, 3)
    assert kt.get_backbone_spec("mobilenet_v2").check_input_shape([40, 48]) == (40, 48, 3)


# -------------------------------------------------------------------- text
def test_sequence_length_beyond_the_backbone_fails_at_construction():
    backbone, preprocessor = tiny_bert()  # max_sequence_length=16
    with pytest.raises(kt.BackboneError, match="sequence_length=100000.*at most 16 tokens"):
        kt.TextTransferModel(backbone, 2, preprocessor=preprocessor, sequence_length=100000)
    model = kt.TextTransferModel(backbone, 2, preprocessor=preprocessor, sequence_length=16)
    assert model.predict(["the food was great"]).shape == (1, 2)


# ---------------------------------------------------------------- training
def test_epochs_together_with_fine_tune_epochs_is_an_error(images):
    with pytest.raises(ValueError, match="epochs=2.*fine_tune_epochs"):
        image_model().fit(images, np.arange(12) % 3, epochs=2, fine_tune_epochs=3, verbose=0)


@pytest.mark.parametrize("phase", [kt.HeadPhase, kt.FineTunePhase])
@pytest.mark.parametrize("patience", [-1, 0, 1.5])
def test_early_stopping_must_be_a_positive_patience(phase, patience):
    with pytest.raises(ValueError, match=f"early_stopping={patience}"):
        phase(early_stopping=patience)


def test_an_exploding_loss_stops_and_restores_the_weights(images):
    keras.utils.set_random_seed(0)
    model = image_model()
    before = [np.array(w) for w in model.heads["head"].weights]
    with pytest.raises(kt.TrainingDivergedError, match="exploded to .* in the 'head' phase"):
        model.fit(images, np.arange(12) % 3, batch_size=4, verbose=0,
                  phases=[kt.HeadPhase(epochs=5, learning_rate=1e4, solver="adam")])
    for old, new in zip(before, model.heads["head"].weights):
        np.testing.assert_array_equal(old, np.array(new))
