"""fit(backup_dir=...): a run stopped at any point and run again ends as if never stopped."""

import json
import os
import signal
import time

import keras
import numpy as np
import pytest

import keras_transfer as kt
from children import data, tiny_model
from keras_transfer.backup import BackupError
from processes import child_env, start, stop, tail, wait_all

PHASES = [kt.HeadPhase(epochs=2, solver="adam", learning_rate=1e-2),
          kt.FineTunePhase(epochs=4, learning_rate=1e-3, warmup=0.25, early_stopping=3)]


class Crash(keras.callbacks.Callback):
    """Stands in for a crash: raises when epoch `at` begins ("end": when the run's last
    phase ends, after its last epoch was saved and before the phase was)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            raise KeyboardInterrupt(f"crash at epoch {epoch}")

    def on_train_end(self, logs=None):
        if self.at == "end" and self.model.optimizer.iterations > 10:
            raise KeyboardInterrupt("crash after the last epoch")


class Steps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.count = 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1


def run(backup_dir=None, phases=PHASES, callbacks=(), seed=7):
    x, y = data(n=40)
    model = tiny_model()
    history = model.fit(x, y, phases=phases, batch_size=8, seed=seed, verbose=0,
                        validation_data=(x[:16], y[:16]), backup_dir=backup_dir,
                        callbacks=list(callbacks))
    return model, history


def assert_same_run(a, b):
    (model_a, history_a), (model_b, history_b) = a, b
    for wa, wb in zip(model_a.weights, model_b.weights):
        np.testing.assert_allclose(np.asarray(wb), np.asarray(wa), rtol=1e-5, atol=1e-7)
    assert history_a.epoch == history_b.epoch
    assert history_a.phase_of_epoch() == history_b.phase_of_epoch()
    assert sorted(history_a.history) == sorted(history_b.history)
    for key, values in history_a.history.items():
        np.testing.assert_allclose(history_b.history[key], values, rtol=1e-5, err_msg=key)
    for pa, pb in zip(history_a.phases, history_b.phases):
        assert (pa.name, pa.epochs_run, pa.trainable_params, pa.stopped_early) == \
            (pb.name, pb.epochs_run, pb.trainable_params, pb.stopped_early)


@pytest.fixture(scope="module")
def uninterrupted():
    return run()


@pytest.mark.parametrize("crash_epoch", [1, 4, "end"])  # head phase; fine-tuning; its end
def test_a_crashed_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, crash_epoch):
    backup = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):
        run(backup, callbacks=[Crash(crash_epoch)])
    state = json.loads((backup / "state.json").read_text())
    assert len(state["finished"]) == (0 if crash_epoch == 1 else 1)
    steps = Steps()
    resumed = run(backup, callbacks=[steps])
    assert_same_run(uninterrupted, resumed)
    # Only the epochs after the crash ran again (5 steps an epoch).
    assert steps.count == 5 * (6 - (6 if crash_epoch == "end" else crash_epoch))
    # The schedule's step went on from where it was.
    assert int(resumed[0].optimizer.iterations) == int(uninterrupted[0].optimizer.iterations)


def test_a_finished_run_is_not_trained_again(tmp_path):
    first = run(tmp_path / "backup")
    steps = Steps()
    again = run(tmp_path / "backup", callbacks=[steps])
    assert steps.count == 0
    assert_same_run(first, again)


def test_the_probe_result_is_saved_not_recomputed(tmp_path, monkeypatch):
    from keras_transfer import phases as phases_module

    phases = [kt.HeadPhase(), kt.FineTunePhase(epochs=2, learning_rate=1e-3)]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "backup", phases=phases, callbacks=[Crash(2)])

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran again")

    monkeypatch.setattr(phases_module, "solve_linear_heads", no_probe)
    resumed = run(tmp_path / "backup", phases=phases)
    assert resumed[1].phases[0].details["head"]["solver"] == "probe"
    monkeypatch.undo()
    assert_same_run(run(phases=phases), resumed)


def test_other_settings_or_seed_are_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "backup", callbacks=[Crash(1)])
    with pytest.raises(BackupError, match="other settings.*phases"):
        run(tmp_path / "backup", phases=PHASES[:1])
    with pytest.raises(BackupError, match="seed=8.*seed=7"):
        run(tmp_path / "backup", seed=8)


def test_a_folder_with_other_files_is_refused_and_nothing_is_removed(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(BackupError, match="holds other files \\(notes.txt\\)"):
        run(folder)
    assert os.listdir(folder) == ["notes.txt"]
    # Files a user adds to a backup folder later are left alone too.
    backup = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):
        run(backup, callbacks=[Crash(3)])
    (backup / "notes.txt").write_text("keep me")
    (backup / "progress-99.npz.partial").write_bytes(b"a save cut short")
    run(backup)
    assert (backup / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(backup)) == ["notes.txt", "phase-0.npz", "phase-1.npz",
                                          "state.json"]


@pytest.mark.large
def test_kill_9_during_fine_tuning_then_the_same_command_again(tmp_path):
    """A child process is killed (SIGKILL) in its fine-tuning phase and started again."""
    env = child_env(tmp_path, lifetime=180)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = start(["resume", tmp_path / "a", tmp_path / "backup-a"], env, tmp_path / "a.log")
    victim = start(["resume", tmp_path / "b", tmp_path / "backup-b"], env, tmp_path / "b.log")
    state = tmp_path / "backup-b" / "state.json"
    killed_after = None
    try:
        deadline = time.monotonic() + 150
        while victim.poll() is None and time.monotonic() < deadline:
            try:
                progress = json.loads(state.read_text())["progress"]
            except (OSError, ValueError):  # not written yet
                progress = None
            if progress and progress["phase"] == 1 and len(progress["logs"]) >= 2:
                os.killpg(victim.pid, signal.SIGKILL)
                killed_after = len(progress["logs"])
                break
            time.sleep(0.05)
    finally:
        stop(victim)
    assert killed_after is not None, "the run ended before it could be killed: " + tail(
        tmp_path / "b.log")
    assert victim.returncode == -signal.SIGKILL
    again = start(["resume", tmp_path / "b", tmp_path / "backup-b"], env, tmp_path / "b.log")
    codes = wait_all([reference, again], 180)
    assert codes == [0, 0], tail(tmp_path / "a.log") + tail(tmp_path / "b.log")
    a, b = np.load(tmp_path / "a" / "weights.npz"), np.load(tmp_path / "b" / "weights.npz")
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert ha["phases"] == hb["phases"] and ha["epoch"] == hb["epoch"]
    for key, values in ha["history"].items():
        np.testing.assert_allclose(hb["history"][key], values, rtol=1e-5, err_msg=key)


@pytest.mark.tensorflow
def test_epoch_seed_orders_depend_on_the_seed_and_epoch_only():
    import tensorflow as tf

    from keras_transfer.data import EpochSeed, shuffle_each_epoch

    def order(seed, epoch, global_seed):
        tf.random.set_seed(global_seed)  # 0 used to break tensor seeds in TensorFlow
        epoch_seed = EpochSeed(seed)
        dataset = shuffle_each_epoch(tf.data.Dataset.range(50), 50, epoch_seed)
        epoch_seed.set_epoch(epoch)
        first = [int(v) for v in dataset]
        assert [int(v) for v in dataset] == first  # the same epoch again: the same order
        return first

    reference = order(3, 2, global_seed=0)
    assert order(3, 2, global_seed=123) == reference and sorted(reference) == list(range(50))
    assert order(3, 1, global_seed=0) != reference and order(4, 2, global_seed=0) != reference
    assert int(shuffle_each_epoch(tf.data.Dataset.range(50), 50, EpochSeed(1)).cardinality()) == 50


def test_a_resumed_default_fine_tune_decides_from_the_restored_probe(tmp_path, caplog):
    # The default FineTunePhase decides its recipe from the head phase's probe; a run resumed
    # after the head phase finished must decide as the uninterrupted run did.
    phases = [kt.HeadPhase(), kt.FineTunePhase(min_steps=10)]
    with caplog.at_level("INFO", logger="keras_transfer"):
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "backup", phases=phases, callbacks=[Crash(2)])
        decided = [r.getMessage() for r in caplog.records if "Phase 'fine_tune': " in
                   r.getMessage() and "probe" in r.getMessage()]
        caplog.clear()
        with pytest.raises(KeyboardInterrupt):  # stopped again once it has decided
            run(tmp_path / "backup", phases=phases, callbacks=[Crash(3)])
    again = [r.getMessage() for r in caplog.records if "Phase 'fine_tune': " in
             r.getMessage() and "probe" in r.getMessage()]
    assert decided and again[:1] == decided[:1], (decided, again)
    assert "no probe evidence" not in again[0]
