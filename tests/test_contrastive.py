"""The contrastive phase (SetFit's recipe) on a tiny random KerasHub BERT."""

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras_transfer as kt  # noqa: E402
from keras_transfer.contrastive import PairSimilarity, sample_pairs  # noqa: E402
from test_text import LABELS, TEXTS, tiny_model  # noqa: E402


def network_weights(model):
    return [np.array(w) for w in model.backbone.network.weights]


def embeddings(model, texts):
    tokens = keras.tree.map_structure(keras.ops.convert_to_numpy, model.backbone.tokenize(texts))
    vectors = keras.ops.convert_to_numpy(model.backbone(tokens))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def class_gap(model):
    """Mean cosine of pairs of one class less that of pairs of two classes."""
    vectors, labels = embeddings(model, TEXTS[:6]), np.array(LABELS[:6])
    cosine = vectors @ vectors.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    return cosine[same & off].mean() - cosine[~same].mean()


def test_pairs_are_balanced_labelled_and_seeded():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1 + [3] * 2)
    first, second, target = sample_pairs(labels, iterations=7, seed=3)
    n = len(labels)
    assert len(first) == len(second) == len(target) == 2 * 7 * n
    assert target.sum() == 7 * n  # as many pairs of one class as of two
    np.testing.assert_array_equal(target, (labels[first] == labels[second]).astype("float32"))
    # No pair of a text with itself, except for the class of one example.
    selves = first == second
    assert set(labels[first[selves]]) <= {2}
    # Every example is in at least `iterations` pairs of each kind.
    for kind in (0.0, 1.0):
        counts = np.bincount(np.concatenate([first[target == kind], second[target == kind]]),
                             minlength=n)
        assert counts.min() >= 7
    again = sample_pairs(labels, iterations=7, seed=3)
    other = sample_pairs(labels, iterations=7, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((first, second, target), again))
    assert not np.array_equal(first, other[0])


def test_pair_similarity_is_the_cosine():
    model = tiny_model()
    tokens = keras.tree.map_structure(keras.ops.convert_to_numpy,
                                      model.backbone.tokenize(TEXTS[:4]))
    swapped = keras.tree.map_structure(lambda a: a[::-1], tokens)
    cosine = keras.ops.convert_to_numpy(PairSimilarity(model.backbone)((tokens, swapped)))
    vectors = embeddings(model, TEXTS[:4])
    np.testing.assert_allclose(cosine, (vectors * vectors[::-1]).sum(axis=1), atol=1e-5)


def test_contrastive_then_head_tunes_the_encoder_and_solves_the_probe():
    model = tiny_model()
    before, gap = network_weights(model), class_gap(model)
    seen = []

    class Epochs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, self.model is model, sorted(logs or {})))

    history = model.fit(TEXTS, LABELS, phases=[
        kt.ContrastivePhase(iterations=2, epochs=3, batch_size=16, learning_rate=1e-3),
        kt.HeadPhase()], callbacks=[Epochs()], seed=0, verbose=0)
    contrastive, head = history.phases
    assert [contrastive.name, head.name] == ["contrastive", "head"]
    assert contrastive.details["head"] == {"pairs": 2 * 2 * 24, "positive": 2 * 24,
                                           "steps": 3 * 6}
    losses = history.history["contrastive_loss"][:3]
    assert losses[-1] < losses[0]  # the loss falls
    assert class_gap(model) > gap + 0.1  # texts of one class moved closer than of two
    assert any(not np.array_equal(a, b) for a, b in zip(before, network_weights(model)))
    # Callbacks saw the transfer model, with the run's epoch numbers.
    assert [e for e, _, _ in seen] == [0, 1, 2, 3] and all(m for _, m, _ in seen)
    assert "contrastive_loss" in seen[0][2]
    # The probe was solved on the tuned embeddings, and the encoder stayed frozen for it.
    assert head.details["head"]["solver"] == "probe"
    assert not model.backbone.trainable
    assert model.evaluate(TEXTS, LABELS)["accuracy"] == 1.0


def test_gradients_are_clipped_to_the_global_norm():
    # Clipped to a norm of 1e-12, Adam's step is about lr * 1e-12 / epsilon
    # (1e-7): the encoder does not move. Unclipped, it moves by about lr.
    def largest_change(clip):
        model = tiny_model()
        before = network_weights(model)
        model.fit(TEXTS, LABELS, phases=[kt.ContrastivePhase(
            iterations=1, batch_size=16, learning_rate=1e-3, warmup=0.0, weight_decay=0.0,
            global_clipnorm=clip)], seed=0, verbose=0)
        return max(np.abs(a - b).max() for a, b in zip(before, network_weights(model)))

    assert largest_change(1e-12) < 1e-6 < 1e-4 < largest_change(None)


def test_lora_trains_only_the_adapters():
    model = tiny_model()
    before = {w.path: np.array(w) for w in model.backbone.network.weights}
    order = np.argsort(LABELS, kind="stable")  # labels sorted by class are fine too
    model.fit([TEXTS[i] for i in order], np.array(LABELS)[order], phases=[
        kt.ContrastivePhase(iterations=1, batch_size=16, lora_rank=2)], seed=0, verbose=0)
    assert model.backbone.lora_rank == 2
    changed = {w.path for w in model.backbone.network.weights
               if w.path not in before or not np.array_equal(before[w.path], np.array(w))}
    assert changed and all("lora" in path for path in changed)


def test_one_class_is_refused_before_training():
    with pytest.raises(kt.DataError, match="at least two classes"):
        sample_pairs([1, 1, 1])
    model = tiny_model()
    before = [np.array(w) for w in model.weights]
    with pytest.raises(kt.DataError, match="at least two classes"):
        model.fit(TEXTS, [1] * len(TEXTS), phases=[kt.HeadPhase(), kt.ContrastivePhase()],
                  verbose=0)
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(before, model.weights))


def test_image_backbone_is_refused_before_training(tiny_images):
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Conv2D(4, 3, strides=2)(inputs)
    model = kt.ImageTransferModel(keras.Model(inputs, outputs), 3, pooling="avg",
                                  preprocessing="tf")
    before = [np.array(w) for w in model.weights]
    with pytest.raises(kt.BackboneError, match="sentence encoders"):
        model.fit(*tiny_images, phases=[kt.HeadPhase(), kt.ContrastivePhase()], verbose=0)
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(before, model.weights))


@pytest.mark.parametrize("options", [
    {"iterations": 0}, {"epochs": 1.5}, {"batch_size": 0}, {"learning_rate": -1e-5},
    {"learning_rate": float("nan")}, {"warmup": 1.5}, {"weight_decay": -0.1},
    {"lora_rank": 0}, {"iterations": True}, {"global_clipnorm": 0.0},
    {"global_clipnorm": float("inf")},
])
def test_bad_numbers_are_refused(options):
    name = next(iter(options))
    with pytest.raises(kt.PhaseOptionError, match=f"Received {name}="):
        kt.ContrastivePhase(**options)
