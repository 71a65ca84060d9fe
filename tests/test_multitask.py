"""Several heads on one backbone: joint training, per-head metrics, export, configs and bad input."""

import json

import keras
import numpy as np
import pytest
try:
    import tensorflow as tf
except ImportError:  # a run on another backend without TensorFlow: its tests are marked
    tf = None

import keras_transfer as kt
from keras_transfer import Head, MultiTaskModel, TextMultiTaskModel, task_schedule
from keras_transfer.data import steps_of
from keras_transfer.plots import plot_history

TASKS = {
    "digits": Head(num_classes=3, class_names=["zero", "one", "two"], pooling="avg"),
    "tags": Head(num_classes=4, kind="multilabel", pooling="avg"),
    "size": Head(num_classes=1, kind="regression", loss_weight=0.5, pooling="avg"),
}


def task_data(seed=0, sizes=(40, 24, 16)):
    """Each task with its own images, of its own size."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in sizes]
    return {
        "digits": (images[0], rng.integers(0, 3, sizes[0])),
        "tags": (images[1], rng.integers(0, 2, (sizes[1], 4))),
        "size": (images[2], rng.normal(size=sizes[2]).astype("float32")),
    }


def tiny_backbone():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, name="conv")(inputs)
    return keras.Model(inputs, x, name="tiny")


def batchnorm_model(**kwargs):
    """Two convolutions with BatchNormalization: MobileNetV2's kind of layers, traced in
    seconds instead of tens."""
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, name="conv1")(inputs)
    x = keras.layers.ReLU(name="relu1")(keras.layers.BatchNormalization(name="bn1")(x))
    x = keras.layers.Conv2D(16, 3, strides=2, name="conv2")(x)
    x = keras.layers.ReLU(name="relu2")(keras.layers.BatchNormalization(name="bn2")(x))
    return MultiTaskModel(keras.Model(inputs, x, name="small"), tasks=TASKS,
                          preprocessing="tf", **kwargs)


@pytest.fixture(scope="module")
def trained():
    """A multi-task model with BatchNormalization after both phases, with what it started from."""
    keras.utils.set_random_seed(0)
    model = batchnorm_model()
    before = {"bn": batchnorm_stats(model.backbone.network)}
    train, validation = task_data(0), task_data(1, sizes=(16, 8, 8))
    validation.pop("size")  # a task without validation data
    history = model.fit(train, validation_data=validation, batch_size=8, seed=0, verbose=0,
                        phases=[kt.HeadPhase(epochs=2, solver="adam"),
                                kt.FineTunePhase(epochs=2, warmup=0.25)])
    return model, history, train, validation, before


def test_history_has_per_task_keys_for_both_phases(trained):
    model, history, *_ = trained
    expected = {"loss", "learning_rate", "digits_loss", "digits_accuracy", "tags_loss",
                "tags_binary_accuracy", "size_loss", "size_mae", "val_loss",
                "val_digits_loss", "val_digits_accuracy", "val_tags_loss",
                "val_tags_binary_accuracy"}
    assert set(history.history) == expected  # no val_size_*: it had no validation data
    assert all(len(values) == 4 for values in history.history.values())
    assert history.phase_of_epoch() == ["head"] * 2 + ["fine_tune"] * 2
    head, fine = history.phases
    head_params = sum(int(np.prod(w.shape)) for h in model.heads.values() for w in h.weights)
    assert head.trainable_params == head_params == 16 * (3 + 4 + 1) + 8
    assert fine.peak_learning_rate == pytest.approx(1e-5)
    bn_params = sum(int(np.prod(w.shape)) for layer in model.backbone.network.layers
                    if isinstance(layer, keras.layers.BatchNormalization) for w in layer.weights)
    assert fine.frozen_params == bn_params
    rates = history.history["learning_rate"]
    assert rates[0] == pytest.approx(1e-3) and rates[2] < 1e-5


def batchnorm_stats(backbone):
    return [np.array(w) for layer in backbone.layers
            if isinstance(layer, keras.layers.BatchNormalization)
            for w in (layer.moving_mean, layer.moving_variance)]


def test_fine_tuning_keeps_the_batchnorm_statistics(trained):
    model, _, _, _, before = trained
    after = batchnorm_stats(model.backbone.network)
    assert len(after) == len(before["bn"]) == 2 * 2
    for a, b in zip(before["bn"], after):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("train_batchnorm", [False, True])
def test_fine_tuning_moves_the_backbone_and_batchnorm_only_when_asked(train_batchnorm):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = MultiTaskModel(keras.Model(inputs, x), TASKS, preprocessing="tf")
    network = model.backbone.network
    stats, kernel = batchnorm_stats(network), np.array(network.get_layer("conv").kernel)
    data = task_data()
    model.fit(data, head_epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(kernel, np.array(network.get_layer("conv").kernel))
    model.fit(data, phases=[kt.FineTunePhase(epochs=1, learning_rate=1e-3,
                                             train_batchnorm=train_batchnorm)],
              batch_size=8, verbose=0)
    assert np.abs(kernel - np.array(network.get_layer("conv").kernel)).max() > 1e-5
    moved = any(not np.allclose(a, b) for a, b in zip(stats, batchnorm_stats(network)))
    assert moved == train_batchnorm


def test_per_task_metrics_count_only_their_task(trained):
    model, history, train, validation, _ = trained
    results = model.evaluate(train)
    assert set(results) == {"digits", "tags", "size"}
    assert set(results["digits"]) == {"loss", "accuracy"}
    (xd, yd), (xt, yt), (xs, ys) = train["digits"], train["tags"], train["size"]
    digits, tags, size = (model.predict(x)[name] for x, name in
                          ((xd, "digits"), (xt, "tags"), (xs, "size")))
    expected_digits_loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(yd, digits)))
    assert results["digits"]["loss"] == pytest.approx(expected_digits_loss, rel=1e-4)
    assert results["digits"]["accuracy"] == pytest.approx(np.mean(digits.argmax(1) == yd))
    assert results["tags"]["binary_accuracy"] == pytest.approx(np.mean((tags > 0.5) == yt))
    assert results["size"]["loss"] == pytest.approx(np.mean((size[:, 0] - ys) ** 2), rel=1e-4)
    assert results["size"]["mae"] == pytest.approx(np.mean(np.abs(size[:, 0] - ys)), rel=1e-4)
    # The last validation pass ran on the final weights: its per-task values
    # are those of each task's own validation data alone.
    alone = model.evaluate({"digits": validation["digits"]})
    assert set(alone) == {"digits"}
    assert history.history["val_digits_loss"][-1] == pytest.approx(alone["digits"]["loss"],
                                                                   rel=1e-4)
    assert history.history["val_digits_accuracy"][-1] == pytest.approx(
        alone["digits"]["accuracy"])


def test_predict_returns_every_task(trained):
    model, _, train, _, _ = trained
    outputs = model.predict(train["tags"][0])
    assert list(outputs) == ["digits", "tags", "size"]
    assert {k: v.shape for k, v in outputs.items()} == {"digits": (24, 3), "tags": (24, 4),
                                                        "size": (24, 1)}
    np.testing.assert_allclose(outputs["digits"].sum(axis=1), 1.0, rtol=1e-5)
    assert ((outputs["tags"] >= 0) & (outputs["tags"] <= 1)).all()


@pytest.mark.tensorflow
def test_export_has_one_output_per_task(trained, tmp_path):
    model, _, train, _, _ = trained
    x = train["digits"][0][:12]
    path = model.export(str(tmp_path / "export"), metrics={"digits": {"accuracy": 0.5}})
    loaded = tf.saved_model.load(path)
    outputs = loaded.signatures["serving_default"](images=tf.constant(x))
    assert set(outputs) == {"digits", "tags", "size"}
    expected = model.predict(x)
    for name, value in outputs.items():
        assert np.abs(value.numpy() - expected[name]).max() <= 1e-5
    encoded = tf.constant([tf.io.encode_png(image).numpy() for image in x])
    from_bytes = loaded.signatures["serving_bytes"](image_bytes=encoded)
    assert np.abs(from_bytes["tags"].numpy() - expected["tags"]).max() <= 1e-5
    metadata = json.loads((tmp_path / "export" / "metadata.json").read_text())
    assert metadata["task"] == "multitask" and metadata["kind"] == "image"
    assert metadata["output"] == {"digits": "probabilities", "tags": "probabilities",
                                  "size": "predictions"}
    assert metadata["class_names"]["digits"] == ["zero", "one", "two"]
    assert metadata["heads"]["size"]["loss_weight"] == 0.5
    assert metadata["metrics"] == {"digits_accuracy": 0.5}


def test_config_and_keras_file_round_trip(trained, tmp_path):
    model, _, train, _, _ = trained
    config = model.get_config()
    clone = MultiTaskModel.from_config(config)
    # A config describes the architecture, not which layers train: the fine-tuned
    # model's is the clone's, which starts frozen; unfreezing changes no config.
    assert clone.get_config() == config
    assert not clone.backbone.trainable_weights and model.backbone.trainable_weights
    clone.backbone.unfreeze("all")
    assert clone.get_config() == config
    assert clone.count_params() == model.count_params()
    path = str(tmp_path / "multi.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, MultiTaskModel)
    assert loaded.head_specs == model.head_specs
    x = train["size"][0]
    for name, value in loaded.predict(x).items():
        np.testing.assert_allclose(value, model.predict(x)[name], atol=1e-6)
    assert loaded.evaluate({"digits": train["digits"]})["digits"]["accuracy"] == pytest.approx(
        model.evaluate({"digits": train["digits"]})["digits"]["accuracy"])


def test_plot_history_draws_both_phases(trained, tmp_path):
    _, history, *_ = trained
    path = tmp_path / "curves.png"
    figure = plot_history(history, ["loss", "digits_accuracy", "learning_rate"], path=str(path))
    assert path.stat().st_size > 1000
    assert len([a for a in figure.axes if a.get_visible()]) == 3
    assert len(plot_history(history.history).axes) >= 9
    with pytest.raises(ValueError, match="history lacks"):
        plot_history(history, ["nope"])


def test_sampling_schedules_and_pipelines():
    assert task_schedule({"a": 3, "b": 1}) == ["a", "b"] * 3
    order = task_schedule({"a": 5, "b": 3, "c": 2}, "proportional", seed=0)
    assert sorted(order) == ["a"] * 5 + ["b"] * 3 + ["c"] * 2 and order != sorted(order)
    data = task_data()  # 5, 3 and 2 batches of 8
    for sampling, steps, per_task in (("round_robin", 15, [5, 5, 5]),
                                      ("proportional", 10, [5, 3, 2])):
        model = MultiTaskModel(tiny_backbone(), TASKS, sampling=sampling)
        dataset, count = model.make_dataset(data, batch_size=8, training=True, seed=0)
        assert count == steps == steps_of(dataset)
        owners = []
        for _images, targets, masks in dataset:
            fed = [name for name, mask in masks.items() if float(np.sum(mask)) > 0]
            assert len(fed) == 1  # every batch holds one task only
            assert targets["tags"].shape[1:] == (4,) and targets["size"].shape[1:] == (1,)
            owners.append(fed[0])
        assert [owners.count(n) for n in ("digits", "tags", "size")] == per_task
        if sampling == "round_robin":
            assert owners[:3] == ["digits", "tags", "size"]


def test_loss_weight_zero_and_tasks_without_data_leave_their_heads_alone():
    keras.utils.set_random_seed(0)
    tasks = dict(TASKS, tags=Head(4, kind="multilabel", loss_weight=0.0))
    model = MultiTaskModel(tiny_backbone(), tasks, sampling="proportional")
    before = {n: [np.array(w) for w in h.weights] for n, h in model.heads.items()}
    data = task_data()
    data.pop("size")
    history = model.fit(data, phases=[kt.HeadPhase(epochs=1, solver="adam")], batch_size=8,
                        verbose=0)
    assert "size_loss" not in history.history and "tags_loss" in history.history
    for name in ("tags", "size"):
        for a, b in zip(before[name], model.heads[name].weights):
            np.testing.assert_array_equal(a, np.array(b))
    assert not np.array_equal(before["digits"][0], np.array(model.heads["digits"].weights[0]))


@pytest.mark.tensorflow
def test_custom_backbone_in_a_strategy_and_folder_data(image_folder):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    tasks = {"animals": Head(3, pooling="avg"), "size": Head(1, kind="regression", pooling="avg")}
    with strategy.scope():  # a backbone that trains in a strategy is built in its scope
        backbone = tiny_backbone()
    model = MultiTaskModel(backbone, tasks, preprocessing="tf", strategy=strategy)
    assert model.distribute_strategy is strategy
    rng = np.random.default_rng(0)
    sizes = (rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), rng.normal(size=(6, 1)))
    history = model.fit({"animals": str(image_folder), "size": sizes}, head_epochs=1,
                        fine_tune_epochs=1, batch_size=4, verbose=0)
    assert len(history.epoch) == 2
    assert model.class_names["animals"] == ["cat", "dog", "fox"]
    for variable in (model.heads["animals"].weights[0], model.optimizer.iterations):
        assert strategy.extended.variable_created_in_scope(variable.value)


def test_bad_tasks_and_data():
    with pytest.raises(ValueError, match="non-empty dict"):
        MultiTaskModel(tiny_backbone(), {})
    with pytest.raises(ValueError, match="head name 'my task'"):
        MultiTaskModel(tiny_backbone(), {"my task": Head(2)})
    with pytest.raises(ValueError, match="expected a kt.Head"):
        MultiTaskModel(tiny_backbone(), {"a": 3})
    with pytest.raises(ValueError, match="num_classes=1 for kind 'classification'"):
        Head(num_classes=1)
    with pytest.raises(ValueError, match="loss_weight=-1"):
        Head(2, loss_weight=-1)
    model = MultiTaskModel(tiny_backbone(), TASKS)
    data = task_data()
    with pytest.raises(kt.DataError, match=r"head\(s\) \['digit'\].*did you mean 'digits'"):
        model.fit({"digit": data["digits"]}, head_epochs=1, verbose=0)
    with pytest.raises(kt.DataError, match="Head 'tags': Received 24 images but 23 labels"):
        model.fit({"tags": (data["tags"][0], data["tags"][1][:23])}, head_epochs=1, verbose=0)
    with pytest.raises(kt.DataError, match="takes a dict"):
        model.fit(data["digits"][0], head_epochs=1, verbose=0)
    with pytest.raises(kt.DataError, match="Received y"):
        model.fit(data, data["digits"][1], head_epochs=1, verbose=0)
    with pytest.raises(ValueError, match="sampling='random'"):
        MultiTaskModel(tiny_backbone(), TASKS, sampling="random")
    with pytest.raises(kt.DataError, match=r"regression targets of shape \(16, 2\)"):
        model.fit({"size": (data["size"][0], np.zeros((16, 2)))}, head_epochs=1, verbose=0)
    with pytest.raises(kt.DataError, match="outside num_classes=3"):
        model.fit({"digits": (data["digits"][0], data["digits"][1] + 3)}, head_epochs=1,
                  verbose=0)
    with pytest.raises(kt.DataError, match="images without labels"):
        model.evaluate({"digits": data["digits"][0]})
    with pytest.raises(ValueError, match="Head\\(loss_weight"):
        model.compile(loss_weights={"digits": 2.0})
    with pytest.raises(ValueError, match="unknown head\\(s\\) \\['other'\\]"):
        model.compile(metrics={"other": ["accuracy"]})


# ---------------------------------------------------------------------- text
TEXT_TASKS = {
    "sentiment": Head(num_classes=2, class_names=["neg", "pos"]),
    "topics": Head(num_classes=3, kind="multilabel", hidden_units=(4,)),
    "score": Head(num_classes=1, kind="regression", loss_weight=0.5),
}


def tiny_text_multitask():
    """A tiny random BERT with three task heads, and each task's texts of its own size."""
    pytest.importorskip("keras_hub")
    from test_text import LABELS, TEXTS, tiny_bert

    backbone, preprocessor = tiny_bert()
    model = TextMultiTaskModel(backbone, TEXT_TASKS, preprocessor=preprocessor,
                               sequence_length=8)
    rng = np.random.default_rng(0)
    data = {
        "sentiment": (TEXTS, LABELS),
        "topics": (TEXTS[:12], rng.integers(0, 2, (12, 3))),
        "score": (TEXTS[:8], rng.normal(size=8).astype("float32")),
    }
    return model, data


@pytest.fixture(scope="module")
def text_trained():
    keras.utils.set_random_seed(0)
    model, data = tiny_text_multitask()
    frozen = [np.array(w) for w in model.backbone.network.weights]
    history = model.fit(data, validation_data={"sentiment": data["sentiment"]},
                        phases=[kt.HeadPhase(epochs=1, solver="adam"),
                                kt.FineTunePhase(epochs=1, learning_rate=1e-3)],
                        batch_size=4, seed=0, verbose=0)
    return model, history, data, frozen


def test_text_multitask_history_predict_and_evaluate(text_trained):
    model, history, data, frozen = text_trained
    assert set(history.history) == {
        "loss", "learning_rate", "sentiment_loss", "sentiment_accuracy", "topics_loss",
        "topics_binary_accuracy", "score_loss", "score_mae", "val_loss",
        "val_sentiment_loss", "val_sentiment_accuracy"}
    assert history.phase_of_epoch() == ["head", "fine_tune"]
    head = history.phases[0]
    assert head.trainable_params == 8 * 2 + 2 + (8 * 4 + 4 + 4 * 3 + 3) + 8 + 1
    assert any(not np.array_equal(a, np.array(b))
               for a, b in zip(frozen, model.backbone.network.weights))
    texts = data["sentiment"][0][:5]
    outputs = model.predict(texts)
    assert {k: v.shape for k, v in outputs.items()} == {"sentiment": (5, 2), "topics": (5, 3),
                                                        "score": (5, 1)}
    np.testing.assert_allclose(outputs["sentiment"].sum(axis=1), 1.0, rtol=1e-5)
    results = model.evaluate({"sentiment": data["sentiment"], "score": data["score"]})
    assert set(results) == {"sentiment", "score"}
    assert set(results["sentiment"]) == {"loss", "accuracy"}
    assert results["score"]["mae"] == pytest.approx(np.mean(np.abs(
        model.predict(data["score"][0])["score"][:, 0] - data["score"][1])), rel=1e-4)
    assert model.class_names["sentiment"] == ["neg", "pos"]


@pytest.mark.tensorflow
def test_text_multitask_export_serves_raw_strings(text_trained, tmp_path):
    import tensorflow_text  # noqa: F401  (registers the tokenizer ops)

    model = text_trained[0]
    path = model.export(str(tmp_path / "export"))
    texts = ["the food was great", "awful", "unknownword service", "very very very " * 10]
    outputs = tf.saved_model.load(path).signatures["serving_default"](texts=tf.constant(texts))
    assert set(outputs) == {"sentiment", "topics", "score"}
    expected = model.predict(texts)
    for name, value in outputs.items():
        assert np.abs(value.numpy() - expected[name]).max() <= 1e-5
    metadata = kt.load_metadata(path)
    assert metadata["kind"] == "text" and metadata["task"] == "multitask"
    assert metadata["output"] == {"sentiment": "probabilities", "topics": "probabilities",
                                  "score": "predictions"}
    assert metadata["class_names"]["sentiment"] == ["neg", "pos"]


def test_text_multitask_config_and_keras_file_round_trip(text_trained, tmp_path):
    model, _, data, _ = text_trained
    config = model.get_config()
    clone = TextMultiTaskModel.from_config(config)
    # KerasHub leaves the tokenizer object itself in a preprocessor's config; the
    # fine-tuned backbone's config is the frozen clone's (no trainable flags).
    assert "trainable" not in config["backbone"]["config"]["backbone"]["config"]
    without_tokenizer = []
    for c in (config, clone.get_config()):
        c["backbone"]["config"].pop("preprocessor")
        without_tokenizer.append(c)
    assert without_tokenizer[0] == without_tokenizer[1]
    assert clone.backbone.preprocessor.sequence_length == 8
    assert clone.count_params() == model.count_params()
    path = str(tmp_path / "text_multi.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, TextMultiTaskModel) and loaded.head_specs == model.head_specs
    texts = data["topics"][0]
    expected = model.predict(texts)
    for name, value in loaded.predict(texts).items():
        np.testing.assert_allclose(value, expected[name], atol=1e-6)


def test_text_multitask_bad_input():
    model, data = tiny_text_multitask()
    with pytest.raises(kt.DataError, match="takes a dict \\{head name: data\\}, where data is "
                       "\\(texts, labels\\)"):
        model.fit(data["sentiment"][0], head_epochs=1, verbose=0)
    with pytest.raises(kt.DataError, match="Head 'sentiment'.*outside num_classes=2"):
        model.fit({"sentiment": (data["sentiment"][0], [5] * 24)}, head_epochs=1, verbose=0)
    with pytest.raises(kt.DataError, match="Head 'topics': Received 12 texts but 11 labels"):
        model.fit({"topics": (data["topics"][0], data["topics"][1][:11])}, head_epochs=1,
                  verbose=0)
    with pytest.raises(kt.DataError, match="augmentation"):
        model.fit(data, head_epochs=1, augmentation=keras.layers.Identity(), verbose=0)
    with pytest.raises(kt.BackboneError, match="without a preprocessor"):
        TextMultiTaskModel(model.backbone.network, TEXT_TASKS)
