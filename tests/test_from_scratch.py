"""Random weights are trained end to end, and a run that ends at chance says so."""

import logging

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer import phases, trainer


def small_model(**kwargs):
    options = dict(weights=None, input_shape=(32, 32, 3), pooling="avg")
    options.update(kwargs)
    return kt.ImageTransferModel("mobilenet_v2", 3, **options)


def coloured_images(n=12, seed=0):
    """Images whose class is their dominant colour: learnable from one batch."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
    x[np.arange(n), :, :, y] += 180
    return x, y


def test_pretrained_flag_follows_the_weights():
    assert not small_model().backbone.pretrained
    config = small_model().get_config()
    assert not kt.ImageTransferModel.from_config(config).backbone.pretrained
    inputs = keras.Input((32, 32, 3))
    mine = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    assert kt.ImageTransferModel(mine, 3).backbone.pretrained  # a user's model keeps its weights


def test_default_phases_depend_on_the_weights(capsys):
    assert phases.resolve_phases() == [kt.HeadPhase(), kt.FineTunePhase()]
    assert phases.resolve_phases(pretrained=False, verbose=True) == \
        [kt.FineTunePhase.from_scratch()]
    assert "end to end from scratch" in capsys.readouterr().out
    # What the user asks for is run as asked, random weights or not.
    assert phases.resolve_phases(head_epochs=2, pretrained=False) == [kt.HeadPhase(epochs=2)]
    phase = kt.FineTunePhase.from_scratch()
    assert (phase.learning_rate, phase.train_batchnorm, phase.batchnorm_momentum,
            phase.name) == (1e-3, True, 0.9, "from_scratch")
    assert kt.FineTunePhase.from_scratch(epochs=3).epochs == 3


def test_fit_trains_a_random_backbone_end_to_end_by_default(caplog, monkeypatch):
    # The default budget (100 steps) cut to one: the wiring is what is tested.
    full = kt.FineTunePhase.from_scratch
    monkeypatch.setattr(kt.FineTunePhase, "from_scratch",
                        lambda **options: full(**{"epochs": 1, **options}))
    x, y = coloured_images(8)
    model = small_model()
    network = model.backbone.network
    first_bn = network.get_layer("bn_Conv1")
    assert first_bn.momentum == 0.999  # keras.applications' MobileNetV2
    conv = keras.Model(network.inputs, network.get_layer("Conv1").output)
    batch_mean = np.asarray(conv(model.backbone.network_inputs(x.astype("float32")))).mean(
        axis=(0, 1, 2))
    with caplog.at_level(logging.INFO, logger="keras_transfer"):
        history = model.fit(x, y, batch_size=8, shuffle=False, verbose=0)  # one step
    assert [(p.name, p.epochs_run) for p in history.phases] == [("from_scratch", 1)]
    assert "end to end from scratch" in caplog.text
    record = history.phases[0]
    bn = [layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization)]
    moving = sum(2 * int(layer.moving_mean.shape[0]) for layer in bn)
    # Every weight trains; only the BatchNorm moving statistics are not trainable.
    assert record.peak_learning_rate == 1e-3 and record.frozen_params == moving
    # BatchNorm trained at momentum 0.9: one step from a moving mean of 0
    # leaves (1 - 0.9) * the batch mean (0.999 would leave a hundredth of it).
    np.testing.assert_allclose(np.asarray(first_bn.moving_mean), 0.1 * batch_mean,
                               rtol=1e-3, atol=1e-6)
    assert first_bn.momentum == 0.999  # given back after the phase


def test_batchnorm_momentum_is_checked():
    with pytest.raises(ValueError, match="train_batchnorm=True"):
        kt.FineTunePhase(batchnorm_momentum=0.9)
    with pytest.raises(ValueError, match="batchnorm_momentum=1.5"):
        kt.FineTunePhase(train_batchnorm=True, batchnorm_momentum=1.5)


def test_a_head_phase_on_random_weights_warns(caplog):
    x, y = coloured_images()
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        small_model().fit(x, y, head_epochs=1, batch_size=4, verbose=0)
    assert "random weights" in caplog.text and "not transfer learning" in caplog.text
    caplog.clear()
    inputs = keras.Input((32, 32, 3))
    mine = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        kt.ImageTransferModel(mine, 3, pooling="avg").fit(x, y, head_epochs=1, verbose=0)
    assert "random weights" not in caplog.text


def test_training_that_ends_at_chance_says_so(caplog, capsys):
    # Identical images: every prediction is the same class, so the accuracy is
    # one class's share, whatever the training does.
    x = np.zeros((12, 32, 32, 3), np.uint8)
    y = np.arange(12) % 3
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        small_model().fit(x, y, validation_data=(x[:6], y[:6]), head_epochs=1, verbose=1)
    warnings = [r.message for r in caplog.records if "ended at chance" in r.message]
    assert len(warnings) == 2
    assert "final training accuracy 0.333" in warnings[0] and "scores 0.333" in warnings[0]
    assert "final validation accuracy" in warnings[1]
    assert "Warning: training ended at chance" in capsys.readouterr().out


def test_chance_is_the_majority_share_not_one_over_k(caplog):
    # 9 of 12 labels are class 0: answering 0 everywhere scores 0.75, far
    # above 1/3, and is still chance.
    x = np.zeros((12, 32, 32, 3), np.uint8)
    y = np.array([0] * 9 + [1, 2, 1])
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        history = small_model().fit(x, y, head_epochs=1, verbose=0)
    assert history.history["accuracy"][-1] == pytest.approx(0.75)
    assert "scores 0.750" in caplog.text


def test_learnable_data_gives_no_chance_warning(caplog):
    x, y = coloured_images()
    inputs = keras.Input((32, 32, 3))
    colours = keras.Model(inputs, keras.layers.AveragePooling2D(8)(inputs))
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        history = kt.ImageTransferModel(colours, 3, pooling="avg").fit(x, y, head_epochs=1,
                                                                        verbose=0)
    assert history.history["accuracy"][-1] > 0.9
    assert "chance" not in caplog.text


def test_majority_share():
    head = kt.Head(3)
    assert trainer.majority_share([0, 0, 1, 2], head) == 0.5
    assert trainer.majority_share(np.eye(3)[[1, 1, 1, 0]], head) == 0.75
    assert trainer.majority_share(None, head) == pytest.approx(1 / 3)
