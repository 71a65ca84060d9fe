"""Insight tools on cases whose answers are known by hand."""

import functools
import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from matplotlib.figure import Figure

from keras_transfer import insight, saliency
from keras_transfer.errors import DataError
from keras_transfer.plots import plot_history

# Nine examples of three classes. By hand: class 0 is found 2 of 3 times,
# class 1 both times (but predicted 4 times), class 2 in 2 of 4.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
Y_PRED = np.array([0, 1, 0, 1, 1, 2, 0, 2, 1])
COUNTS = np.array([[2, 1, 0],
                   [0, 2, 0],
                   [1, 1, 2]])


def one_hot(labels, classes=3):
    return np.eye(classes)[labels]


def probabilities_of(predicted, classes=3, confidence=0.7, seed=0):
    """Probability rows whose argmax is `predicted`."""
    rng = np.random.default_rng(seed)
    rest = rng.dirichlet(np.ones(classes - 1), len(predicted)) * (1 - confidence)
    rows = np.zeros((len(predicted), classes))
    for row, (label, others) in enumerate(zip(predicted, rest)):
        rows[row, label] = confidence
        rows[row, [c for c in range(classes) if c != label]] = others
    return rows


def test_confusion_matrix_counts_known_predictions():
    np.testing.assert_array_equal(insight.confusion_matrix(Y_TRUE, Y_PRED), COUNTS)
    # one-hot labels and probability rows give the same counts
    np.testing.assert_array_equal(
        insight.confusion_matrix(one_hot(Y_TRUE), probabilities_of(Y_PRED)), COUNTS)
    wider = insight.confusion_matrix(Y_TRUE, Y_PRED, num_classes=5)
    assert wider.shape == (5, 5) and wider.sum() == 9
    np.testing.assert_array_equal(wider[:3, :3], COUNTS)


def test_confusion_matrix_normalizations():
    rows = insight.confusion_matrix(Y_TRUE, Y_PRED, normalize="true")
    np.testing.assert_allclose(rows, COUNTS / np.array([[3], [2], [4]]))
    np.testing.assert_allclose(insight.confusion_matrix(Y_TRUE, Y_PRED, normalize="pred"),
                               COUNTS / np.array([[3, 4, 2]]))
    np.testing.assert_allclose(insight.confusion_matrix(Y_TRUE, Y_PRED, normalize="all"),
                               COUNTS / 9)
    # a class without examples gives a row of zeros, not NaN
    empty = insight.confusion_matrix(Y_TRUE, Y_PRED, num_classes=4, normalize="true")
    assert np.all(np.isfinite(empty)) and empty[3].sum() == 0
    np.testing.assert_allclose(empty[:3].sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="normalize"):
        insight.confusion_matrix(Y_TRUE, Y_PRED, normalize="rows")


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(DataError, match="num_classes=2"):
        insight.confusion_matrix(Y_TRUE, Y_PRED, num_classes=2)
    with pytest.raises(DataError, match="9 labels and 8 predictions"):
        insight.confusion_matrix(Y_TRUE, Y_PRED[:8])
    with pytest.raises(DataError, match="not class indices"):
        insight.confusion_matrix(Y_TRUE, np.full(9, 0.4))


def test_classification_report_matches_hand_computed_values():
    report = insight.classification_report(Y_TRUE, probabilities_of(Y_PRED), ["a", "b", "c"])
    assert isinstance(report, dict)
    expected = {"a": (2 / 3, 2 / 3, 2 / 3, 3), "b": (1 / 2, 1.0, 2 / 3, 2),
                "c": (1.0, 1 / 2, 2 / 3, 4)}
    for name, (precision, recall, f1, support) in expected.items():
        values = report["classes"][name]
        assert values["precision"] == pytest.approx(precision)
        assert values["recall"] == pytest.approx(recall)
        assert values["f1"] == pytest.approx(f1)
        assert values["support"] == support
    assert report["accuracy"] == pytest.approx(6 / 9)
    assert report["macro avg"]["precision"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert report["weighted avg"]["precision"] == pytest.approx(7 / 9)
    assert report["weighted avg"]["recall"] == pytest.approx(6 / 9)
    text = str(report)
    assert "precision" in text and "weighted avg" in text
    assert text.splitlines()[1].split() == ["a", "0.667", "0.667", "0.667", "3"]


def test_classification_report_is_zero_division_safe():
    # class 1 is never predicted, class 3 never occurs at all
    report = insight.classification_report([0, 1, 1, 2], [0, 0, 2, 2], list("wxyz"))
    assert report["classes"]["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["classes"]["z"]["support"] == 0
    # the macro average counts the three classes that occur, not the absent one
    assert report["macro avg"]["recall"] == pytest.approx((1 + 0 + 1) / 3)
    empty = insight.classification_report(np.zeros(0, int), np.zeros((0, 2)))
    assert empty["accuracy"] == 0.0 and "0" in str(empty)
    with pytest.raises(DataError, match="2 class names for 3 classes"):
        insight.classification_report(Y_TRUE, probabilities_of(Y_PRED), ["a", "b"])


def test_classification_report_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 200)
    probabilities = rng.dirichlet(np.ones(5), 200)
    probabilities[y < 3, 4] = 0  # class 4 is predicted rarely
    ours = insight.classification_report(y, probabilities)
    theirs = metrics.classification_report(y, probabilities.argmax(1), output_dict=True,
                                           zero_division=0)
    for name in map(str, range(5)):
        for key, their_key in (("precision", "precision"), ("recall", "recall"),
                               ("f1", "f1-score"), ("support", "support")):
            assert ours["classes"][name][key] == pytest.approx(theirs[name][their_key])
    for average in ("macro avg", "weighted avg"):
        assert ours[average]["f1"] == pytest.approx(theirs[average]["f1-score"])
        assert ours[average]["precision"] == pytest.approx(theirs[average]["precision"])
    assert ours["accuracy"] == pytest.approx(theirs["accuracy"])


def test_top_k_orders_classes_with_names():
    probabilities = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    best = insight.top_k(probabilities, k=2, class_names=["cat", "dog", "fox"])
    assert best == [[(1, "dog", 0.6), (2, "fox", 0.3)], [(0, "cat", 0.5), (2, "fox", 0.3)]]
    assert best[0][0].name == "dog" and best[0][0].probability == 0.6
    assert [p.index for p in insight.top_k(probabilities[0], k=10)[0]] == [1, 2, 0]
    assert insight.top_k(probabilities, 1)[1][0].name == "0"
    with pytest.raises(ValueError, match="k=0"):
        insight.top_k(probabilities, k=0)


def test_worst_predictions_pick_the_confident_mistakes():
    y = np.array([0, 1, 2, 0, 1, 2])
    probabilities = np.array([
        [0.99, 0.005, 0.005],  # right, very sure
        [0.90, 0.05, 0.05],    # wrong at 0.90
        [0.20, 0.20, 0.60],    # right
        [0.30, 0.60, 0.10],    # wrong at 0.60
        [0.10, 0.10, 0.80],    # wrong at 0.80
        [0.10, 0.05, 0.85],    # right
    ])
    worst = insight.worst_predictions(probabilities, y, k=16)
    assert [m.index for m in worst] == [1, 4, 3]
    assert worst[0] == (1, 1, 0, 0.90, 0.05)
    assert [m.index for m in insight.worst_predictions(probabilities, one_hot(y), k=2)] == [1, 4]
    assert insight.worst_predictions(one_hot(y), y) == []


def test_plot_confusion_matrix_of_twenty_classes(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 20, 400)
    predicted = np.where(rng.random(400) < 0.7, y, rng.integers(0, 20, 400))
    matrix = insight.confusion_matrix(y, predicted, num_classes=20)
    names = [f"class_{i}" for i in range(20)]
    path = tmp_path / "confusion.png"
    figure = insight.plot_confusion_matrix(matrix, names, path=str(path))
    assert isinstance(figure, Figure) and path.stat().st_size > 10_000
    axis = figure.axes[0]
    assert len(axis.texts) == np.count_nonzero(matrix)  # zeros left blank past 10 classes
    assert [t.get_text() for t in axis.get_xticklabels()] == names
    assert "accuracy" in axis.get_title()
    small = insight.plot_confusion_matrix(COUNTS, normalize=None)
    assert sorted(t.get_text() for t in small.axes[0].texts) == sorted(map(str, COUNTS.flat))
    shares = insight.plot_confusion_matrix(COUNTS)
    annotations = [t.get_text() for t in shares.axes[0].texts]
    assert "1\n33%" in annotations and "2\n50%" in annotations  # 1 of 3, 2 of 4
    with pytest.raises(DataError, match="square"):
        insight.plot_confusion_matrix(np.zeros((2, 3)))


def test_plot_worst_images_grid(tmp_path):
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 2, 0, 1, 2])
    probabilities = probabilities_of([1, 1, 0, 2, 0, 2], confidence=0.8)
    gray = rng.uniform(0, 255, (6, 12, 10))  # float 0-255, grayscale
    path = tmp_path / "worst.png"
    figure = insight.plot_worst_images(gray, probabilities, y, ["a", "b", "c"], k=16,
                                       path=str(path))
    assert isinstance(figure, Figure) and path.stat().st_size > 1000
    drawn = [axis for axis in figure.axes if axis.images]
    assert len(drawn) == 4  # four mistakes
    assert drawn[0].get_title().startswith("true: a\npred: b")
    rgb = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    assert len([a for a in insight.plot_worst_images(rgb, probabilities, y, None, k=2).axes
                if a.images]) == 2
    none_wrong = insight.plot_worst_images(rgb, one_hot(y), y, None)
    assert "no mistakes" in none_wrong.axes[0].texts[0].get_text()


def test_worst_texts_table():
    texts = ["fine", "a long\nreview " * 20, "ok", "bad"]
    y = np.array([1, 0, 1, 0])
    probabilities = np.array([[0.7, 0.3], [0.1, 0.9], [0.2, 0.8], [0.4, 0.6]])
    rows, table = insight.worst_texts_table(texts, probabilities, y, ["neg", "pos"], width=30)
    assert [r["index"] for r in rows] == [1, 0, 3]
    assert rows[0] == {"index": 1, "text": texts[1], "true": "neg", "predicted": "pos",
                       "confidence": 0.9}
    lines = table.splitlines()
    assert lines[0].split() == ["index", "true", "predicted", "confidence", "text"]
    assert len(lines) == 2 + 3
    assert "90.0%" in lines[2] and "a long review a long" in lines[2]
    text_column = lines[2][lines[0].index("text"):]
    assert text_column.endswith("…") and len(text_column) == 30


# Grad-CAM on a network whose answer is known: channel 0 of the "detect"
# layer fires on a uniform bright square, channel 1 (ten times stronger) on a
# checkerboard. Each image has a square in one quadrant and a checkerboard in
# another; the class is the square's quadrant. Only the gradient tells the
# two channels apart: a heat map of raw activations would point at the
# checkerboard.
SIZE = 16


def detector_network():
    inputs = keras.Input((SIZE, SIZE, 1))
    conv = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="detect")
    network = keras.Model(inputs, conv(inputs), name="detector")
    bright = np.full((3, 3), 1 / 9)
    checker = np.where(np.indices((3, 3)).sum(0) % 2 == 0, 10.0, -10.0)
    kernel = np.stack([bright, checker], -1)[:, :, None, :].astype("float32")
    conv.set_weights([kernel, np.array([-0.8, -25.0], "float32")])
    return network


def quadrant_head():
    """Dense softmax head: the logit of class q sums channel 0 over quadrant q."""
    kernel = np.zeros((SIZE, SIZE, 2, 4), "float32")
    half = SIZE // 2
    for q in range(4):
        row, col = divmod(q, 2)
        kernel[row * half:(row + 1) * half, col * half:(col + 1) * half, 0, q] = 1.0
    head = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    head.build((None, SIZE, SIZE, 2))
    head.layers[-1].set_weights([kernel.reshape(-1, 4), np.zeros(4, "float32")])
    return head


def square_and_checkerboard_images(count, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.3, (count, SIZE, SIZE, 1)).astype("float32")
    square_quadrant = rng.integers(0, 4, count)
    checker_quadrant = (square_quadrant + rng.integers(1, 4, count)) % 4
    checkerboard = (np.indices((4, 4)).sum(0) % 2 == 0).astype("float32")
    half = SIZE // 2
    for image, square, checker in zip(images, square_quadrant, checker_quadrant):
        for quadrant, patch in ((square, np.ones((4, 4))), (checker, checkerboard)):
            row, col = divmod(int(quadrant), 2)
            top, left = row * half + rng.integers(1, 4), col * half + rng.integers(1, 4)
            image[top:top + 4, left:left + 4, 0] = patch
    return images, square_quadrant, checker_quadrant


def peak_quadrants(heatmaps):
    rows, cols = np.unravel_index(heatmaps.reshape(len(heatmaps), -1).argmax(1),
                                  heatmaps.shape[1:])
    return (rows >= SIZE // 2) * 2 + (cols >= SIZE // 2)


@pytest.mark.tensorflow  # Grad-CAM's gradients come from tf.GradientTape
@pytest.mark.parametrize("method", saliency.CAM_METHODS)
def test_grad_cam_peaks_on_the_region_that_decides_the_class(method):
    network, head = detector_network(), quadrant_head()
    images, square, checker = square_and_checkerboard_images(24)
    np.testing.assert_array_equal(head(network(images)).numpy().argmax(1), square)
    assert saliency.last_conv_layer(network) == "detect"
    heatmaps = saliency.grad_cam(network, None, saliency.head_logits(head), images, method=method)
    assert heatmaps.shape == (24, SIZE, SIZE) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0 and np.allclose(heatmaps.max(axis=(1, 2)), 1.0)
    assert np.mean(peak_quadrants(heatmaps) == square) >= 0.9
    # the raw activations point elsewhere: the gradient is what finds the square
    activations = network(images).numpy().sum(-1)
    assert np.mean(peak_quadrants(activations) == checker) >= 0.9


@pytest.mark.tensorflow  # Grad-CAM's gradients come from tf.GradientTape
@pytest.mark.parametrize("method", saliency.CAM_METHODS)
def test_grad_cam_follows_the_class_asked_for(method):
    network = detector_network()

    def head_fn(features):  # class 0: squares, class 1: checkerboards (always predicted)
        return keras.ops.sum(features, axis=(1, 2))

    images, square, checker = square_and_checkerboard_images(12, seed=1)
    cam = functools.partial(saliency.grad_cam, network, "detect", head_fn, images, method=method)
    predicted = cam(batch_size=5)
    assert np.mean(peak_quadrants(predicted) == checker) >= 0.9
    squares = cam(class_index=0)
    assert np.mean(peak_quadrants(squares) == square) >= 0.9
    mixed = cam(class_index=[0, 1] * 6)
    np.testing.assert_allclose(mixed[::2], squares[::2], atol=1e-6)
    np.testing.assert_allclose(mixed[1::2], predicted[1::2], atol=1e-6)
    with pytest.raises(DataError, match="class_index of shape"):
        cam(class_index=[0, 1])


@pytest.mark.tensorflow  # Grad-CAM's gradients come from tf.GradientTape
def test_grad_cam_finds_what_a_trained_flatten_head_looks_at():
    # The class is the quadrant of the square; a Flatten head weighs each
    # position on its own, which a per-channel average of gradients loses.
    keras.utils.set_random_seed(0)
    images, square, _ = square_and_checkerboard_images(500, seed=2)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="features")(x)
    network = keras.Model(inputs, x)
    head = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    model = keras.Sequential([network, head])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(images[:400], square[:400], epochs=8, batch_size=32, verbose=0)
    assert model.evaluate(images[400:], square[400:], verbose=0)[1] >= 0.9
    heatmaps = saliency.grad_cam(network, None, saliency.head_logits(head), images[400:])
    assert np.mean(peak_quadrants(heatmaps) == square[400:]) >= 0.8
    with pytest.raises(ValueError, match="method='cam'"):
        saliency.grad_cam(network, None, saliency.head_logits(head), images[:1], method="cam")


def test_head_logits_are_the_scores_before_softmax():
    head = quadrant_head()
    features = np.random.default_rng(0).uniform(0, 1, (3, SIZE, SIZE, 2)).astype("float32")
    logits = keras.ops.convert_to_numpy(saliency.head_logits(head)(features))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.softmax(logits)),
                               keras.ops.convert_to_numpy(head(features)), rtol=1e-5)
    with pytest.raises(ValueError, match="Dense"):
        saliency.head_logits(keras.Sequential([keras.layers.Flatten()]))


def test_last_conv_layer_skips_pooling_and_needs_a_feature_map():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    assert saliency.last_conv_layer(keras.Model(inputs, x)) == "conv"
    flat = keras.Input((5,))
    with pytest.raises(ValueError, match="no layer with a 4-D"):
        saliency.last_conv_layer(keras.Model(flat, keras.layers.Dense(2)(flat)))


@pytest.mark.tensorflow  # Grad-CAM's gradients come from tf.GradientTape
def test_overlay_and_grad_cam_grid(tmp_path):
    heatmap = np.array([[1.0, 0.0], [0.0, 0.0]], "float32")
    black = np.zeros((20, 30), np.uint8)
    blended = saliency.overlay_heatmap(black, heatmap, alpha=1.0)
    assert blended.shape == (20, 30, 3) and blended.dtype == np.uint8
    # upsampled: the hot corner is red, the far corner the colour of 0 (blue)
    assert blended[0, 0, 0] > 100 and blended[0, 0, 2] < 50
    assert blended[-1, -1, 2] > 100 and blended[-1, -1, 0] < 50
    images, *_ = square_and_checkerboard_images(5)
    heatmaps = saliency.grad_cam(detector_network(), None,
                                saliency.head_logits(quadrant_head()), images)
    path = tmp_path / "cam.png"
    figure = saliency.plot_grad_cam(images * 255, heatmaps, [f"q{i}" for i in range(5)],
                                   path=str(path))
    assert isinstance(figure, Figure) and path.stat().st_size > 1000
    assert [a.get_title() for a in figure.axes if a.images] == [f"q{i}" for i in range(5)]
    with pytest.raises(DataError, match="5 images and 4 heat maps"):
        saliency.plot_grad_cam(images, heatmaps[:4])


def two_phase_history(rate_start=0.0):
    """A flat loss near ln(10) (matplotlib would offset it by +2.3026)."""
    return SimpleNamespace(
        history={"loss": [2.302585, 2.302581, 2.302577, 2.302574, 2.302570, 2.302566],
                 "val_loss": [2.302584, 2.302582, 2.302578, 2.302575, 2.302572, 2.302569],
                 "accuracy": [0.1, 0.12, 0.13, 0.2, 0.3, 0.35],
                 "val_accuracy": [0.1, 0.1, 0.12, 0.2, 0.25, 0.3],
                 "learning_rate": [1e-3, 1e-3, 1e-3, rate_start, 5e-6, math.nan]},
        phases=[SimpleNamespace(name="head", first_epoch=0, epochs_run=3),
                SimpleNamespace(name="fine_tune", first_epoch=3, epochs_run=3)])


def test_plot_history_has_no_offset_and_a_positive_log_rate_axis(tmp_path):
    path = tmp_path / "history.png"
    figure = plot_history(two_phase_history(), path=str(path))
    assert isinstance(figure, Figure) and path.stat().st_size > 1000
    figure.draw_without_rendering()
    loss, accuracy, rate = figure.axes
    assert [loss.get_title(), accuracy.get_title(), rate.get_title()] == \
        ["loss", "accuracy", "learning_rate"]
    for axis in (loss, accuracy, rate):
        assert axis.yaxis.get_offset_text().get_text() == ""
        # both phases drawn, the boundary marked between epochs 3 and 4
        assert any(list(line.get_xdata()) == [3.5, 3.5] for line in axis.lines)
    assert "2.302585" in [t.get_text() for t in loss.get_yticklabels()]
    assert rate.get_yscale() == "log"
    low, high = rate.get_ylim()
    assert 0 < low < 5e-6 and high > 1e-3
    assert all(tick > 0 for tick in rate.get_yticks())
    # a rate of 0 everywhere cannot be drawn on a log scale: linear, no error
    flat = two_phase_history()
    flat.history["learning_rate"] = [0.0] * 6
    assert plot_history(flat, ["learning_rate"]).axes[0].get_yscale() == "linear"
    assert len(plot_history(flat.history).axes) == 3  # a bare dict has no phases


@pytest.mark.tensorflow  # Grad-CAM's gradients come from tf.GradientTape
def test_model_grad_cam_explains_a_transfer_model_on_raw_images():
    import keras_transfer as kt

    inputs = keras.Input((16, 16, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    model = kt.ImageTransferModel(keras.Model(inputs, features), 2, preprocessing="tf")
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)).astype("float32")
    heatmaps = kt.model_grad_cam(model, images)
    assert heatmaps.shape == (3, 16, 16) and 0 <= heatmaps.min() and heatmaps.max() <= 1
    direct = saliency.grad_cam(model.backbone.network, "conv", model.head, images / 127.5 - 1)
    np.testing.assert_allclose(heatmaps, direct, atol=1e-5)
    with pytest.raises(ValueError, match="image transfer model"):
        kt.model_grad_cam(keras.Sequential([keras.layers.Dense(2)]), images)
