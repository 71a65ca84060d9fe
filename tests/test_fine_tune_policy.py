"""FineTunePhase(policy="auto"): skip after a saturated probe, else more on images."""

import logging

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer import fine_tune_policy, routing, trainer
from keras_transfer.image_data import shift_augmentation


def small_model():
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, name="Conv1")(inputs)
    h = keras.layers.Conv2D(8, 3, strides=2, name="block_1_project")(h)
    outputs = keras.layers.Conv2D(16, 3, strides=2, name="block_2_project")(h)
    return kt.ImageTransferModel(keras.Model(inputs, outputs, name="small"), 3,
                                 preprocessing="tf", pooling="avg")


def separable_images():
    """Three classes of flat colours, 8 each: the probe separates them with certainty."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    x = np.zeros((24, 32, 32, 3), np.uint8)
    x[np.arange(24), ..., y] = 255
    x = np.clip(x.astype(int) + rng.integers(0, 8, x.shape), 0, 255).astype(np.uint8)
    return x, y


def test_saturated_probe_skips_fine_tuning_and_says_so(caplog):
    x, y = separable_images()
    model = small_model()
    with caplog.at_level(logging.INFO, logger="keras_transfer"):
        history = model.fit(x, y, verbose=0, seed=0)  # the defaults: head, then fine-tune
    head, fine_tune = history.phases
    assert fine_tune.details["policy"]["action"] == "skip"
    assert fine_tune.details["policy"]["held_out_log_loss_share"] < fine_tune_policy.SATURATED
    assert fine_tune.epochs_run == 0 and not model.backbone.network.trainable_weights
    assert "the probe is saturated" in caplog.text and "skipped" in caplog.text
    # Asked to, it runs anyway.
    before = [np.array(w) for w in model.backbone.network.weights]
    history = model.fit(x, y, verbose=0, seed=0, phases=[kt.FineTunePhase(
        epochs=1, learning_rate=1e-3, policy="always")])
    assert history.phases[0].epochs_run == 1 and "policy" not in history.phases[0].details
    assert any(not np.array_equal(a, np.array(b))
               for a, b in zip(before, model.backbone.network.weights))


def test_weak_probe_runs_the_stronger_recipe(tiny_images, monkeypatch):
    x, y = tiny_images  # random labels: the probe is at chance
    # A test-sized budget; the recipe's rate and translations are what is checked.
    monkeypatch.setattr(fine_tune_policy, "STRONG", {**fine_tune_policy.STRONG, "min_steps": 2})
    shifts = []

    def spy(share, seed=None):
        shifts.append(share)
        return shift_augmentation(share, seed)

    monkeypatch.setattr(trainer, "shift_augmentation", spy)
    model = small_model()
    history = model.fit(x, y, verbose=0, seed=0, batch_size=40)
    decision = history.phases[1].details["policy"]
    assert decision["action"] == "strong"
    assert decision["held_out_log_loss_share"] > fine_tune_policy.SATURATED
    assert history.phases[1].epochs_run == 3  # min_steps=2, at least 3 epochs
    assert history.phases[1].peak_learning_rate == fine_tune_policy.STRONG["learning_rate"]
    # The far domain's few images are shifted (digits: +0.014 over 3 seeds).
    assert shifts == [fine_tune_policy.STRONG["shift"]] and shifts[0] > 0
    # Explicit settings run as given.
    history = model.fit(x, y, verbose=0, seed=0, batch_size=40,
                        phases=[kt.FineTunePhase(epochs=1)])  # the probe's evidence is kept
    assert history.phases[0].details["policy"]["action"] == "as_given"
    assert history.phases[0].peak_learning_rate == 1e-5


def test_without_probe_evidence_the_phase_runs_as_configured(tiny_images):
    x, y = tiny_images
    model = small_model()
    history = model.fit(x, y, verbose=0, seed=0, phases=[
        kt.HeadPhase(solver="adam", epochs=1), kt.FineTunePhase(min_steps=1)])
    decision = history.phases[1].details["policy"]
    assert decision["action"] == "as_given" and "no probe evidence" in decision["reason"]
    assert history.phases[1].peak_learning_rate == 1e-5  # the gentle default


def test_shift_translates_the_training_images_only_without_fit_augmentation():
    x = np.zeros((4, 32, 32, 3), np.uint8)
    x[:, 12:20, 12:20] = 255  # a square in the middle
    y = np.arange(4) % 3
    model = small_model()

    def first_batch(shift, augmentation=None):
        data = trainer.FitData(model=model, train=routing.head_data(model, x, y),
                               validation=None, seed=0,  # one order: the seed
                               augmentation=augmentation)
        return np.asarray(next(iter(data.batches(shift)[0]))[0])

    plain, shifted = first_batch(0.0), first_batch(0.3)
    assert plain.shape == shifted.shape and not np.allclose(plain, shifted)
    # The square moved: its bright rows or columns are not all where they were.
    assert not np.array_equal(plain.max(axis=(2, 3)) > 128, shifted.max(axis=(2, 3)) > 128) \
        or not np.array_equal(plain.max(axis=(1, 3)) > 128, shifted.max(axis=(1, 3)) > 128)
    # fit's own augmentation replaces the phase's translations.
    identity = keras.layers.Identity()
    np.testing.assert_array_equal(first_batch(0.3, augmentation=identity), plain)
    with pytest.raises(ValueError, match="shift=0.5"):
        kt.FineTunePhase(shift=0.5)


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="policy='sometimes'.*'auto'.*'always'"):
        kt.FineTunePhase(policy="sometimes")
    assert kt.FineTunePhase.from_scratch().policy == "always"
