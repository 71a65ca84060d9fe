"""The forgetting report: metrics on known cases, and forgetting it tells apart.

A tiny functional backbone is first pretrained on task A (digits 0-4 of
scikit-learn's `load_digits`, upscaled to 32x32 RGB) so it has something to
forget; it is then fine-tuned on task B (digits 5-9).
"""

import math

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer import Head, MultiTaskModel
from keras_transfer.forgetting import (
    block_layers,
    forgetting_report,
    linear_cka,
    mean_cosine_similarity,
    relative_weight_change,
    snapshot_backbone,
)


def tiny_backbone():
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, strides=2, padding="same", name="block1_conv")(inputs)
    # momentum 0.9: short pretraining must converge the moving statistics.
    x = layers.BatchNormalization(momentum=0.9, name="block1_bn")(x)
    x = layers.ReLU(name="block1_relu")(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", name="block2_conv")(x)
    x = layers.ReLU(name="block2_relu")(x)
    x = layers.Conv2D(64, 3, strides=2, padding="same", name="block3_conv")(x)
    x = layers.ReLU(name="block3_relu")(x)
    return keras.Model(inputs, x, name="tiny")


@pytest.fixture(scope="module")
def digits():
    """Task A (digits 0-4) and task B (digits 5-9), 300 training images each."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(np.kron(data.images, np.ones((4, 4))) * 16, 0, 255).astype(np.uint8)
    images = np.repeat(images[..., np.newaxis], 3, axis=-1)
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], data.target[order]
    a, b = labels < 5, labels >= 5
    return {
        "a_train": (images[a][:300], labels[a][:300]),
        "a_test": (images[a][600:], labels[a][600:]),
        "b_train": (images[b][:300], labels[b][:300] - 5),
    }


@pytest.fixture(scope="module")
def pretrained(digits):
    """A backbone and head trained on task A; returns `(backbone, head)`."""
    keras.utils.set_random_seed(0)
    backbone = tiny_backbone()
    head = Head(5, pooling="avg").build(name="a_head")
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 127.5, -1),
                              backbone, head])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(*digits["a_train"], epochs=8, batch_size=32, verbose=0)
    assert model.evaluate(*digits["a_test"], verbose=0)[1] > 0.8
    return backbone, head


def fine_tune_on_b(pretrained, digits, learning_rate, parallel=False, fine_tune_epochs=2):
    backbone, head = pretrained
    keras.utils.set_random_seed(1)
    tasks = {"b": Head(5, pooling="avg")}
    data = {"b": digits["b_train"]}
    if parallel:
        tasks = {"a": Head(5, pooling="avg"), **tasks}
        data["a"] = digits["a_train"]
    model = MultiTaskModel(snapshot_backbone(backbone), tasks, preprocessing="tf")
    if parallel:  # task A goes on from its trained head
        model.heads["a"].set_weights(head.get_weights())
    model.fit(data, phases=[kt.HeadPhase(epochs=1, solver="adam"),
                            kt.FineTunePhase(epochs=fine_tune_epochs, learning_rate=learning_rate)],
              batch_size=32, seed=0, verbose=0)
    return model


def test_identical_backbones_show_no_forgetting(pretrained, digits):
    backbone, head = pretrained
    copy = snapshot_backbone(backbone)
    x, y = digits["a_test"]
    report = forgetting_report(backbone, copy, x[:100], earlier_task=(head, x, y),
                                  preprocessing="tf")
    assert [row["layer"] for row in report.blocks] == ["block1_relu", "block2_relu", "block3_relu"]
    for row in report.table():
        assert row["cka"] == pytest.approx(1.0, abs=1e-6)
        assert row["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert row["weight_change"] == 0.0
    assert all(row["weight_change"] == 0.0 for row in report.layers)
    assert report.weight_change == 0.0
    task = report.earlier_task
    assert task["original_accuracy"] == task["finetuned_accuracy"] > 0.8
    assert report.retained_accuracy == 1.0
    assert report.probe_size == 100


def test_snapshot_is_independent_of_later_training(pretrained):
    backbone, _ = pretrained
    copy = snapshot_backbone(backbone)
    assert not copy.trainable
    kernel = backbone.get_layer("block2_conv").kernel
    saved = np.array(kernel)
    kernel.assign(saved + 1.0)
    try:
        np.testing.assert_array_equal(np.array(copy.get_layer("block2_conv").kernel), saved)
        assert relative_weight_change(copy.get_layer("block2_conv"),
                                      backbone.get_layer("block2_conv")) > 0
    finally:
        kernel.assign(saved)


def test_similarity_measures_on_known_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6, 5))  # fewer examples than features: Gram formula
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    rotated = (x.reshape(40, 30) @ q).reshape(40, 6, 5)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * rotated + 7.0) == pytest.approx(1.0)  # invariances
    assert linear_cka(x, rng.normal(size=(40, 30))) < 0.9
    tall = rng.normal(size=(200, 4))  # more examples than features: feature formula
    other = tall @ rng.normal(size=(4, 3))
    gram = np.sum((tall - tall.mean(0)) @ (tall - tall.mean(0)).T
                  * ((other - other.mean(0)) @ (other - other.mean(0)).T))
    expected = gram / (np.linalg.norm((tall - tall.mean(0)) @ (tall - tall.mean(0)).T)
                       * np.linalg.norm((other - other.mean(0)) @ (other - other.mean(0)).T))
    assert linear_cka(tall, other) == pytest.approx(expected)
    assert math.isnan(linear_cka(np.ones((5, 3)), x[:5]))
    assert mean_cosine_similarity(x, x) == pytest.approx(1.0)
    assert mean_cosine_similarity(x, -2 * x) == pytest.approx(-1.0)
    assert mean_cosine_similarity(np.zeros((3, 2)), np.zeros((3, 2))) == 1.0
    with pytest.raises(ValueError, match="40 and 5 examples"):
        linear_cka(x, x[:5])


def test_high_learning_rate_drifts_more_than_a_low_one(pretrained, digits):
    backbone, head = pretrained
    x, y = digits["a_test"]
    reports = {}
    for rate in (1e-2, 1e-5):
        model = fine_tune_on_b(pretrained, digits, rate)
        reports[rate] = forgetting_report(backbone, model, x[:200],
                                             earlier_task=(head, x, y))
    high, low = reports[1e-2], reports[1e-5]
    assert high.weight_change > 20 * low.weight_change
    assert low.weight_change < 0.01
    assert high.mean_cka < low.mean_cka and high.mean_cosine < low.mean_cosine - 0.2
    assert min(row["cka"] for row in low.blocks) > 0.999
    assert all(h["weight_change"] > l["weight_change"] for h, l in zip(high.blocks, low.blocks))
    assert low.retained_accuracy > 0.95
    assert high.retained_accuracy < low.retained_accuracy - 0.2


def test_sequential_training_forgets_more_than_parallel_training(pretrained, digits):
    backbone, head = pretrained
    x, y = digits["a_test"]
    retained = {}
    for parallel in (False, True):
        model = fine_tune_on_b(pretrained, digits, 1e-2, parallel=parallel, fine_tune_epochs=3)
        report = forgetting_report(backbone, model, x[:200], earlier_task=(head, x, y))
        retained[parallel] = report.retained_accuracy
    # Seeds 0-2 gave 0.20-0.29 (sequential) and 0.96-1.01 (parallel).
    assert retained[True] > retained[False] + 0.3
    assert retained[True] > 0.85


def test_block_boundaries_of_keras_applications():
    mobilenet = kt.get_backbone_spec("mobilenet_v2").build((32, 32, 3), weights=None)
    names = block_layers(mobilenet)
    assert len(names) == 9 and names[-1] == "out_relu"
    assert names[0] == "block_1_project_BN" and names[-2] == "block_16_project_BN"
    assert all(n.endswith(("_add", "_project_BN")) for n in names[:-1])
    assert block_layers(mobilenet, max_blocks=2) == ["block_1_project_BN",
                                                      "block_16_project_BN", "out_relu"]
    vgg = kt.get_backbone_spec("vgg16").build((32, 32, 3), weights=None)
    assert block_layers(vgg) == [f"block{i}_pool" for i in range(1, 6)]
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3, name="c1"),
                              keras.layers.Conv2D(2, 3, name="c2"),
                              keras.layers.GlobalAveragePooling2D(name="gap")])
    assert block_layers(plain) == ["c1", "c2", "gap"]


def test_user_layers_text_table_and_plot(pretrained, digits, tmp_path):
    backbone, _ = pretrained
    x, _ = digits["a_test"]
    report = forgetting_report(backbone, snapshot_backbone(backbone), x[:20],
                               layers=["block2_conv", "block3_relu"], preprocessing="tf")
    assert [row["layer"] for row in report.table()] == ["block2_conv", "block3_relu"]
    assert set(report.table()[0]) == {"block", "layer", "cka", "cosine", "weight_change",
                                      "params"}
    text = str(report)
    assert text == report.to_text()
    assert "CKA" in text and "block3_relu" in text and "20 probe images" in text
    path = tmp_path / "forgetting.png"
    figure = report.plot(str(path))
    assert path.stat().st_size > 1000
    assert len(figure.axes) == 2
    with pytest.raises(ValueError, match="'nope', which is not a layer"):
        forgetting_report(backbone, backbone, x[:4], layers=["nope"])
    with pytest.raises(ValueError, match="expected a tuple \\(head, images, labels\\)"):
        forgetting_report(backbone, backbone, x[:4], earlier_task=("head", x))
    with pytest.raises(kt.DataError, match="probe_images: Received no images"):
        forgetting_report(backbone, backbone, np.zeros((0, 32, 32, 3)))


# ---------------------------------------------------------------------- text
def tiny_text_model(seed=0):
    """A tiny random BERT `TextTransferModel`, with the texts and labels of test_text."""
    pytest.importorskip("keras_hub")
    from test_text import LABELS, TEXTS, tiny_model

    keras.utils.set_random_seed(seed)
    return tiny_model(), TEXTS, LABELS


def test_identical_text_models_show_no_forgetting():
    model, texts, labels = tiny_text_model()
    model.fit(texts, labels, head_epochs=1, batch_size=8, verbose=0)
    original = snapshot_backbone(model)
    assert type(original) is type(model.backbone.network) and not original.trainable
    assert original.hidden_dim == model.backbone.network.hidden_dim
    report = forgetting_report(original, model, texts[:12],
                               earlier_task=(model.head, texts, labels))
    assert [row["layer"] for row in report.blocks] == ["transformer_layer_0",
                                                       "transformer_layer_1"]
    for row in report.table():
        assert row["cka"] == pytest.approx(1.0, abs=1e-6)
        assert row["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert row["weight_change"] == 0.0
    assert report.weight_change == 0.0 and report.retained_accuracy == 1.0
    assert report.probe_size == 12 and "12 probe texts" in str(report)
    # Bare KerasHub backbones take their tokenizer as `preprocessing`.
    bare = forgetting_report(original, model.backbone.network, texts, max_blocks=1,
                             preprocessing=model.backbone.preprocessor)
    assert bare.mean_cka == pytest.approx(1.0, abs=1e-6) and bare.probe_size == len(texts)
    with pytest.raises(ValueError, match="no tokenizer"):
        forgetting_report(original, model.backbone.network, texts)
    with pytest.raises(kt.DataError,
                       match="probe_images: Received non-string texts at positions \\[0, 1, 2\\]"):
        forgetting_report(original, model, np.zeros((3, 8)))
    with pytest.raises(kt.DataError, match="probe_images: Received no texts"):
        forgetting_report(original, model, [])
    with pytest.raises(kt.DataError, match="not a KerasHub text backbone"):
        forgetting_report(tiny_backbone(), tiny_backbone(), texts)


def test_masked_mean_ignores_padding():
    from keras_transfer.forgetting import _masked_mean

    values = np.array([[[1.0, 1.0], [3.0, 3.0], [100.0, -100.0]]])
    np.testing.assert_allclose(_masked_mean(values, [[1, 1, 0]]), [[2.0, 2.0]])


def test_high_learning_rate_text_fine_tune_drifts():
    reports = {}
    for rate in (1e-2, 1e-6):
        model, texts, labels = tiny_text_model()
        original = snapshot_backbone(model)
        model.fit(texts, labels, batch_size=8, verbose=0,
                  phases=[kt.FineTunePhase(epochs=1, learning_rate=rate, warmup=0.0)])
        reports[rate] = forgetting_report(original, model, texts)
    high, low = reports[1e-2], reports[1e-6]
    assert high.weight_change > 1e-5
    assert all(row["weight_change"] > 1e-5 for row in high.blocks)
    assert high.mean_cka < 0.999 and high.mean_cosine < 0.999
    assert high.weight_change > 100 * low.weight_change
    assert high.mean_cka < low.mean_cka
