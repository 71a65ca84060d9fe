"""The transfer model: freezing, the two phases, configs, saving and bad input."""

import copy

import keras
import numpy as np
import pytest
try:
    import tensorflow as tf
except ImportError:  # a run on another backend without TensorFlow: its tests are marked
    tf = None

import keras_transfer as kt


def mobilenet_model(**kwargs):
    """A registry backbone, for what depends on its layers and config."""
    options = dict(weights=None, input_shape=(32, 32, 3), pooling="avg")
    options.update(kwargs)
    return kt.ImageTransferModel("mobilenet_v2", 3, **options)


def small_model(**kwargs):
    """Two convolutions with BatchNormalization, named as in MobileNetV2: the training
    paths of a network with moving statistics, traced in a second instead of ten."""
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, name="Conv1")(inputs)
    h = keras.layers.BatchNormalization(name="bn_Conv1")(h)
    h = keras.layers.ReLU(name="Conv1_relu")(h)
    h = keras.layers.Conv2D(16, 3, strides=2, name="Conv_1")(h)
    h = keras.layers.BatchNormalization(name="Conv_1_bn")(h)
    outputs = keras.layers.ReLU(name="out_relu")(h)
    options = dict(preprocessing="tf", pooling="avg")
    options.update(kwargs)
    return kt.ImageTransferModel(keras.Model(inputs, outputs, name="small"), 3, **options)


def batchnorm_stats(model):
    return [np.array(w) for layer in model.backbone.network.layers
            if isinstance(layer, keras.layers.BatchNormalization)
            for w in (layer.moving_mean, layer.moving_variance)]


def test_head_training_leaves_the_backbone_unchanged(tiny_images):
    x, y = tiny_images
    model = small_model()
    before = [np.array(w) for w in model.backbone.network.weights]
    head_before = [np.array(w) for w in model.head.weights]
    stats = batchnorm_stats(model)
    # The frozen backbone inside fit (no feature cache), where a bug could move it.
    model.fit(x, y, phases=[kt.HeadPhase(epochs=2, solver="adam", feature_cache=False)],
              batch_size=16, verbose=0)
    for a, b in zip(stats, batchnorm_stats(model)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(before, model.backbone.network.weights):
        np.testing.assert_array_equal(a, np.array(b))
    assert any(not np.array_equal(a, np.array(b)) for a, b in zip(head_before, model.head.weights))


def test_fine_tuning_keeps_batchnorm_statistics_by_default(tiny_images):
    x, y = tiny_images
    model = small_model()
    stats = batchnorm_stats(model)
    conv_before = np.array(model.backbone.network.get_layer("Conv1").kernel)
    model.fit(x, y, phases=[kt.HeadPhase(epochs=1),
                            kt.FineTunePhase(epochs=2, learning_rate=1e-3)],
              batch_size=16, verbose=0)
    for a, b in zip(stats, batchnorm_stats(model)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(conv_before, np.array(model.backbone.network.get_layer("Conv1").kernel))


def test_train_batchnorm_lets_statistics_move(tiny_images):
    x, y = tiny_images
    model = small_model()
    stats = batchnorm_stats(model)
    model.fit(x, y, phases=[kt.FineTunePhase(epochs=1, train_batchnorm=True)],
              batch_size=16, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(stats, batchnorm_stats(model)))


def test_phases_report_parameters_and_learning_rates(tiny_images):
    x, y = tiny_images
    model = small_model()
    history = model.fit(x, y, phases=[kt.HeadPhase(epochs=2, solver="adam"),
                                            kt.FineTunePhase(epochs=3, warmup=0.25)],
                        batch_size=10, verbose=0)
    head, fine = history.phases
    assert (head.name, head.epochs_run, fine.name, fine.epochs_run) == ("head", 2, "fine_tune", 3)
    assert head.trainable_params == 16 * 3 + 3
    total = head.trainable_params + head.frozen_params
    assert fine.trainable_params + fine.frozen_params == total
    bn_params = sum(int(np.prod(w.shape)) for layer in model.backbone.network.layers
                    if isinstance(layer, keras.layers.BatchNormalization) for w in layer.weights)
    assert fine.frozen_params == bn_params
    assert fine.peak_learning_rate == pytest.approx(1e-5)
    rates = history.history["learning_rate"]
    assert len(rates) == 5 and rates[0] == pytest.approx(1e-3)
    # fine-tuning: warm up, then decay to zero (4 steps an epoch, 3 warmup steps)
    assert rates[2] < 1e-5 and rates[2] > rates[3] > rates[4] == pytest.approx(0.0, abs=1e-9)
    assert history.epoch == [0, 1, 2, 3, 4]
    assert history.phase_of_epoch() == ["head"] * 2 + ["fine_tune"] * 3


def test_warmup_decay_schedule_shape():
    schedule = kt.WarmupDecay(1e-5, total_steps=100, warmup_steps=10)
    values = [float(schedule(s)) for s in range(100)]
    assert values[9] == pytest.approx(1e-5)
    assert values[0] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    linear = kt.WarmupDecay(1.0, total_steps=10, warmup_steps=0, decay="linear")
    assert float(linear(5)) == pytest.approx(0.5)
    assert kt.WarmupDecay.from_config(schedule.get_config()).get_config() == schedule.get_config()


@pytest.mark.parametrize("policy, expected", [(5, 5), ("block_16_project", None)])
def test_unfreeze_top_layers_or_from_a_named_layer(policy, expected):
    model = mobilenet_model()
    count = kt.unfreeze(model.backbone, policy)
    network = model.backbone.network
    trainable = [layer.name for layer in network.layers if layer.trainable and layer.weights]
    if expected:
        assert count <= expected
        assert all(not isinstance(network.get_layer(n), keras.layers.BatchNormalization)
                   for n in trainable)
        assert trainable[-1] == "Conv_1"
    else:
        assert trainable[0] == "block_16_project"
    with pytest.raises(ValueError, match="not a layer"):
        kt.unfreeze(model.backbone, "no_such_layer")


def test_config_round_trip():
    model = mobilenet_model(hidden_units=(8,), dropout=0.1, class_names=["a", "b", "c"])
    config = model.get_config()
    clone = kt.ImageTransferModel.from_config(config)
    assert clone.get_config() == config
    assert clone.count_params() == model.count_params()


def test_from_config_leaves_a_keras_model_backbone_config_whole():
    # Keras's Functional.from_config pops the network's keys out of the config
    # it is given; the model's config must stay whole (and usable again).
    model = small_model(class_names=["a", "b", "c"])
    config = model.get_config()
    expected = copy.deepcopy(config)
    clone = kt.ImageTransferModel.from_config(config)
    assert config == expected
    assert config["backbone"]["config"]["backbone"]["config"]["name"] == "small"
    assert clone.get_config() == config
    assert kt.ImageTransferModel.from_config(config).count_params() == model.count_params()


def test_a_config_describes_the_architecture_not_which_layers_train():
    # One rule for every backbone kind: a fine-tune changes no config, and a
    # model rebuilt from one starts frozen, its layers flagged as freshly built.
    model = small_model()
    fresh_flags = [layer.trainable for layer in model.backbone.network.layers]
    before = model.get_config()
    assert model.backbone.unfreeze(2) == 1  # the top convolution trains (not its BN)
    assert [layer.trainable for layer in model.backbone.network.layers] != fresh_flags
    assert model.get_config() == before
    rebuilt = kt.ImageTransferModel.from_config(model.get_config())
    assert [layer.trainable for layer in rebuilt.backbone.network.layers] == fresh_flags
    assert not rebuilt.backbone.trainable_weights
    assert rebuilt.backbone.unfreeze(2) == 1  # and unfreezes as the original did
    assert [layer.trainable for layer in rebuilt.backbone.network.layers] == [
        layer.trainable for layer in model.backbone.network.layers]


def test_keras_file_round_trip(tiny_images, tmp_path):
    x, y = tiny_images
    model = small_model(class_names=["a", "b", "c"])
    model.fit(x, y, head_epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, kt.ImageTransferModel)
    assert loaded.class_names == ["a", "b", "c"]
    np.testing.assert_allclose(loaded.predict(x), model.predict(x), atol=1e-6)


def test_custom_keras_model_backbone_with_cut_point(tiny_images, tmp_path):
    x, y = tiny_images
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, name="features")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10, name="old_top")(h)
    pretrained = keras.Model(inputs, outputs, name="mine")
    model = kt.ImageTransferModel(pretrained, 3, cut_layer="features", preprocessing="tf")
    assert model.backbone.network.output_shape == (None, 30, 30, 8)
    model.fit(x, y, head_epochs=1, fine_tune_epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / "custom.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x), model.predict(x), atol=1e-6)
    with pytest.raises(kt.BackboneError, match="not a layer"):
        kt.ImageTransferModel(pretrained, 3, cut_layer="nope")


@pytest.mark.parametrize("kind, targets, outputs", [
    ("multilabel", lambda n: np.random.default_rng(0).integers(0, 2, (n, 3)), "sigmoid"),
    ("regression", lambda n: np.random.default_rng(0).normal(size=(n, 3)), "linear"),
])
def test_multilabel_and_regression_heads(tiny_images, kind, targets, outputs):
    x, _ = tiny_images
    model = small_model(kind=kind)
    history = model.fit(x, targets(len(x)), head_epochs=1, batch_size=16, verbose=0)
    assert model.head.layers[-1].activation.__name__ == "linear"  # logits
    assert model.head_specs["head"].kind == kind
    metric = "binary_accuracy" if kind == "multilabel" else "mae"
    assert metric in history.history
    predictions = model.predict(x)
    assert predictions.shape == (40, 3)
    if kind == "multilabel":
        assert ((predictions >= 0) & (predictions <= 1)).all()
    # The head outputs logits; predict applies the head's activation.
    logits = np.asarray(model(x[:4].astype("float32")))
    activation = {"sigmoid": lambda z: 1 / (1 + np.exp(-z)), "linear": lambda z: z}[outputs]
    np.testing.assert_allclose(predictions[:4], activation(logits), atol=1e-5)


def test_flatten_head_is_the_default():
    model = kt.ImageTransferModel("vgg16", 2, weights=None, input_shape=(32, 32, 3))
    assert isinstance(model.head.layers[0], keras.layers.Flatten)


def test_early_stopping_restores_best_weights(tiny_images):
    x, y = tiny_images
    model = small_model()
    history = model.fit(x, y, validation_data=(x[:8], y[:8]), batch_size=16, verbose=0,
                        phases=[kt.HeadPhase(epochs=30, solver="adam", learning_rate=0.5,
                                                early_stopping=1)])
    assert history.phases[0].stopped_early
    assert history.phases[0].epochs_run < 30
    best = min(history.history["val_loss"])
    assert model.evaluate(x[:8], y[:8])["loss"] == pytest.approx(best, rel=1e-4)


@pytest.mark.tensorflow
def test_nan_loss_stops_and_names_the_step(tiny_images):
    x, y = tiny_images
    x = x.astype("float32")
    x[20] = np.nan  # the second batch of 16
    # A dataset is read lazily, so the NaN reaches training (arrays are checked up front).
    x = tf.data.Dataset.from_tensor_slices((x, y))
    y = None
    model = small_model()
    before = model.get_weights()
    with pytest.raises(kt.TrainingDivergedError, match="step 2 of epoch 1 in the 'head' phase"):
        model.fit(x, y, phases=[kt.HeadPhase(epochs=1, solver="adam", feature_cache=False)],
                  batch_size=16, shuffle=False, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_labels_outside_num_classes(tiny_images):
    x, y = tiny_images
    with pytest.raises(kt.DataError, match=r"outside num_classes=3: \[3, 7\]"):
        small_model().fit(x, np.where(y == 0, 7, np.where(y == 1, 3, y)), head_epochs=1, verbose=0)


@pytest.mark.tensorflow
def test_labels_outside_num_classes_in_a_dataset(tiny_images):
    x, y = tiny_images
    dataset = tf.data.Dataset.from_tensor_slices((x, y + 5))
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes=3"):
        small_model().fit(dataset, head_epochs=1, verbose=0)


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((0, 32, 32, 3)), np.zeros(0), "no images"),
    (np.zeros((4, 32, 32, 4)), np.zeros(4), "drop the alpha channel"),
    (np.zeros((4, 32, 32, 3)), np.zeros(3), "4 images but 3 labels"),
])
def test_bad_arrays(x, y, message):
    with pytest.raises(kt.DataError, match=message):
        small_model().fit(x, y, head_epochs=1, verbose=0)


@pytest.mark.tensorflow
def test_empty_dataset():
    empty = tf.data.Dataset.from_tensor_slices((np.zeros((0, 32, 32, 3)), np.zeros(0)))
    with pytest.raises(kt.DataError, match="empty"):
        small_model().fit(empty, head_epochs=1, verbose=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes=1"):
        kt.ImageTransferModel("mobilenet_v2", 1, weights=None, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="nothing to train"):
        small_model().fit(np.zeros((2, 32, 32, 3)), [0, 1], head_epochs=0)
    with pytest.raises(ValueError, match="2 class names"):
        small_model(class_names=["a", "b"])


def test_grayscale_arrays_and_resizing():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 20, 20), dtype=np.uint8)  # grayscale, smaller than the input
    model = small_model()
    model.fit(x, rng.integers(0, 3, 12), head_epochs=1, verbose=0)
    assert model.predict(x).shape == (12, 3)


@pytest.mark.tensorflow
def test_training_inside_a_distribution_strategy(tiny_images):
    x, y = tiny_images
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    # A network passed in must be built where its variables will live: else a clear
    # error before training, not TensorFlow's colocate_vars_with message during it.
    with pytest.raises(kt.BackboneError, match=r"outside the scope of strategy=Mirrored"
                                               r".*with strategy.scope\(\)"):
        small_model(strategy=strategy)
    with strategy.scope():
        model = small_model(strategy=strategy)
    assert model.distribute_strategy is strategy
    history = model.fit(x, y, head_epochs=1, fine_tune_epochs=1, batch_size=16, verbose=0)
    assert len(history.epoch) == 2
    for variable in (model.head.weights[0], model.optimizer.iterations):
        assert strategy.extended.variable_created_in_scope(variable.value)
