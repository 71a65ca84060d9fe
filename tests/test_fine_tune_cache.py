"""Fine-tuning the top of a network on its frozen bottom's cached outputs."""

import logging

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer import fine_tune_cache
from test_features import backbone_runs, cache_root, images  # noqa: F401 - fixtures


def residual_backbone(seed=0):
    """Two frozen convolutions, then a trained one added to the first (a skip across the cut).

    With `unfreeze=3` the top is `top_conv`, the BatchNormalization (frozen)
    and `last_conv`; two tensors cross the cut: `a` (to the Add) and `b`.
    """
    init = [keras.initializers.GlorotUniform(seed + i) for i in range(4)]
    inputs = keras.Input((16, 16, 3))
    a = keras.layers.Conv2D(8, 3, strides=2, padding="same", kernel_initializer=init[0])(inputs)
    b = keras.layers.Conv2D(8, 3, padding="same", activation="relu",
                            kernel_initializer=init[1])(a)
    c = keras.layers.Conv2D(8, 3, padding="same", kernel_initializer=init[2],
                            name="top_conv")(b)
    x = keras.layers.Add()([a, c])
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.5)(x)  # off: the network runs in inference mode
    x = keras.layers.Conv2D(6, 3, strides=2, kernel_initializer=init[3], name="last_conv")(x)
    return keras.Model(inputs, x, name="residual")


def model_pair():
    cached = kt.ImageTransferModel(residual_backbone(), 3, input_shape=(16, 16, 3),
                                   preprocessing="tf", pooling="avg")
    usual = kt.ImageTransferModel(residual_backbone(), 3, input_shape=(16, 16, 3),
                                  preprocessing="tf", pooling="avg")
    usual.set_weights(cached.get_weights())
    return cached, usual


def test_the_cut_holds_every_tensor_crossing_it():
    model, _ = model_pair()
    kt.training.unfreeze(model.backbone, 3)
    bottom = fine_tune_cache.FrozenBottom(model.backbone)
    layers = model.backbone.network.layers
    assert sorted(i for i, _ in bottom.cut) == [1, 2]  # a and b (layer 0 is the input)
    assert bottom.shapes == [(8, 8, 8), (8, 8, 8)]
    x, _ = images(4)
    rows = bottom(x.astype("float32"))
    features = bottom.top(rows)
    expected = model.backbone(x.astype("float32"), training=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(features),
                               keras.ops.convert_to_numpy(expected), atol=1e-6)


def test_fine_tuning_on_the_cached_bottom_equals_the_whole_network(backbone_runs, caplog):
    x, y = images(32)
    val = images(16, seed=1)
    cached, usual = model_pair()
    before = [np.array(w) for w in cached.backbone.weights]
    phase = dict(epochs=3, unfreeze=3, learning_rate=1e-3, warmup=0.0, restore_best=False)
    with caplog.at_level(logging.INFO, logger="keras_transfer"):
        history = cached.fit(x, y, validation_data=val, batch_size=8, shuffle=False,
                             phases=[kt.FineTunePhase(**phase)], verbose=0)
    assert sum(backbone_runs) == 32 + 16  # the bottom ran once over each split
    assert "frozen bottom ran once" in caplog.text and "2 cached output(s)" in caplog.text
    backbone_runs.clear()
    usual_history = usual.fit(x, y, validation_data=val, batch_size=8, shuffle=False,
                              phases=[kt.FineTunePhase(**phase, feature_cache=False)],
                              verbose=0)
    assert backbone_runs == []

    changed = [not np.allclose(a, np.array(b)) for a, b in zip(before, cached.backbone.weights)]
    assert any(changed)  # the top trained...
    layers = cached.backbone.network.layers
    assert not any(changed[:4])  # ...and not the two frozen convolutions
    np.testing.assert_allclose(history.history["loss"], usual_history.history["loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(history.history["val_loss"],
                               usual_history.history["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(cached.predict(x), usual.predict(x), atol=1e-5)
    assert history.phases[0].trainable_params == usual_history.phases[0].trainable_params
    assert layers[1].name in [layer.name for layer in cached.backbone.network.layers]

    # The same data, weights and cut again: the cached bottom is reused.
    cached.fit(x, y, batch_size=8, phases=[kt.FineTunePhase(epochs=1, unfreeze="top_conv")],
               verbose=0)
    assert backbone_runs == []


@pytest.mark.parametrize("case", ["augmentation", "all", "train_batchnorm"])
def test_nothing_changes_where_the_bottom_cannot_be_cached(case, backbone_runs, caplog):
    x, y = images(16)
    model, _ = model_pair()
    options = {"augmentation": {}, "all": {}, "train_batchnorm": {"train_batchnorm": True}}
    phase = kt.FineTunePhase(epochs=1, unfreeze="all" if case == "all" else 3,
                             **options[case])
    fit_options = {"augmentation": kt.default_augmentation()} if case == "augmentation" else {}
    with caplog.at_level(logging.INFO, logger="keras_transfer"):
        model.fit(x, y, batch_size=8, phases=[phase], verbose=0, **fit_options)
    assert backbone_runs == []
    assert ("whole network runs every step" in caplog.text) == (case != "all")
    why = {"augmentation": "augmentation is random", "all": "no bottom is frozen",
           "train_batchnorm": "training mode"}[case]
    with pytest.raises(ValueError, match=f"feature_cache=True.*{why}"):
        model.fit(x, y, batch_size=8, verbose=0, **fit_options,
                  phases=[kt.FineTunePhase(epochs=1, unfreeze=phase.unfreeze,
                                           feature_cache=True, **options[case])])


def test_bad_feature_cache_option_says_what_was_received():
    with pytest.raises(ValueError, match="feature_cache='yes'"):
        kt.FineTunePhase(feature_cache="yes")
