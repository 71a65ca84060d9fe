"""Feature extraction: the cache of backbone features, its key, its safety, heads trained on it."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
try:
    import tensorflow as tf
except ImportError:  # a run on another backend without TensorFlow: its tests are marked
    tf = None

import keras_transfer as kt
from keras_transfer import feature_cache as features
from keras_transfer import feature_extraction as extraction
from keras_transfer.data import steps_of
from keras_transfer.errors import DataError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    """Every test gets its own cache root through the environment variable."""
    root = tmp_path / "feature_cache"
    monkeypatch.setenv(features.CACHE_ENV_VAR, str(root))
    return root


@pytest.fixture
def backbone_runs(monkeypatch):
    """Counts the batches the backbone runs on during extraction."""
    calls = []
    original = extraction._feature_function

    def counting(model, spec, augmentation=None, network=None):
        function = original(model, spec, augmentation, network)

        def run(inputs):
            calls.append(len(keras.tree.flatten(inputs)[0]))
            return function(inputs)

        return run

    monkeypatch.setattr(extraction, "_feature_function", counting)
    return calls


def tiny_backbone(seed=0):
    """A two-convolution network that takes images of any size."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    x = keras.layers.Conv2D(6, 3, strides=2, activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(x)
    return keras.Model(inputs, x, name="tiny")


def tiny_model(backbone=None, size=16, preprocessing="tf", **kwargs):
    return kt.ImageTransferModel(backbone or tiny_backbone(), 3, input_shape=(size, size, 3),
                                 preprocessing=preprocessing, pooling="avg", **kwargs)


def images(n=24, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 3, n)


def entries(root):
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


# ------------------------------------------------------------ the cache
def test_features_are_the_backbone_outputs_streamed_back_from_shards(backbone_runs):
    x, y = images(23)
    model = tiny_model()
    cache = features.extract_features(model, x, y, batch_size=8, shard_size=5)
    assert not cache.reused and backbone_runs == [23]  # the backbone runs on batches of 64
    assert cache.num_examples == 23 and cache.feature_shape == (3, 3, 6) and cache.copies == 1
    assert len(cache.manifest["shards"]) == 5  # 5 + 5 + 5 + 5 + 3
    expected = keras.ops.convert_to_numpy(model.backbone(x.astype("float32"), training=False))
    stored, labels = cache.load()
    np.testing.assert_allclose(stored, expected, atol=1e-6)
    np.testing.assert_array_equal(labels, y)
    # Each shard is a plain .npy file.
    first = cache.manifest["shards"][0]
    np.testing.assert_allclose(np.load(os.path.join(cache.path, first["features"]["file"])),
                               expected[:5], atol=1e-6)
    # Read into memory (the cache fits the shuffle budget) or streamed record by
    # record from the shards (a budget of one byte): the same batches.
    for budget in ({}, {"shuffle_buffer_bytes": 1}):
        streamed = list(cache.dataset(batch_size=4, **budget))
        assert len(streamed) == 6 == steps_of(cache.dataset(batch_size=4, **budget))
        np.testing.assert_array_equal(np.concatenate([f for f, _ in streamed]), stored)
        np.testing.assert_array_equal(np.concatenate([label for _, label in streamed]), y)
        shuffled = list(cache.dataset(batch_size=4, shuffle=True, seed=1, **budget))
        order = np.concatenate([label for _, label in shuffled])
        assert sorted(order.tolist()) == sorted(y.tolist())
        assert len(list(cache.dataset(batch_size=4, drop_remainder=True, **budget))) == 5
    # A subset of rows (a held-out split), in the order given unless shuffled.
    rows = np.array([20, 3, 7, 11, 0])
    subset = list(cache.dataset(batch_size=2, rows=rows))
    assert len(subset) == 3 == steps_of(cache.dataset(batch_size=2, rows=rows))
    np.testing.assert_array_equal(np.concatenate([f for f, _ in subset]), stored[rows])
    shuffled = np.concatenate([label for _, label in cache.dataset(
        batch_size=2, rows=rows, shuffle=True, seed=3)])
    assert sorted(shuffled.tolist()) == sorted(y[rows].tolist())
    assert cache.fits_in_memory() and not cache.fits_in_memory(1)
    for bad in (np.array([0, 23]), np.array([[1, 2]]), np.array([0.5])):
        with pytest.raises(ValueError, match="Received rows"):
            cache.dataset(batch_size=2, rows=bad)
    if keras.backend.backend() == "tensorflow":  # streamed record by record: no rows
        with pytest.raises(ValueError, match="streamed from its shards"):
            cache.dataset(batch_size=2, rows=rows, shuffle_buffer_bytes=1)
    cache.verify()
    manifest = json.loads(open(os.path.join(cache.path, "manifest.json")).read())
    assert manifest["complete"] and set(manifest["key"]) >= {"model", "data", "num_examples"}
    assert set(manifest["key"]["model"]) >= {"architecture", "weights", "preprocessing",
                                             "input_size"}
    assert all(len(part["sha256"]) == 64 for shard in manifest["shards"]
               for part in (shard["features"], shard["labels"]))


def test_second_call_reuses_the_cache_without_running_the_backbone(backbone_runs):
    x, y = images()
    model = tiny_model()
    first = features.extract_features(model, x, y, batch_size=8)
    manifest = os.path.join(first.path, "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns
    backbone_runs.clear()
    # Another build of the same network with the same weights, another batch size.
    twin = tiny_model(tiny_backbone(seed=7))
    twin.set_weights(model.get_weights())
    kt.unfreeze(twin.backbone)  # trainable flags are not part of the key
    second = features.extract_features(twin, x, y, batch_size=5)
    assert second.reused and second.path == first.path
    assert backbone_runs == []
    assert os.stat(manifest).st_mtime_ns == stamp
    np.testing.assert_array_equal(second.load()[0], first.load()[0])


def _changed(kind, model, x, y):
    """The model and data of `kind`, differing from `(model, x, y)` in one thing."""
    if kind == "data":
        x = x.copy()
        x[3, 2, 2, 1] ^= 1
    elif kind == "labels":
        y = y.copy()
        y[0] = (y[0] + 1) % 3
    elif kind == "weights":
        kernel = model.backbone.network.layers[1].kernel
        kernel.assign(kernel + 1e-3)
    elif kind == "input size":
        model = tiny_model(model.backbone.network, size=20)
    elif kind == "preprocessing":
        model = tiny_model(model.backbone.network, preprocessing="none")
    elif kind == "architecture":
        model = tiny_model(keras.Sequential([keras.Input((None, None, 3)),
                                             keras.layers.Conv2D(6, 5, strides=4)]))
    return model, x, y


@pytest.mark.parametrize("kind", ["data", "labels", "weights", "input size",
                                  "preprocessing", "architecture"])
def test_any_change_of_the_key_rebuilds(kind, backbone_runs):
    x, y = images()
    model = tiny_model()
    first = features.extract_features(model, x, y, batch_size=8)
    model, x, y = _changed(kind, model, x, y)
    backbone_runs.clear()
    second = features.extract_features(model, x, y, batch_size=8)
    assert not second.reused and second.path != first.path
    assert sum(backbone_runs) == len(x)
    # And the changed setting is itself cached now.
    assert features.extract_features(model, x, y, batch_size=8).reused


def test_cache_root_argument_environment_and_default(tmp_path, monkeypatch, cache_root):
    x, y = images(8)
    model = tiny_model()
    explicit = features.extract_features(model, x, y, cache_dir=tmp_path / "mine")
    assert explicit.path.startswith(str(tmp_path / "mine"))
    assert features.extract_features(model, x, y).path.startswith(str(cache_root))
    monkeypatch.delenv(features.CACHE_ENV_VAR)
    assert features.default_cache_dir() == os.path.expanduser(
        os.path.join("~", ".cache", "keras_transfer", "features"))


# ---------------------------------------------- unfinished extractions
KILLED_SCRIPT = textwrap.dedent("""
    import os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras
    import numpy as np
    import keras_transfer as kt
    from keras_transfer import feature_cache as features
    from keras_transfer import feature_extraction as extraction

    backbone_file, root = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, 24)
    model = kt.ImageTransferModel(keras.saving.load_model(backbone_file), 3,
                                  input_shape=(16, 16, 3), preprocessing="tf", pooling="avg")
    original = extraction._feature_function

    def slow(model, spec, augmentation=None, network=None):
        function = original(model, spec, augmentation, network)

        def run(inputs):
            time.sleep(0.5)
            return function(inputs)
        return run

    extraction._feature_function = slow
    features.MIN_EXTRACTION_BATCH = 1  # one backbone call per 2 images: a slow extraction
    features.extract_features(model, x, y, batch_size=2, shard_size=2, cache_dir=root)
    print("finished")
""")


def test_killed_extraction_leaves_no_usable_cache_and_is_rebuilt(tmp_path, backbone_runs):
    backbone_file = str(tmp_path / "tiny.keras")
    tiny_backbone().save(backbone_file)
    root = tmp_path / "killed_root"
    script = tmp_path / "extract.py"
    script.write_text(KILLED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, str(script), backbone_file, str(root)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and child.poll() is None:
            partial = [e for e in entries(root) if e.startswith(".tmp-")]
            # features-00001.npy exists: shard 0 is complete, the rest is not written.
            if partial and os.path.exists(root / partial[0] / "features-00001.npy"):
                break
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()[1].decode()[-2000:]
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    left = entries(root)
    assert len(left) == 1 and left[0].startswith(".tmp-")  # only the unfinished one
    assert not os.path.exists(root / left[0] / "manifest.json")

    x, y = images(24)
    model = tiny_model(keras.saving.load_model(backbone_file))
    cache = features.extract_features(model, x, y, batch_size=4, cache_dir=root)
    assert not cache.reused and sum(backbone_runs) == 24
    assert entries(root) == [os.path.basename(cache.path)]  # the unfinished one is gone
    cache.verify()
    expected = keras.ops.convert_to_numpy(model.backbone(x.astype("float32"), training=False))
    np.testing.assert_allclose(cache.load()[0], expected, atol=1e-6)
    assert features.extract_features(model, x, y, cache_dir=root).reused


def test_an_error_mid_extraction_leaves_nothing_behind(monkeypatch, cache_root):
    x, y = images()
    model = tiny_model()
    original = extraction._feature_function

    def failing(model, spec, augmentation=None, network=None):
        function = original(model, spec, augmentation, network)
        seen = []

        def run(inputs):
            seen.append(1)
            if len(seen) == 3:
                raise RuntimeError("disk full")
            return function(inputs)

        return run

    monkeypatch.setattr(extraction, "_feature_function", failing)
    monkeypatch.setattr(features, "MIN_EXTRACTION_BATCH", 1)
    with pytest.raises(RuntimeError, match="disk full"):
        features.extract_features(model, x, y, batch_size=4, shard_size=4)
    assert entries(cache_root) == []
    monkeypatch.setattr(extraction, "_feature_function", original)
    assert not features.extract_features(model, x, y, batch_size=4).reused


@pytest.mark.parametrize("damage", ["no manifest", "manifest not complete", "truncated shard"])
def test_a_damaged_cache_is_ignored_and_rebuilt(damage, backbone_runs, caplog):
    x, y = images()
    model = tiny_model()
    cache = features.extract_features(model, x, y, batch_size=8, shard_size=10)
    manifest_path = os.path.join(cache.path, "manifest.json")
    if damage == "no manifest":
        os.remove(manifest_path)
    elif damage == "manifest not complete":
        manifest = json.load(open(manifest_path))
        manifest["complete"] = False
        json.dump(manifest, open(manifest_path, "w"))
    else:
        shard = os.path.join(cache.path, cache.manifest["shards"][1]["features"]["file"])
        with open(shard, "r+b") as file:
            file.truncate(os.path.getsize(shard) - 7)
    backbone_runs.clear()
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        again = features.extract_features(model, x, y, batch_size=8, shard_size=10)
    assert not again.reused and sum(backbone_runs) == len(x)
    assert "Ignoring the feature cache" in caplog.text
    again.verify()
    assert features.extract_features(model, x, y, batch_size=8).reused


def test_arrays_are_hashed_once_a_dataset_on_both_passes(monkeypatch):
    from keras_transfer import cache_key

    hashed = []
    update = cache_key._DataFingerprint.update
    monkeypatch.setattr(cache_key._DataFingerprint, "update",
                        lambda self, inputs, labels: hashed.append(len(labels)) or
                        update(self, inputs, labels))
    x, y = images()
    cache = features.extract_features(tiny_model(), x, y, batch_size=8)
    # Arrays cannot change between the passes: only the key's pass hashes them.
    assert sum(hashed) == len(x) and cache.num_examples == len(x)
    if tf is not None and kt.backend.is_tensorflow():
        hashed.clear()
        dataset = tf.data.Dataset.from_tensor_slices((x[::-1], y[::-1]))
        features.extract_features(tiny_model(), dataset, batch_size=8)
        assert sum(hashed) == 2 * len(x)


@pytest.mark.tensorflow
def test_a_source_that_changes_between_passes_is_reported(caplog):
    x, y = images()
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(24, reshuffle_each_iteration=True)
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        cache = features.extract_features(tiny_model(), shuffled, batch_size=8)
    assert "changed between two passes" in caplog.text
    assert cache.num_examples == 24


# ---------------------------------------------------- training the head
def test_head_trained_on_features_matches_the_frozen_backbone_recipe(backbone_runs):
    x, y = images(32)
    cached, recipe = tiny_model(), tiny_model(tiny_backbone())
    recipe.set_weights(cached.get_weights())
    backbone_before = [np.array(w) for w in cached.backbone.weights]
    head_before = [np.array(w) for w in cached.head.weights]

    history = cached.fit(x, y, phases=[kt.HeadPhase(epochs=3, solver="adam")], batch_size=8, shuffle=False,
                         verbose=0)
    assert sum(backbone_runs) == 32  # once, not once per epoch
    backbone_runs.clear()
    # The keras.io recipe: the frozen backbone runs inside fit every epoch.
    recipe_history = recipe.fit(x, y, phases=[kt.HeadPhase(epochs=3, solver="adam", feature_cache=False)],
                                batch_size=8, shuffle=False, verbose=0)
    assert backbone_runs == []  # no extraction: the backbone ran inside fit

    for a, b in zip(backbone_before, cached.backbone.weights):
        np.testing.assert_array_equal(a, np.array(b))
    assert any(not np.allclose(a, np.array(b)) for a, b in zip(head_before, cached.head.weights))
    for a, b in zip(cached.head.weights, recipe.head.weights):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    np.testing.assert_allclose(history.history["loss"], recipe_history.history["loss"], rtol=1e-4)
    # The full model predicts with the trained head.
    np.testing.assert_allclose(cached.predict(x), recipe.predict(x), atol=1e-5)
    record, usual = history.phases[0], recipe_history.phases[0]
    assert (record.name, record.trainable_params, record.frozen_params) == (
        "head", usual.trainable_params, usual.frozen_params)


def test_callbacks_see_the_whole_model_while_the_head_trains_on_features(tmp_path):
    x, y = images(16)
    model = tiny_model()
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(self.model)

    checkpoint = str(tmp_path / "best.keras")
    model.fit(x, y, phases=[kt.HeadPhase(epochs=2, solver="adam")], batch_size=8, verbose=0,
              callbacks=[Spy(), keras.callbacks.ModelCheckpoint(checkpoint)])
    assert seen == [model, model]
    restored = keras.saving.load_model(checkpoint)
    np.testing.assert_allclose(restored.predict(x), model.predict(x), atol=1e-6)


def test_validation_data_gets_its_own_cache_and_history_extends(backbone_runs):
    x, y = images(24)
    vx, vy = images(12, seed=5)
    model = kt.ImageTransferModel("mobilenet_v2", 3, weights=None, input_shape=(32, 32, 3),
                                  pooling="avg")
    x32 = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    vx32 = np.repeat(np.repeat(vx, 2, axis=1), 2, axis=2)
    history = model.fit(x32, y, validation_data=(vx32, vy), batch_size=8, verbose=0,
                        phases=[kt.HeadPhase(epochs=2, solver="adam")])
    assert sum(backbone_runs) == 36
    assert history.phase_of_epoch() == ["head", "head"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(history.history)
    backbone_runs.clear()
    model.fit(x32, y, validation_data=(vx32, vy), head_epochs=1, batch_size=8, verbose=0)
    assert backbone_runs == []  # both caches reused
    assert model.predict(vx32).shape == (12, 3)


@pytest.mark.tensorflow
def test_export_after_training_on_features(tmp_path):
    x, y = images(16)
    model = tiny_model()
    model.fit(x, y, head_epochs=1, batch_size=8, verbose=0)
    path = model.export(str(tmp_path / "export"))
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(served["probabilities"].numpy(), model.predict(x), atol=1e-5)


def test_augmentation_recomputes_every_epoch_by_default_and_says_so(backbone_runs, caplog, capsys):
    x, y = images()
    model = tiny_model()
    with caplog.at_level(logging.INFO, logger="keras_transfer"):
        history = model.fit(x, y, head_epochs=2, batch_size=8,
                            augmentation=keras.layers.RandomFlip(), verbose=1)
    assert backbone_runs == []  # no cache: the backbone runs inside fit
    assert "recomputes the features of freshly augmented inputs every epoch" in caplog.text
    assert "recomputes the features" in capsys.readouterr().out
    assert len(history.epoch) == 2 and history.phases[0].name == "head"
    assert entries(os.environ[features.CACHE_ENV_VAR]) == []


def test_a_cache_turned_off_says_so_without_blaming_augmentation(backbone_runs, capsys):
    x, y = images()
    model = tiny_model()
    model.fit(x, y, phases=[kt.HeadPhase(epochs=1, solver="adam", feature_cache=False)],
              batch_size=8, verbose=1)
    out = capsys.readouterr().out
    assert backbone_runs == []
    assert "Feature cache: off (feature_cache=False)" in out
    assert "augmentation" not in out


def test_augmented_copies_are_cached_and_cycled_per_epoch(backbone_runs, caplog):
    x, y = images()
    model = tiny_model()
    flip = keras.layers.RandomFlip(seed=3)
    with caplog.at_level(logging.INFO, logger="keras_transfer"):
        history = model.fit(x, y, phases=[kt.HeadPhase(epochs=3, solver="adam", augmented_copies=2)],
                            batch_size=8, augmentation=flip, verbose=0)
    assert "2 cached augmented copies; epoch i trains on copy i % 2" in caplog.text
    assert sum(backbone_runs) == 2 * len(x) and len(history.epoch) == 3
    cache = features.extract_features(model, x, y, batch_size=8, augmentation=flip,
                                      augmented_copies=2)
    assert cache.reused and cache.copies == 2
    copy0, copy1 = cache.load(0)[0], cache.load(1)[0]
    assert not np.allclose(copy0, copy1)
    # Each pass over the dataset (an epoch) reads the next copy.
    dataset = cache.dataset(batch_size=24)
    passes = [np.asarray(next(iter(dataset))[0]) for _ in range(3)]
    np.testing.assert_array_equal(passes[0], copy0)
    np.testing.assert_array_equal(passes[1], copy1)
    np.testing.assert_array_equal(passes[2], copy0)
    # Copies of another count, or no augmentation, are other caches.
    assert not features.extract_features(model, x, y, batch_size=8).reused


def test_a_shard_changed_in_place_is_caught_by_its_checksum(backbone_runs, caplog):
    x, y = images()
    model = tiny_model()
    cache = features.extract_features(model, x, y, shard_size=10)
    shard = os.path.join(cache.path, cache.manifest["shards"][1]["features"]["file"])
    size = os.path.getsize(shard)
    with open(shard, "r+b") as file:  # the same size, other bytes
        file.seek(size - 8)
        file.write(b"\x7f" * 8)
    assert os.path.getsize(shard) == size
    backbone_runs.clear()
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        again = features.extract_features(model, x, y, shard_size=10)
    assert not again.reused and sum(backbone_runs) == len(x)
    assert "does not match its checksum" in caplog.text
    expected = keras.ops.convert_to_numpy(model.backbone(x.astype("float32"), training=False))
    np.testing.assert_allclose(again.load()[0], expected, atol=1e-6)


def test_an_unwritable_cache_folder_falls_back_to_the_backbone_in_fit(tmp_path, caplog):
    x, y = images(16)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    model = tiny_model()
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        history = model.fit(x, y, phases=[kt.HeadPhase(epochs=1, cache_dir=str(blocked / "c"))],
                            batch_size=8, verbose=0)
    assert "Cannot write the feature cache" in caplog.text and len(history.epoch) == 1
    with pytest.raises(DataError, match="Cannot write the feature cache"):
        model.fit(x, y, batch_size=8, verbose=0, phases=[
            kt.HeadPhase(epochs=1, cache_dir=str(blocked / "c"), feature_cache=True)])


# ------------------------------------------------------------- errors
def test_bad_arguments_say_what_was_received():
    x, y = images(8)
    model = tiny_model()
    with pytest.raises(ValueError, match="augmentation without augmented_copies"):
        features.extract_features(model, x, y, augmentation=keras.layers.RandomFlip())
    with pytest.raises(ValueError, match="augmented_copies=2 without augmentation"):
        features.extract_features(model, x, y, augmented_copies=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        features.extract_features(model, x, y, batch_size=0)
    with pytest.raises(TypeError, match="Received a Sequential"):
        features.extract_features(keras.Sequential([keras.layers.Dense(2)]), x, y)
    with pytest.raises(DataError, match="without labels"):
        model.fit(x, head_epochs=1, verbose=0)
    with pytest.raises(ValueError, match="epochs=0"):
        kt.HeadPhase(epochs=0)
    with pytest.raises(ValueError, match="feature_cache='yes'"):
        kt.HeadPhase(feature_cache="yes")
    flip = keras.layers.RandomFlip()
    with pytest.raises(ValueError, match="feature_cache=True with random augmentation"):
        kt.HeadPhase(feature_cache=True).uses_cache(flip)
    assert kt.HeadPhase(feature_cache=True, augmented_copies=2).uses_cache(flip)
    assert kt.HeadPhase(feature_cache=True).uses_cache(None)
    assert not kt.HeadPhase().uses_cache(flip) and kt.HeadPhase().uses_cache(None)
    assert not kt.HeadPhase(feature_cache=False).uses_cache(None)


@pytest.mark.parametrize("kind", ["multilabel", "regression"])
def test_other_kinds_train_on_their_label_shapes(kind):
    x, _ = images(16)
    targets = np.random.default_rng(0).integers(0, 2, (16, 3)).astype("float32")
    model = tiny_model(kind=kind)
    history = model.fit(x, targets, phases=[kt.HeadPhase(epochs=2, solver="adam")],
                        batch_size=8, verbose=0)
    cache = features.extract_features(model, x, targets, batch_size=8)
    assert cache.reused and cache.manifest["label_shape"] == [3]
    np.testing.assert_array_equal(cache.load()[1], targets)
    assert len(history.history["loss"]) == 2 and model.predict(x).shape == (16, 3)
