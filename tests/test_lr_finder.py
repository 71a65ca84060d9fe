"""The learning-rate finder: the curve, the suggestion, and the model left bit-identical."""

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer.lr_finder import FinderError, summarise


def small_model():
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, name="Conv1")(inputs)
    h = keras.layers.BatchNormalization(name="bn_Conv1")(h)
    outputs = keras.layers.Conv2D(16, 3, strides=2, name="block_1_project")(h)
    return kt.ImageTransferModel(keras.Model(inputs, outputs, name="small"), 3,
                                 preprocessing="tf", pooling="avg")


def values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def test_finder_leaves_weights_optimizer_and_flags_bit_identical(tiny_images, tmp_path):
    x, y = tiny_images
    model = small_model()
    # Adam's moments and step are non-zero after this: the state to keep.
    model.fit(x, y, phases=[kt.HeadPhase(solver="adam", epochs=1)], verbose=0, batch_size=16)
    optimizer = model.optimizer
    weights, slots = values(model.variables), values(optimizer.variables)
    trainable = [w.path for w in model.trainable_weights]
    found = model.find_learning_rate(x, y, unfreeze="all", steps=12, start=1e-5, end=10.0,
                                     batch_size=16, plot=str(tmp_path / "lr.png"))
    assert (tmp_path / "lr.png").stat().st_size > 0
    for before, after in zip(weights, values(model.variables)):
        np.testing.assert_array_equal(before, after)
    assert model.optimizer is optimizer
    for before, after in zip(slots, values(optimizer.variables)):
        np.testing.assert_array_equal(before, after)
    assert [w.path for w in model.trainable_weights] == trainable
    assert not model.backbone.network.trainable_weights
    assert 2 <= len(found.rates) <= 12 and np.all(np.diff(found.rates) > 0)
    assert found.rates[0] == pytest.approx(1e-5)
    assert found.rates[0] <= found.suggestion <= found.minimum_rate
    # The finder trained: the loss moved from its first value.
    assert np.ptp(found.losses) > 0


def test_suggestion_is_the_steepest_fall_before_the_minimum():
    rates = np.logspace(-6, 0, 61)
    # Flat, falls fastest around 1e-3, minimum near 1e-2, then blows up.
    losses = 2 / (1 + (rates / 1e-3) ** 2) + (rates > 0.05) * 100 * rates
    found = summarise(rates, losses, smoothing=0.0)
    assert found.suggestion == pytest.approx(1e-3, rel=0.3)
    assert 5e-3 < found.minimum_rate < 0.06


def test_finder_refuses_nothing_to_train_and_bad_settings(tiny_images):
    x, y = tiny_images
    model = small_model()
    model.trainable = False
    with pytest.raises(FinderError, match="nothing to train.*unfreeze='all'"):
        model.find_learning_rate(x, y, steps=5)
    assert model.trainable is False
    for bad in (dict(start=1e-2, end=1e-4), dict(steps=2), dict(start=0.0),
                dict(smoothing=1.0)):
        with pytest.raises(FinderError):
            model.find_learning_rate(x, y, **bad)


@pytest.mark.large  # a registry backbone: tens of seconds of tracing
def test_lr_find_command(image_folder, tmp_path, capsys):
    from keras_transfer.cli import main

    plot = tmp_path / "curve.png"
    code = main(["lr-find", str(image_folder), "--backbone", "mobilenet_v2", "--weights",
                 "none", "--image-size", "32", "--steps", "6", "--batch-size", "8",
                 "--unfreeze", "none",
                 "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0 and "Suggested learning rate:" in out and plot.stat().st_size > 0
