"""Mixed precision: a Keras dtype policy set before the model is built trains both phases.

The backbone computes in the policy's dtype (bfloat16 on CPU and TPU, float16 on GPU); the
heads' logits, the loss, the cached features and the probe stay float32, as Keras advises for
the last layer.
"""

import keras
import numpy as np
import pytest

import keras_transfer as kt
from test_head_phase import images  # learnable 16x16 images of 3 classes


@pytest.fixture
def mixed_bfloat16():
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield
    keras.config.set_dtype_policy(before)


def conv_backbone():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    return keras.Model(inputs, x, name="conv")


def test_both_phases_train_in_bfloat16_with_float32_logits(mixed_bfloat16):
    x, y = images(60)
    model = kt.ImageTransferModel(conv_backbone(), 3, preprocessing="tf", pooling="avg")
    assert model.backbone.network.compute_dtype == "bfloat16"
    assert model.head.layers[-1].compute_dtype == "float32"
    history = model.fit(x, y, batch_size=12, seed=0, verbose=0, phases=[
        kt.HeadPhase(), kt.FineTunePhase(epochs=2, learning_rate=1e-4, warmup=0.0)])
    assert [p.name for p in history.phases] == ["head", "fine_tune"]
    assert all(np.isfinite(history.history["loss"]))
    # Variables stay float32 (the policy's variable dtype); the outputs are float32.
    assert {w.dtype for w in model.weights} == {"float32"}
    assert keras.backend.standardize_dtype(model(x[:4]).dtype) == "float32"
    probabilities = model.predict(x)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(probabilities.argmax(1) == y) > 0.9
