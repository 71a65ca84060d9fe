"""Gradual unfreezing, the one-cycle schedule, weight decay and gradient accumulation."""

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer.schedules import adam_for, one_cycle


def four_blocks():
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(4, 3, strides=2, name="Conv1")(inputs)  # 112 parameters
    for block in (1, 2, 3):
        h = keras.layers.Conv2D(4, 3, name=f"block_{block}_project")(h)  # 148 each
    return kt.ImageTransferModel(keras.Model(inputs, h, name="four"), 3, preprocessing="tf",
                                 pooling="avg")


def test_gradual_unfreezing_trains_more_blocks_at_each_stage(tiny_images):
    x, y = tiny_images
    model = four_blocks()
    head = 4 * 3 + 3
    history = model.fit(x[:16], y[:16], batch_size=16, verbose=0, phases=[
        kt.GradualUnfreezePhase(stages=2, epochs_per_stage=1, learning_rate=1e-3)])
    record = history.phases[0]
    assert record.name == "gradual_unfreeze" and record.epochs_run == 2
    stages = record.details["stages"]
    assert [s["blocks"] for s in stages] == [2, 4]
    assert [s["from_layer"] for s in stages] == ["block_2_project", "Conv1"]
    assert [s["trainable_params"] for s in stages] == [2 * 148 + head, 112 + 3 * 148 + head]
    assert len(history.history["loss"]) == 2 and history.epoch == [0, 1]
    with pytest.raises(ValueError, match="stages=0"):
        kt.GradualUnfreezePhase(stages=0)
    with pytest.raises(ValueError, match="layer_decay"):
        kt.GradualUnfreezePhase(layer_decay=2.0)


def test_one_cycle_schedule_and_phase():
    schedule = one_cycle(1e-3, total_steps=100, warmup_steps=25)
    steps = [0, 12, 25, 50, 75, 100]  # a few: each call is an op dispatch (slow on JAX)
    rates = np.array([float(keras.ops.convert_to_numpy(schedule(s))) for s in steps])
    assert rates[0] == pytest.approx(1e-3 / 25)
    assert rates.argmax() == 2 and rates.max() == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(1e-3 / 25 / 1e5, rel=1e-3)
    assert rates[0] < rates[1] < rates[2] and np.all(np.diff(rates[2:]) < 0)
    assert kt.FineTunePhase(decay="one_cycle").decay == "one_cycle"
    with pytest.raises(ValueError, match="one_cycle"):
        kt.FineTunePhase(decay="triangle")


def test_weight_decay_skips_biases_and_accumulation_waits():
    dense = keras.layers.Dense(2)
    norm = keras.layers.LayerNormalization()
    dense.build((None, 3))
    norm.build((None, 2))
    for layer in (dense, norm):  # non-zero everywhere, so decay would show
        layer.set_weights([np.full(w.shape, 0.5, "float32") for w in layer.weights])
    variables = [dense.kernel, dense.bias, norm.gamma, norm.beta]
    phase = kt.FineTunePhase(learning_rate=0.1, warmup=0.0, weight_decay=0.5)
    optimizer = adam_for(phase, total_steps=100)(0.1)
    optimizer.apply([keras.ops.zeros(v.shape) for v in variables], variables)  # no gradient
    np.testing.assert_allclose(np.array(dense.kernel), 0.5 * (1 - 0.1 * 0.5), rtol=1e-5)
    for variable in variables[1:]:  # bias, gamma, beta: not decayed
        np.testing.assert_array_equal(np.array(variable), 0.5)
    accumulating = adam_for(kt.FineTunePhase(gradient_accumulation_steps=2, warmup=0.0),
                            total_steps=100)(0.1)
    before = np.array(dense.kernel)
    accumulating.apply([keras.ops.ones(dense.kernel.shape)], [dense.kernel])
    np.testing.assert_array_equal(np.array(dense.kernel), before)  # the first batch waits
    accumulating.apply([keras.ops.ones(dense.kernel.shape)], [dense.kernel])
    assert np.all(np.array(dense.kernel) < before)  # the second batch applies both
    for bad in (dict(weight_decay=-1.0), dict(gradient_accumulation_steps=1)):
        with pytest.raises(ValueError):
            kt.FineTunePhase(**bad)
