"""Strategies: names and errors, MirroredStrategy over two logical CPUs, two workers.

The programs that need a fresh TensorFlow (logical devices, TF_CONFIG) run as
child processes (children.py), each bounded in time and stopped at the end.
"""

import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

import keras_transfer as kt
from keras_transfer import distribute
from processes import child_env, start, start_workers, stop, tail, wait_all

TPU_VARIABLES = ("TPU_NAME", "KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS", "COLAB_TPU_ADDR")


def test_strategy_names():
    assert kt.get_strategy(None) is None and kt.get_strategy("default") is None
    assert isinstance(kt.get_strategy("cpu"), tf.distribute.OneDeviceStrategy)
    assert isinstance(kt.get_strategy("mirrored"), tf.distribute.MirroredStrategy)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert kt.get_strategy(strategy) is strategy
    with pytest.raises(ValueError, match="Received strategy='gpus'.*multi_worker"):
        kt.get_strategy("gpus")


def test_tpu_without_a_tpu_fails_fast_and_auto_goes_on(monkeypatch):
    for name in TPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if distribute.find_tpu() is not None:
        pytest.skip("this machine has a TPU")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="strategy='tpu', but this machine has no TPU"):
        kt.get_strategy("tpu")
    assert time.monotonic() - started < 2  # no network request, no initialisation
    assert kt.get_strategy("auto") is None or len(tf.config.list_logical_devices("GPU")) > 1


def test_batch_message_says_the_split():
    class TwoReplicas:  # only what the message reads
        num_replicas_in_sync = 2

    assert distribute.batch_message(32) == "Batch size 32 (one replica)."
    assert distribute.batch_message(64, TwoReplicas()) == (
        "Global batch size 64 = 32 per replica x 2 replicas (TwoReplicas).")
    assert "uneven split" in distribute.batch_message(63, TwoReplicas())
    assert distribute.is_chief(None) and not distribute.needs_full_batches(None)


def test_multi_worker_after_tensorflow_ran_says_to_create_it_first(tmp_path):
    from processes import free_ports

    config = {"cluster": {"worker": [f"127.0.0.1:{free_ports(1)[0]}"]},
              "task": {"type": "worker", "index": 0}}
    script = ("import tensorflow as tf, keras_transfer as kt\n"
              "tf.constant(1.0) + 1.0\n"
              "try:\n"
              "    kt.get_strategy('multi_worker')\n"
              "except RuntimeError as error:\n"
              "    print('ERROR:', error)\n")
    env = child_env(tmp_path, TF_CONFIG=json.dumps(config), lifetime=60)
    log = tmp_path / "late.log"
    process = start(["-c", script], env, log, script=None)
    stop_codes = wait_all([process], 90)
    output = tail(log)
    assert stop_codes == [0], output
    assert "must be created before TensorFlow runs any operation" in output, output


def test_mirrored_on_two_logical_cpus_matches_one_device(tmp_path):
    """Same global batch (16) and seed: losses, weights and cached features match."""
    process = start(["mirrored", tmp_path], child_env(tmp_path), tmp_path / "mirrored.log")
    assert wait_all([process], 200) == [0], tail(tmp_path / "mirrored.log")
    results = json.loads((tmp_path / "mirrored.json").read_text())
    one, mirrored = results["one"], results["mirrored"]
    assert (one["replicas"], mirrored["replicas"]) == (1, 2)
    assert one["phases"] == mirrored["phases"] == ["head"] * 2 + ["fine_tune"] * 2
    np.testing.assert_allclose(mirrored["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(mirrored["val_loss"], one["val_loss"], rtol=1e-5)
    assert one["loss"][-1] < one["loss"][0]
    assert mirrored["in_scope"]  # head, optimizer (after unfreezing) and backbone variables
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "mirrored.npz")
    for key in a.files:  # weights, and the features each replica extracted a share of
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.large
def test_two_workers_train_both_phases_and_only_the_chief_exports(tmp_path):
    """Two processes on 127.0.0.1 (ports free at run time) train through model.fit."""
    workers = start_workers(2, ["worker", tmp_path], tmp_path, lifetime=150)
    codes = wait_all(workers, 180)
    logs = {i: tail(tmp_path / f"worker-{i}.log") for i in range(2)}
    assert codes == [0, 0], f"exit codes {codes}; logs: {logs}"
    chief, other = (json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2))
    assert (chief["chief"], other["chief"]) == (True, False)
    assert chief["replicas"] == 2
    # 40 examples in global batches of 16: the partial batch is dropped.
    assert chief["steps"] == [2, 2] and chief["epoch_steps"] == [2, 2, 2, 2]
    assert chief["loss"] == other["loss"] and chief["val_loss"] == other["val_loss"]
    assert chief["val_loss"][-1] < chief["val_loss"][0]
    w0, w1 = np.load(tmp_path / "weights-0.npz"), np.load(tmp_path / "weights-1.npz")
    for key in w0.files:
        np.testing.assert_array_equal(w0[key], w1[key], err_msg=key)
    assert other["export"] is None and chief["export"] == str(tmp_path / "export")
    assert (tmp_path / "export" / "saved_model.pb").is_file()
    assert chief["export_max_diff"] < 1e-5
    # The other worker's export and feature cache went to temporary folders, now gone.
    assert not [p for p in os.listdir(tmp_path / "tmp") if p.startswith("keras_transfer")]
