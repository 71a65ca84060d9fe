"""The head phase: linear heads solved by the probe on cached features, others by Adam."""

import keras
import numpy as np
import pytest
try:
    import tensorflow as tf
except ImportError:  # a run on another backend without TensorFlow: its tests are marked
    tf = None

import keras_transfer as kt
from keras_transfer.data import held_out_split
from keras_transfer.probe import fit_linear_probe


def tiny_backbone(seed=0):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    return keras.Model(inputs, x, name="tiny")


def images(n=48, seed=0):
    """Images whose class shows in the mean of one colour channel: learnable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 120, (n, 16, 16, 3))
    x[np.arange(n), :, :, y] += 120
    return x.astype(np.uint8), y


def tiny_model(**kwargs):
    return kt.ImageTransferModel(tiny_backbone(), 3, preprocessing="tf", **kwargs)


def test_the_default_head_phase_is_the_probe_on_the_cached_features():
    x, y = images()
    model = tiny_model(pooling="avg")
    history = model.fit(x, y, head_epochs=7, batch_size=8, seed=3, verbose=0)
    record = history.phases[0]
    assert (record.name, record.epochs_run) == ("head", 1)
    details = record.details["head"]
    assert details["solver"] == "probe" and details["converged"] and details["C"] > 0
    # The features exactly as the probe saw them: the cache `fit` wrote, pooled.
    features = kt.extract_features(model, x, y, batch_size=8).load()[0].mean(axis=(1, 2))
    direct = fit_linear_probe(features, y, "classification", 3, seed=3)
    kernel, bias = model.head.layers[-1].get_weights()
    # float32 weights against the float64 solve: the solver's tolerance, not bits.
    np.testing.assert_allclose(kernel, direct.kernel, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(bias, direct.bias, rtol=1e-3, atol=1e-4)
    assert history.history["accuracy"][0] == pytest.approx(
        np.mean(direct.predict(features).argmax(1) == y))
    # The same data and seed choose the same regularisation: the same head.
    again = tiny_model(pooling="avg")
    again.set_weights([np.zeros_like(w) if i >= len(model.backbone.weights) else w
                       for i, w in enumerate(model.get_weights())])
    again.fit(x, y, head_epochs=1, batch_size=8, seed=3, verbose=0)
    np.testing.assert_array_equal(again.head.get_weights()[0], kernel)


@pytest.mark.tensorflow
def test_the_folded_standardisation_serves_the_same_probabilities(tmp_path):
    x, y = images(seed=1)
    model = tiny_model()  # a Flatten head on features in the hundreds
    model.fit(x, y, head_epochs=1, batch_size=8, verbose=0)
    assert model.evaluate(x, y)["accuracy"] > 0.9
    path = model.export(str(tmp_path / "export"))
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(served["probabilities"].numpy(), model.predict(x), atol=1e-5)


def test_class_weights_reach_the_probe():
    x, y = images(seed=2)
    plain, weighted = tiny_model(pooling="avg"), tiny_model(pooling="avg")
    weighted.set_weights(plain.get_weights())
    plain.fit(x, y, head_epochs=1, batch_size=8, verbose=0)
    weighted.fit(x, y, head_epochs=1, batch_size=8, verbose=0, class_weight={0: 5.0})
    assert not np.allclose(plain.head.get_weights()[0], weighted.head.get_weights()[0])


def test_heads_with_hidden_layers_train_with_adam_while_solved_heads_stay():
    x, y = images(seed=3)
    model = kt.MultiTaskModel(tiny_backbone(), {
        "linear": kt.Head(3, pooling="avg"), "deep": kt.Head(3, pooling="avg", hidden_units=(8,))},
        preprocessing="tf")
    history = model.fit({"linear": (x, y), "deep": (x, y)}, head_epochs=3, batch_size=8,
                        seed=3, verbose=0)  # the probe's repeated fold splits follow the seed
    record = history.phases[0]
    assert list(record.details) == ["linear"] and record.epochs_run == 3
    # The features exactly as the probe saw them: the cache `fit` wrote, pooled.
    cache = kt.extract_features(model, x, y, head="linear", batch_size=8)
    features = cache.load()[0].mean(axis=(1, 2))
    direct = fit_linear_probe(features, y, "classification", 3, seed=3)
    np.testing.assert_allclose(model.heads["linear"].layers[-1].get_weights()[0], direct.kernel,
                               rtol=1e-4, atol=1e-5)  # untouched by the Adam epochs
    assert model.heads["linear"].trainable


def test_held_out_split_is_stratified_and_deterministic():
    labels = np.repeat([0, 1, 2], [50, 20, 2])
    kept, held = held_out_split(labels, "classification", 0.2, seed=1)
    assert np.bincount(labels[held], minlength=3).tolist() == [10, 4, 0]
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(72))
    again = held_out_split(labels, "classification", 0.2, seed=1)
    np.testing.assert_array_equal(again[1], held)
    assert not np.array_equal(held_out_split(labels, "classification", 0.2, seed=2)[1], held)
    assert len(held_out_split(np.zeros((40, 3)), "multilabel", 0.2, seed=0)[1]) == 8
    assert held_out_split(np.arange(10) % 2, "classification", 0.2) is None  # too few


def test_validation_split_stops_adam_heads_on_held_out_examples():
    x, _ = images(n=60, seed=5)
    y = np.random.default_rng(0).integers(0, 3, 60)  # noise: the head can only overfit
    model = tiny_model(pooling="avg", hidden_units=(32,))
    history = model.fit(x, y, phases=[kt.HeadPhase(learning_rate=0.01, validation_split=0.2)],
                        batch_size=8, seed=2, verbose=0)
    record = history.phases[0]
    _, held = held_out_split(y, "classification", 0.2, seed=2)  # a fifth of each class
    assert record.details["held_out"] == {"head": {"rows": len(held), "of": 60}}
    assert 11 <= len(held) <= 13
    losses = history.history["val_loss"]
    assert record.stopped_early and len(losses) == record.epochs_run
    assert np.argmin(losses) < len(losses) - 1
    # The weights kept are those of the best held-out epoch, not the last one.
    features = kt.extract_features(model, x, y, batch_size=8).load()[0][held]
    logits = model.head(features)
    held_loss = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(
        y[held], logits, from_logits=True)).mean()
    assert held_loss == pytest.approx(min(losses), rel=1e-4)
    # Not by default, and not over validation data the user gave.
    default = tiny_model(pooling="avg", hidden_units=(8,)).fit(
        x, y, phases=[kt.HeadPhase(epochs=2)], batch_size=8, verbose=0)
    assert "held_out" not in default.phases[0].details and "val_loss" not in default.history
    with_validation = tiny_model(pooling="avg", hidden_units=(8,)).fit(
        x[:48], y[:48], validation_data=(x[48:], y[48:]), verbose=0,
        phases=[kt.HeadPhase(epochs=2, validation_split=0.2)], batch_size=8)
    assert "held_out" not in with_validation.phases[0].details
    for bad in (0, 1.0, True, "0.2"):
        with pytest.raises(ValueError, match="validation_split"):
            kt.HeadPhase(validation_split=bad)
    with pytest.raises(ValueError, match="feature_cache=False"):
        kt.HeadPhase(validation_split=0.2, feature_cache=False)


def test_adam_when_asked_and_the_probe_only_where_it_applies():
    x, y = images(seed=4)
    history = tiny_model(pooling="avg").fit(
        x, y, phases=[kt.HeadPhase(epochs=2, solver="adam")], batch_size=8, verbose=0)
    assert history.phases[0].epochs_run == 2 and history.phases[0].details == {}
    with pytest.raises(ValueError, match="solver='probe' for head 'head' with hidden layers"):
        tiny_model(hidden_units=(4,)).fit(x, y, phases=[kt.HeadPhase(solver="probe")],
                                         verbose=0)
    with pytest.raises(ValueError, match="solver=probe with random augmentation"):
        tiny_model().fit(x, y, phases=[kt.HeadPhase(solver="probe")],
                         augmentation=keras.layers.RandomFlip(), verbose=0)
    with pytest.raises(ValueError, match="solver='probe' with feature_cache=False"):
        kt.HeadPhase(solver="probe", feature_cache=False)
    with pytest.raises(ValueError, match="solver='newton'"):
        kt.HeadPhase(solver="newton")


def test_non_finite_inputs_are_named_before_anything_runs():
    x, y = images(seed=5)
    x = x.astype("float32")
    x[7] = np.nan
    with pytest.raises(kt.DataError, match=r"NaN or infinite pixels, at positions \[7\]"):
        tiny_model().fit(x, y, head_epochs=1, verbose=0)


def test_regression_and_multilabel_heads_are_probed_too():
    x, y = images(seed=6)
    targets = np.eye(3)[y].astype("float32")
    multilabel = tiny_model(kind="multilabel", pooling="avg")
    history = multilabel.fit(x, targets, head_epochs=1, batch_size=8, verbose=0)
    assert history.phases[0].details["head"]["kind"] == "multilabel"
    assert multilabel.evaluate(x, targets)["binary_accuracy"] > 0.9
    values = x.reshape(len(x), -1, 3).mean(axis=1) / 255.0
    regression = tiny_model(kind="regression", pooling="avg")
    regression = kt.ImageTransferModel(tiny_backbone(), 3, kind="regression", pooling="avg",
                                       preprocessing="tf")
    regression.fit(x, values, head_epochs=1, batch_size=8, verbose=0)
    assert regression.evaluate(x, values)["mae"] < 0.05


# ------------------------------------------------------------ fine-tuning
def test_the_default_fine_tune_budget_is_counted_in_steps():
    phase = kt.FineTunePhase()
    assert phase.epochs_for(steps_per_epoch=4) == 25  # 100 steps
    assert phase.epochs_for(steps_per_epoch=300) == 3  # at least three passes
    assert kt.FineTunePhase(epochs=3).epochs_for(4) == 3  # what the user asked
    assert kt.FineTunePhase(min_steps=10).epochs_for(4) == 3


def test_a_fine_tune_that_hurts_is_rolled_back_to_the_best_epoch():
    x, y = images(seed=7)
    vx, vy = images(24, seed=8)
    model = tiny_model(pooling="avg")
    model.fit(x, y, head_epochs=1, batch_size=8, verbose=0)
    before = [np.array(w) for w in model.get_weights()]
    probe_loss = model.evaluate(vx, vy)["loss"]

    class Saboteur(keras.callbacks.Callback):
        """Scrambles the head before every epoch: each epoch ends worse than the probe."""

        def on_epoch_begin(self, epoch, logs=None):
            dense = self.model.head.layers[-1]
            noise = np.random.default_rng(epoch).normal(0, 5, dense.kernel.shape)
            dense.kernel.assign(np.asarray(dense.kernel) + noise.astype("float32"))

    history = model.fit(x, y, validation_data=(vx, vy), batch_size=8, verbose=0,
                        callbacks=[Saboteur()],
                        phases=[kt.FineTunePhase(epochs=3, warmup=0.0)])
    record = history.phases[0]
    assert min(history.history["val_loss"]) > probe_loss
    assert record.details["restored"] == "the weights before this phase"
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert model.evaluate(vx, vy)["loss"] == pytest.approx(probe_loss, rel=1e-6)


def test_restore_best_can_be_turned_off():
    x, y = images(seed=9)
    model = tiny_model(pooling="avg")
    history = model.fit(x, y, validation_data=(x[:8], y[:8]), batch_size=8, verbose=0, phases=[
        kt.HeadPhase(), kt.FineTunePhase(epochs=2, learning_rate=0.5, restore_best=False)])
    assert "restored" not in history.phases[1].details
