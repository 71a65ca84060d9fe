"""Saving a training run after every epoch and phase, and resuming it after a crash.

`model.fit(..., backup_dir="runs/x")` keeps the state of the run in one
folder. Run the same command again after the process was killed (even with
`kill -9`) and training goes on from the last saved epoch, in the phase it
was in, and ends where an uninterrupted run with the same seed ends (within
floating-point tolerance).

The folder::

    runs/x/
        state.json        written last, atomically: the run's settings (with a
                          fingerprint of its training and validation data:
                          a resume on other data is refused), its seed, the
                          finished phases (record and history), the phase
                          in progress (epochs done, their logs)
        phase-<i>.npz     every model variable after phase i finished
        progress-<n>.npz  the phase in progress after its last saved epoch:
                          model and optimizer variables (moments and the
                          step of the learning-rate schedule), the state of
                          the callbacks that keep or restore weights

What a resumed run restores, and why it matches:

- Finished phases are not run again: their structural change is applied
  (`phase.prepare`: frozen backbone, unfrozen layers, LoRA adapters), their
  weights are loaded and their history and records come back, so the
  returned `TransferHistory` is the same. A head phase solved by the probe
  (no epochs) is such a phase: its result is saved, not recomputed.
- In the phase in progress, the layers are unfrozen again, the phase is
  compiled with its fresh optimizer, and then every model variable (random
  seed states included), every optimizer variable (so the schedule's step)
  and the state of `RestoreBest`, `EarlyStopping` and `DivergenceGuard` are
  set back. Keras `fit` starts at the next epoch.
- The shuffled order of epoch e depends on (seed, e) only
  (`data.EpochSeed`); the seed is stored here, so it is the same after a
  restart even when `fit(seed=None)`.

Not restored: the state of a user's own callbacks, and the random draws of
random augmentation layers (tf.data runs them in parallel, so they differ
between two uninterrupted runs too). A run that diverges after a resume
goes back to the weights of the resumed epoch, not of the phase's start.

Only the chief of a multi-worker run writes; every worker reads, so the
folder must be on storage all workers see (as with Keras's own
`BackupAndRestore`). Files are written beside their final name and renamed
into place, so a crash while saving leaves the previous state usable.
Nothing but the files named above is ever removed; a folder that holds
other files and no `state.json` is refused.

Keras's `keras.callbacks.BackupAndRestore` was not used: in Keras 3.15 it
does save the optimizer (`save_weights` includes it) but not the random
seed states, it deletes the whole `backup_dir` when training ends, it knows
no phases and no chief, and it keeps no history of the epochs before the
crash.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import zipfile
import zlib

import keras
import numpy as np

from keras_transfer.callbacks import DivergenceGuard, RestoreBest
from keras_transfer.distribute import model_scope
from keras_transfer.errors import KerasTransferError
from keras_transfer.training import PhaseRecord

logger = logging.getLogger("keras_transfer")

FORMAT = "keras_transfer/backup/1"
STATE_FILE = "state.json"
_OURS = re.compile(r"^(state\.json|(phase|progress)-\d+\.npz)(\.partial)?$")


class BackupError(KerasTransferError, ValueError):
    """A backup folder that cannot be used for this run."""


# ------------------------------------------------------------------ variables
def model_variables(model) -> list:
    """The variables that make a model's state: weights and random seed states.

    Metric variables are left out: they are reset every epoch, and compiled
    metrics are made anew by every phase's `compile`.
    """
    metric_ids = {id(v) for metric in model.metrics for v in metric.variables}
    return [v for v in model.variables if id(v) not in metric_ids]


def _values(variables) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def _assign(variables, values, what: str) -> None:
    if len(variables) != len(values):
        raise BackupError(f"The backup holds {len(values)} {what} variables; this run has "
                          f"{len(variables)}. The model or the phase differs from the run "
                          "that wrote the backup: use another backup_dir.")
    for variable, value in zip(variables, values):
        if tuple(variable.shape) != tuple(value.shape):
            raise BackupError(f"The backup's {what} variable {getattr(variable, 'path', '?')} "
                              f"has shape {value.shape}; this run's has {tuple(variable.shape)}. "
                              "Use another backup_dir for a different model.")
        variable.assign(value)


def restore_optimizer(model, values) -> None:
    """Builds the model's optimizer in its strategy's scope and sets its variables."""
    optimizer = model.optimizer
    with model_scope(model):
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        _assign(optimizer.variables, values, "optimizer")


def _other_data(path: str, stored, given) -> str:
    """Why a backup refuses the data of this run, and how to start over."""
    stored = stored or {}
    differ = [f"{which} data" + (" (added)" if stored.get(which) is None else
                                 " (left out)" if given[which] is None else "")
              for which in ("train", "validation") if stored.get(which) != given[which]]
    return (f"The backup in {path} is of a run on other data: the {' and the '.join(differ)} "
            "differ from the saved run's. Resuming would go on training the saved weights on "
            "this data. Give the same data to resume, or start over with a new backup_dir "
            f"(or delete {path}). A tf.data pipeline that shuffles itself must use a fixed "
            "seed (fit shuffles the data anyway).")


# ------------------------------------------------------ callbacks with state
def _has_state(callback) -> bool:
    return isinstance(callback, (RestoreBest, keras.callbacks.EarlyStopping, DivergenceGuard))


def _callback_state(callback) -> tuple[dict, list] | None:
    """`(json part, weight arrays)` of a callback whose state matters, else None."""
    if isinstance(callback, RestoreBest):
        return ({"best": _number(callback.best), "label": callback._label,
                 "last": getattr(callback, "_last", True)},
                list(callback._weights or []))
    if isinstance(callback, keras.callbacks.EarlyStopping):
        return ({"wait": callback.wait, "stopped_epoch": callback.stopped_epoch,
                 "best": None if callback.best is None else _number(callback.best),
                 "best_epoch": callback.best_epoch,
                 "has_weights": callback.best_weights is not None},
                list(callback.best_weights or []))
    if isinstance(callback, DivergenceGuard):
        return {"first": callback._first}, []
    return None


def _set_callback_state(callback, state: dict, arrays: list) -> None:
    if isinstance(callback, RestoreBest):
        callback.best, callback._label = float(state["best"]), state["label"]
        callback._last, callback._weights = state["last"], arrays
    elif isinstance(callback, keras.callbacks.EarlyStopping):
        callback.wait, callback.stopped_epoch = state["wait"], state["stopped_epoch"]
        callback.best = None if state["best"] is None else float(state["best"])
        callback.best_epoch = state["best_epoch"]
        callback.best_weights = arrays if state["has_weights"] else None
    elif isinstance(callback, DivergenceGuard):
        callback._first = state["first"]


def _number(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)  # "inf" round-trips via float()


# ------------------------------------------------------------------ the run
class RunBackup:
    """The backup folder of one training run.

    Args:
        path: str. The folder (created when first written).
        writer: bool. Whether this process writes (the chief).

    Attributes:
        seed: int or None. The run's shuffle seed, once chosen.
    """

    def __init__(self, path, writer: bool = True):
        self.path = os.path.abspath(os.fspath(path))
        self.writer = writer
        self.state = {"format": FORMAT, "settings": None, "seed": None,
                      "finished": [], "progress": None, "saves": 0}
        if os.path.isfile(os.path.join(self.path, STATE_FILE)):
            self._read()
        elif os.path.isdir(self.path):
            foreign = [f for f in os.listdir(self.path) if not _OURS.match(f)]
            if foreign:
                raise BackupError(
                    f"Received backup_dir={path!r}, a folder that holds other files "
                    f"({', '.join(sorted(foreign)[:5])}) and no {STATE_FILE}. The backup "
                    "folder must be new, empty, or one a previous run wrote: choose another.")
        elif os.path.exists(self.path):
            raise BackupError(f"Received backup_dir={path!r}, which is a file, not a folder.")

    def _read(self) -> None:
        file = os.path.join(self.path, STATE_FILE)
        try:
            with open(file, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise BackupError(f"Cannot read the backup {file}: {error}. Use another "
                              "backup_dir, or remove this folder to start over.") from error
        if state.get("format") != FORMAT:
            raise BackupError(f"{file} is not a keras_transfer backup (format "
                              f"{state.get('format')!r}, expected {FORMAT!r}).")
        self.state = state

    @property
    def seed(self):
        return self.state["seed"]

    @property
    def resuming(self) -> bool:
        return bool(self.state["finished"] or self.state["progress"])

    def choose_seed(self, seed) -> int | None:
        """The run's seed: the stored one on a resume, else `seed` (remembered)."""
        stored = self.state["seed"]
        if stored is not None:
            if seed is not None and int(seed) != stored:
                raise BackupError(f"Received seed={seed}, but the backup in {self.path} is of "
                                  f"a run with seed={stored}. Use the same command, or "
                                  "another backup_dir.")
            return stored
        self.state["seed"] = None if seed is None else int(seed)
        return self.state["seed"]

    def check_settings(self, settings: dict) -> None:
        """Records the run's settings, or checks them against the stored ones."""
        settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        stored = self.state["settings"]
        if stored is None:
            self.state["settings"] = settings
            return
        changed = sorted(k for k in set(stored) | set(settings)
                         if stored.get(k) != settings.get(k))
        if "data" in changed:
            raise BackupError(_other_data(self.path, stored.get("data"), settings["data"]))
        if changed:
            raise BackupError(
                f"The backup in {self.path} is of a run with other settings ({', '.join(changed)} "
                "differ). Run the same command to resume it, or give another backup_dir.")

    # ----------------------------------------------------------- phases
    def finished_phases(self) -> int:
        return len(self.state["finished"])

    def finished_phase(self, index: int):
        """`(PhaseRecord, keras History)` of a finished phase."""
        entry = self.state["finished"][index]
        history = keras.callbacks.History()
        history.history = {k: list(v) for k, v in entry["history"].items()}
        history.epoch = list(entry["epochs"])
        return PhaseRecord(**entry["record"]), history

    def load_finished(self, model, index: int) -> None:
        """Sets every model variable to its value after finished phase `index`."""
        arrays = self._load_arrays(self.state["finished"][index]["file"])
        _assign(model_variables(model), [arrays[f"m{i}"] for i in range(_count(arrays, "m"))],
                "model")

    def finish_phase(self, index: int, model, record, history) -> None:
        """Saves a finished phase: its weights, record and history."""
        file = f"phase-{index}.npz"
        entry = {"record": _jsonable(dataclasses.asdict(record)),
                 "history": {k: [float(v) for v in values]
                             for k, values in history.history.items()},
                 "epochs": [int(e) for e in history.epoch], "file": file}
        if self.writer:
            self._write_arrays(file, {f"m{i}": v for i, v in
                                      enumerate(_values(model_variables(model)))})
        del self.state["finished"][index:]
        self.state["finished"].append(entry)
        self.state["progress"] = None
        self._write_state()

    def phase(self, index: int, name: str) -> "PhaseBackup":
        """The callback that saves (and resumes) the phase `index` epoch by epoch."""
        progress = self.state["progress"]
        if progress is not None and progress["phase"] != index:
            progress = None
        return PhaseBackup(self, index, name, progress)

    # ------------------------------------------------------------- files
    def _write_arrays(self, name: str, arrays: dict) -> None:
        os.makedirs(self.path, exist_ok=True)
        final = os.path.join(self.path, name)
        with open(final + ".partial", "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(final + ".partial", final)

    def _load_arrays(self, name: str) -> dict:
        file = os.path.join(self.path, name)
        try:
            with np.load(file) as loaded:
                return {k: loaded[k] for k in loaded.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            # A truncated or damaged file (not one a crash left: those are renamed in whole).
            raise BackupError(f"Cannot read {file} of the backup ({type(error).__name__}: "
                              f"{error}): the file is damaged. Start over with a new "
                              "backup_dir, or delete the folder.") from error

    def _write_state(self) -> None:
        if not self.writer:
            return
        os.makedirs(self.path, exist_ok=True)
        final = os.path.join(self.path, STATE_FILE)
        with open(final + ".partial", "w", encoding="utf-8") as f:
            json.dump(self.state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(final + ".partial", final)
        self._remove_unused()

    def _remove_unused(self) -> None:
        """Removes our own files the state no longer names (never anything else)."""
        used = {STATE_FILE, *(e["file"] for e in self.state["finished"])}
        if self.state["progress"] is not None:
            used.add(self.state["progress"]["file"])
        for name in os.listdir(self.path):
            if _OURS.match(name) and name not in used:
                try:
                    os.remove(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass


class PhaseBackup(keras.callbacks.Callback):
    """Saves one phase after every epoch, and puts a saved one back.

    `training.fit_phase` calls `restore` after compiling and adds this
    callback last, so it saves the logs every other callback has written.
    """

    def __init__(self, run: RunBackup, index: int, name: str, progress: dict | None):
        super().__init__()
        self.run = run
        self.index = index
        self.name = name
        self.progress = progress
        self._first_epoch = 0
        self._logs = [] if progress is None else list(progress["logs"])
        self._watched = []
        self._pending = None

    @property
    def epochs_done(self) -> int:
        return len(self._logs)

    def restore(self, model, callbacks, first_epoch: int, epochs: int) -> int:
        """Puts back the saved epochs of this phase; returns the epoch to start at.

        Args:
            model: the compiled model.
            callbacks: the phase's callbacks (their state is set back when
                training begins, after their own `on_train_begin`).
            first_epoch: int. The phase's first epoch (absolute).
            epochs: int. The phase's epochs.
        """
        self._first_epoch = first_epoch
        self._watched = [c for c in callbacks if _has_state(c)]
        if self.progress is None:
            return first_epoch
        arrays = self.run._load_arrays(self.progress["file"])
        _assign(model_variables(model), [arrays[f"m{i}"] for i in range(_count(arrays, "m"))],
                "model")
        restore_optimizer(model, [arrays[f"o{i}"] for i in range(_count(arrays, "o"))])
        self._pending = (self.progress["callbacks"], arrays)
        done = len(self._logs)
        logger.info("Phase '%s': resumed from %s after epoch %d of %d.", self.name,
                    self.run.path, done, epochs)
        return first_epoch + (epochs if self.progress["stopped"] else done)

    def on_train_begin(self, logs=None):
        if self._pending is None:
            return
        states, arrays = self._pending
        if len(states) != len(self._watched):
            raise BackupError(f"The backup saved {len(states)} stateful callbacks for phase "
                              f"'{self.name}'; this run has {len(self._watched)}.")
        for i, (callback, state) in enumerate(zip(self._watched, states)):
            weights = [arrays[f"c{i}_{j}"] for j in range(_count(arrays, f"c{i}_"))]
            _set_callback_state(callback, state, weights)
        self._pending = None

    def on_epoch_end(self, epoch, logs=None):
        self._logs.append({k: _number(v) for k, v in (logs or {}).items()})
        run = self.run
        states, arrays = [], {}
        for i, callback in enumerate(self._watched):
            state, weights = _callback_state(callback)
            states.append(state)
            arrays.update({f"c{i}_{j}": np.asarray(w) for j, w in enumerate(weights)})
        run.state["saves"] += 1
        file = f"progress-{run.state['saves']}.npz"
        if run.writer:
            arrays.update({f"m{i}": v for i, v in
                           enumerate(_values(model_variables(self.model)))})
            arrays.update({f"o{i}": v for i, v in
                           enumerate(_values(self.model.optimizer.variables))})
            run._write_arrays(file, arrays)
        run.state["progress"] = {"phase": self.index, "name": self.name, "file": file,
                                 "logs": self._logs, "stopped": bool(self.model.stop_training),
                                 "callbacks": states}
        run._write_state()

    def full_history(self, history):
        """The phase's Keras history with the epochs run before a restart put in front."""
        saved = self._logs[:self.epochs_done - len(history.epoch)]
        if not saved:
            return history
        merged = keras.callbacks.History()
        keys = list(dict.fromkeys([*saved[0], *history.history]))
        merged.history = {k: [float(e.get(k, math.nan)) for e in saved]
                          + list(history.history.get(k, [])) for k in keys}
        merged.epoch = [self._first_epoch + i for i in range(len(saved))] + list(history.epoch)
        return merged


def _count(arrays: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\d+$")
    return sum(1 for k in arrays if pattern.match(k))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
