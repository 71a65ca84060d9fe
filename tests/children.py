"""Programs the distribution tests run as child processes.

    python tests/children.py mirrored OUT      # one device vs MirroredStrategy on 2 logical CPUs
    python tests/children.py worker OUT        # one worker of a multi-worker run (TF_CONFIG set)
    python tests/children.py resume OUT BACKUP # a run with a backup folder (killed and rerun)
    python tests/children.py memory OUT BACKBONE SIZE BATCH PHASE

Each writes `OUT/<name>.json` (and `.npz` weights) for the test to compare.
Every child limits its own life (`faulthandler.dump_traceback_later`,
`$KT_CHILD_TIMEOUT` seconds), so none outlives a test that was killed.
Tests import the model and data builders from here too.
"""

import faulthandler
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's keras_transfer



def data(n=32, size=32, classes=3, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    # Labels that depend on the images, so the loss can fall.
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 127).astype("int64") + (x[:, 0, 0, 1] > 200)
    return x, np.minimum(y, classes - 1)


def tiny_model(strategy=None, seed=1):
    """A small convolutional backbone (fast) with BatchNormalization, and a head."""
    import keras

    import keras_transfer as kt
    from keras_transfer.distribute import scope

    keras.utils.set_random_seed(seed)

    def backbone():
        network = keras.Sequential([
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2"),
        ], name="tiny")
        return kt.ImageBackbone(network, preprocessing="tf", input_shape=(32, 32, 3))

    with scope(kt.get_strategy(strategy)):
        return kt.TransferModel(backbone, kt.Head(3, pooling="avg"), strategy=strategy)


def _weights(model):
    import keras

    return {f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)}


def mirrored(out):
    """Same global batch and seed on one CPU device and on MirroredStrategy over two."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import numpy as np

    import keras_transfer as kt

    x, y = data()
    phases = [kt.HeadPhase(epochs=2, solver="adam", learning_rate=1e-2),
              kt.FineTunePhase(epochs=2, learning_rate=1e-3, warmup=0.25)]
    results = {}
    for name, strategy in (("one", None),
                           ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
        model = tiny_model(strategy)
        history = model.fit(x, y, phases=phases, batch_size=16, seed=5, verbose=0,
                            validation_data=(x[:16], y[:16]))
        cache = kt.extract_features(model, x[:20], y[:20], batch_size=8)
        features, _ = cache.load()
        in_scope = None
        if strategy is not None:
            variables = [model.head.weights[0], model.optimizer.iterations,
                         *model.optimizer.variables[-2:],
                         model.backbone.network.get_layer("conv1").kernel]
            in_scope = all(strategy.extended.variable_created_in_scope(v.value)
                           for v in variables)
        results[name] = {"loss": history.history["loss"],
                         "val_loss": history.history["val_loss"],
                         "phases": history.phase_of_epoch(), "in_scope": in_scope,
                         "replicas": model.distribute_strategy.num_replicas_in_sync}
        np.savez(os.path.join(out, f"{name}.npz"), features=features, **_weights(model))
    with open(os.path.join(out, "mirrored.json"), "w") as f:
        json.dump(results, f)


def StepCounter():
    """A callback counting the training steps of every epoch (`.counts`)."""
    import keras

    class Counter(keras.callbacks.Callback):
        counts = []

        def on_epoch_begin(self, epoch, logs=None):
            self.counts.append(0)

        def on_train_batch_end(self, batch, logs=None):
            self.counts[-1] += 1

    return Counter()


def worker(out):
    """One worker of a 2-worker run: both phases through fit, then the chief exports."""
    import keras_transfer as kt
    from keras_transfer.distribute import is_chief

    strategy = kt.get_strategy("multi_worker")  # first: before any TensorFlow op
    import numpy as np
    import tensorflow as tf

    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    x, y = data(n=40)  # 40 = 2 full batches of 16 and a partial one, dropped
    model = tiny_model("multi_worker")
    phases = [kt.HeadPhase(epochs=2, solver="adam", learning_rate=1e-2),
              kt.FineTunePhase(epochs=2, learning_rate=1e-3)]
    steps = StepCounter()
    history = model.fit(x, y, phases=phases, batch_size=16, verbose=0,
                        validation_data=(x[:16], y[:16]), callbacks=[steps])
    predicted = model.predict(x[:8])  # a collective: every worker predicts
    path = model.export(os.path.join(out, "export"))
    result = {"task": task, "chief": is_chief(strategy), "loss": history.history["loss"],
              "val_loss": history.history["val_loss"], "export": path,
              "replicas": strategy.num_replicas_in_sync,
              "steps": [p.epochs_run for p in history.phases], "epoch_steps": steps.counts}
    if path is not None:
        serve = tf.saved_model.load(path).signatures["serving_default"]
        served = next(iter(serve(images=tf.constant(x[:8])).values())).numpy()
        result["export_max_diff"] = float(np.abs(served - predicted).max())
    np.savez(os.path.join(out, f"weights-{task}.npz"), **_weights(model))
    with open(os.path.join(out, f"worker-{task}.json"), "w") as f:
        json.dump(result, f)


def resume(out, backup_dir):
    """Both phases with a backup folder; fine-tuning is slow enough to be killed in."""
    import keras
    import numpy as np

    import keras_transfer as kt

    x, y = data(n=48)
    model = tiny_model()
    phases = [kt.HeadPhase(epochs=2, solver="adam", learning_rate=1e-2),
              kt.FineTunePhase(epochs=6, learning_rate=1e-3, warmup=0.2, early_stopping=4)]
    history = model.fit(x, y, phases=phases, batch_size=8, seed=11, verbose=0,
                        validation_data=(x[:16], y[:16]), backup_dir=backup_dir)
    np.savez(os.path.join(out, "weights.npz"), **_weights(model),
             iterations=keras.ops.convert_to_numpy(model.optimizer.iterations))
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump({"history": history.history, "epoch": history.epoch,
                   "phases": history.phase_of_epoch()}, f)


def memory(out, backbone, size, batch, phase):
    """Peak resident memory of one training phase, and the estimate for it."""
    import numpy as np
    import psutil

    import keras_transfer as kt
    from keras_transfer.memory import estimate_memory, process_memory

    size, batch = int(size), int(batch)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2 * batch, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 2 * batch)
    baseline = psutil.Process().memory_info().rss
    model = kt.ImageTransferModel(backbone, 10, weights=None, input_shape=(size, size, 3),
                                  pooling="avg")
    chosen = (kt.HeadPhase(epochs=1, solver="adam") if phase == "head"
              else kt.FineTunePhase(epochs=1, learning_rate=1e-4))
    estimate = estimate_memory(model, batch, chosen)
    model.fit(x, y, phases=[chosen], batch_size=batch, verbose=0)
    peak = process_memory()["peak"]  # VmHWM: ru_maxrss would be the parent's
    with open(os.path.join(out, f"memory-{backbone}-{phase}.json"), "w") as f:
        json.dump({"measured": peak - baseline, "baseline": baseline, "peak": peak,
                   "estimate": estimate.as_dict()}, f)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(float(os.environ.get("KT_CHILD_TIMEOUT", "240")),
                                      exit=True)
    command, *arguments = sys.argv[1:]
    {"mirrored": mirrored, "worker": worker, "resume": resume, "memory": memory}[command](
        *arguments)
