"""The memory estimate: its parts, and how it compares with measured peak memory."""

import json

import keras
import pytest

import keras_transfer as kt
from keras_transfer import memory
from processes import child_env, start, tail, wait_all


def test_kept_activations_counts_what_gradients_read_once():
    network = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                keras.layers.BatchNormalization(trainable=False),
                                keras.layers.Dense(4)])
    # Dense 1 reads its input (8) and its relu output (16); the frozen
    # BatchNormalization nothing; Dense 2 its input (16).
    assert memory.kept_activations(network) == 8 + 16 + 16
    assert memory.kept_activations(network, first=2) == 16


def test_estimate_parts_follow_the_phase_and_batch():
    model = kt.ImageTransferModel("mobilenet_v2", 5, weights=None, input_shape=(64, 64, 3),
                                  pooling="avg")
    fine = memory.estimate_memory(model, 32, "fine_tune")
    head = memory.estimate_memory(model, 32, "head")
    top = memory.estimate_memory(model, 32, kt.FineTunePhase(unfreeze=10))
    double = memory.estimate_memory(model, 64, "fine_tune")
    split = memory.estimate_memory(model, 64, "fine_tune", replicas=2)
    assert head.gradients == 4 * sum(int(w.numpy().size) for w in model.head.weights)
    model.backbone.unfreeze("all")  # what the phase would train (BatchNormalization stays frozen)
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    assert fine.gradients == 4 * trainable and fine.optimizer == 2 * fine.gradients
    assert top.gradients < fine.gradients and top.activations < fine.activations
    assert double.activations == pytest.approx(2 * fine.activations, rel=0.01)
    assert split == fine and split.batch_size == 32
    assert fine.total > head.total
    assert "activations" in fine.summary() and fine.fits(fine.total) and not fine.fits(1)


def test_fit_warns_before_a_run_that_will_not_fit(tiny_images, monkeypatch, caplog):
    monkeypatch.setattr(memory, "available_memory", lambda device="CPU": (1024, "a test"))
    x, y = tiny_images
    model = kt.ImageTransferModel("mobilenet_v2", 3, weights=None, input_shape=(32, 32, 3),
                                  pooling="avg")
    with caplog.at_level("WARNING", logger="keras_transfer"):
        model.fit(x, y, phases=[kt.HeadPhase(epochs=1, solver="adam")], verbose=0)
    assert "Phase 'head' may need about" in caplog.text and "a test" in caplog.text


@pytest.mark.large
def test_estimate_is_within_a_factor_1_5_of_measured_peak_memory(tmp_path):
    """Peak RSS of child processes training one phase, minus RSS before the model.

    Measured here (2 shared cores, TensorFlow 2.21 CPU): MobileNetV2 112 px
    batch 24 fine-tuning 479 MiB (estimate 530); ResNet50 96 px batch 8
    fine-tuning 857 MiB (847); ResNet50 128 px batch 16 head phase 469 MiB
    (445). None of these configurations was used to fit the runtime part.
    The children read their peak from `VmHWM`, not `ru_maxrss`, which Linux
    carries over from the process that started them (see `children.py`).
    """
    runs = [("mobilenet_v2", 112, 24, "fine_tune"), ("resnet50", 96, 8, "fine_tune"),
            ("resnet50", 128, 16, "head")]
    processes = []
    for backbone, size, batch, phase in runs:
        out = tmp_path / f"{backbone}-{phase}"
        out.mkdir()
        processes.append(start(["memory", out, backbone, size, batch, phase],
                               child_env(tmp_path, lifetime=280), out / "log"))
    codes = wait_all(processes, 300)
    assert codes == [0] * len(runs), [tail(tmp_path / f"{b}-{p}" / "log")
                                      for b, _, _, p in runs]
    for backbone, _, _, phase in runs:
        result = json.loads((tmp_path / f"{backbone}-{phase}" /
                             f"memory-{backbone}-{phase}.json").read_text())
        ratio = result["estimate"]["total"] / result["measured"]
        assert 1 / 1.5 <= ratio <= 1.5, (backbone, phase, result)


def test_process_memory_reads_this_process():
    before = memory.process_memory()
    block = bytearray(64 * 2**20)  # touched: 64 MiB resident
    after = memory.process_memory()
    assert after["peak"] >= after["now"] >= before["now"] + 60 * 2**20
    del block
