"""Layer groups of the backbone families and per-group (discriminative) learning rates."""

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer.layer_groups import LayerRateError, discriminative_optimizer

# Finding groups reads layer names only: checked once, on TensorFlow; the rates'
# effect on training (the optimizer) is checked on every backend.
names_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="backend-neutral; run on TensorFlow")


def blocks_network():
    """Three 'blocks' of one Dense each after a stem, named as keras.applications names them."""
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(4, 3, strides=4, name="Conv1")(inputs)
    h = keras.layers.Conv2D(4, 3, name="block_1_project")(h)
    h = keras.layers.BatchNormalization(name="block_1_project_BN")(h)
    h = keras.layers.Conv2D(4, 3, name="block_2_project")(h)
    h = keras.layers.Conv2D(8, 1, name="Conv_1")(h)  # the top conv joins block_2
    return keras.Model(inputs, h, name="blocks")


@names_only
def test_layer_groups_of_registry_families():
    mobilenet = keras.applications.MobileNetV2(weights=None, include_top=False,
                                               input_shape=(32, 32, 3))
    groups = kt.layer_groups(mobilenet)
    names = [g.name for g in groups]
    assert names == ["stem", "expanded_conv"] + [f"block_{i}" for i in range(1, 17)]
    assert "Conv_1" in [layer.name for layer in groups[-1].layers]  # the top conv
    torch_port = kt.torchvision_mobilenet_v2(weights=None, input_shape=(32, 32, 3),
                                             include_top=False)
    assert [g.name for g in kt.layer_groups(torch_port)] == names
    vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    assert [g.name for g in kt.layer_groups(vgg)] == [f"block{i}" for i in range(1, 6)]
    resnet = keras.applications.ResNet50(weights=None, include_top=False,
                                         input_shape=(32, 32, 3))
    names = [g.name for g in kt.layer_groups(resnet)]
    assert names[0] == "stem" and names[1] == "conv2_block1" and names[-1] == "conv5_block3"
    assert len(names) == 1 + 3 + 4 + 6 + 3


@names_only
def test_layer_groups_of_a_transformer_and_of_unnamed_layers():
    keras_hub = pytest.importorskip("keras_hub")
    bert = keras_hub.models.BertBackbone(vocabulary_size=10, num_layers=3, num_heads=1,
                                         hidden_dim=4, intermediate_dim=8)
    names = [g.name for g in kt.layer_groups(bert)]
    assert names == ["stem"] + [f"transformer_layer_{i}" for i in range(3)]
    inputs = keras.Input((3,))
    h = inputs
    for _ in range(30):  # no block names: at most 12 groups of consecutive layers
        h = keras.layers.Dense(2)(h)
    groups = kt.layer_groups(keras.Model(inputs, h))
    assert len(groups) <= 12 and sum(len(g.layers) for g in groups) == 30


def test_group_rates_and_bad_input():
    np.testing.assert_allclose(kt.group_rates(3, 1e-3, layer_decay=0.5), [2.5e-4, 5e-4, 1e-3])
    np.testing.assert_allclose(kt.group_rates(3, (1e-6, 1e-4)), [1e-6, 1e-5, 1e-4])
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(LayerRateError, match="layer_decay"):
            kt.FineTunePhase(layer_decay=bad)
    with pytest.raises(LayerRateError, match=r"high to low.*\(1e-06, 0.0001\)"):
        kt.FineTunePhase(learning_rate=(1e-4, 1e-6))
    with pytest.raises(LayerRateError, match="give one"):
        kt.FineTunePhase(learning_rate=(1e-6, 1e-4), layer_decay=0.8)
    with pytest.raises(ValueError):
        kt.FineTunePhase(learning_rate=(1e-6, -1.0))


def test_each_group_moves_by_its_sgd_rate():
    # Loss = sum of every kernel: the gradient of each kernel entry is 1, so one
    # SGD step moves it by exactly its group's rate.
    network = blocks_network()
    groups = kt.layer_groups(network)
    rates = kt.group_rates(len(groups), 0.1, layer_decay=0.5)
    optimizer = discriminative_optimizer(network, groups, rates, keras.optimizers.SGD, 0.1)
    kernels = [layer.kernel for g in groups for layer in g.layers if hasattr(layer, "kernel")]
    before = [np.array(k) for k in kernels]
    optimizer.apply([keras.ops.ones(k.shape) for k in kernels], kernels)
    expected = {"Conv1": 0.025, "block_1_project": 0.05, "block_2_project": 0.1, "Conv_1": 0.1}
    for kernel, start in zip(kernels, before):
        layer = kernel.path.split("/")[-2]
        np.testing.assert_allclose(start - np.array(kernel), expected[layer], rtol=1e-5)


def test_fine_tune_phase_trains_each_block_at_its_rate(tiny_images):
    # Adam's first step moves every weight with a gradient by about its rate (m/sqrt(v) = ±1).
    x, y = tiny_images
    model = kt.ImageTransferModel(blocks_network(), 3, preprocessing="tf", pooling="avg")
    before = {id(w): np.array(w) for w in model.weights}
    history = model.fit(x[:16], y[:16], batch_size=16, verbose=0, phases=[kt.FineTunePhase(
        epochs=1, learning_rate=1e-2, layer_decay=0.5, warmup=0.0)])
    rates = history.phases[0].details["group_rates"]
    assert rates == pytest.approx({"stem": 2.5e-3, "block_1": 5e-3, "block_2": 1e-2})
    network = model.backbone.network
    for layer, rate in (("Conv1", 2.5e-3), ("block_1_project", 5e-3), ("Conv_1", 1e-2)):
        kernel = network.get_layer(layer).kernel
        moved = np.abs(np.array(kernel) - before[id(kernel)])
        assert np.median(moved) == pytest.approx(rate, rel=0.05), layer
    head = model.head.layers[-1].kernel
    assert np.median(np.abs(np.array(head) - before[id(head)])) == pytest.approx(1e-2, rel=0.05)
    assert "learning_rate" in history.history  # logged from the top rate's optimizer


@pytest.mark.large  # a KerasHub model with LoRA: about a minute on busy cores
def test_lora_adapters_take_their_blocks_rates():
    from test_text import LABELS, TEXTS, tiny_model

    model = tiny_model()
    network = model.backbone.network
    history = model.fit(TEXTS, LABELS, batch_size=len(TEXTS), verbose=0, phases=[
        kt.HeadPhase(epochs=1), kt.FineTunePhase(epochs=1, lora_rank=2, learning_rate=1e-2,
                                                 layer_decay=0.1, warmup=0.0)])
    rates = history.phases[1].details["group_rates"]
    top, below = list(rates)[-1], list(rates)[-2]
    assert top.startswith("transformer_layer_") and rates[below] == pytest.approx(1e-3)
    # The adapters are variables of the adapted layers, so each block's go with its rate.
    groups = {g.name: g for g in kt.layer_groups(network)}
    for name in (top, below):
        assert any("lora_kernel" in v.path for v in groups[name].variables), name
    assert all("lora" in w.path for w in network.trainable_weights)


@names_only
def test_per_block_rates_under_a_mirrored_strategy(tiny_images):
    import tensorflow as tf

    x, y = tiny_images
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        network = blocks_network()
    model = kt.ImageTransferModel(network, 3, preprocessing="tf", pooling="avg",
                                  strategy=strategy)
    kernel = network.get_layer("Conv1").kernel
    before = np.array(kernel)
    model.fit(x[:16], y[:16], batch_size=16, verbose=0, phases=[kt.FineTunePhase(
        epochs=1, learning_rate=1e-2, layer_decay=0.5, warmup=0.0)])
    assert np.median(np.abs(np.array(kernel) - before)) == pytest.approx(2.5e-3, rel=0.05)
