"""The data path without TensorFlow: batches of NumPy arrays as `keras.utils.PyDataset`s.

On backends other than TensorFlow (see `backend.py`) every pipeline is a
`Batches`: a sequence of batches that Keras's `fit`, `evaluate` and
`predict` read on any backend. The pieces mirror the `tf.data` path:

* `ExampleBatches`: examples (arrays, or anything indexable with a loader
  such as image files or texts) cut into batches, shuffled in an order that
  depends on (seed, epoch) only, each batch turned into model inputs by a
  function (decode and resize images, augment, tokenize);
* `MappedBatches`: a function applied to every batch of another `Batches`
  (routing a head's labels, class weights);
* `JoinedBatches`: the batches of several heads in a schedule (round robin
  or proportional, see `data.task_schedule`).
"""

from __future__ import annotations

import math
import random

import keras
import numpy as np


class Batches(keras.utils.PyDataset):
    """A finite sequence of batches that knows which epoch it serves.

    Subclasses give `__len__` and `batch(index, epoch)`. Batches are read in
    the main process (`workers=1`): a batch's function may hold model state,
    such as an augmentation layer's seed.
    """

    def __init__(self):
        super().__init__(workers=1, use_multiprocessing=False)
        self.epochs_done = 0
        self._passes_started = 0

    def __getitem__(self, index: int):
        if index < 0 or index >= len(self):
            raise IndexError(f"Batch {index} of {len(self)}.")
        return self.batch(index, self.current_epoch())

    def current_epoch(self) -> int:
        return self.epochs_done

    def on_epoch_end(self):
        self.epochs_done += 1

    @property
    def num_batches(self) -> int:
        return len(self)

    def batch(self, index: int, epoch: int):
        raise NotImplementedError

    def map(self, function) -> MappedBatches:
        """These batches with `function` applied to each.

        As with `tf.data`'s `map`, a tuple batch is passed as arguments.
        """
        return MappedBatches(self, function)

    def __iter__(self):
        # As with tf.data, every iteration is a pass: the second one starts epoch 1.
        if self._passes_started:
            self.on_epoch_end()
        self._passes_started += 1
        for index in range(len(self)):
            yield self[index]


class ExampleBatches(Batches):
    """Examples cut into batches, optionally shuffled, turned into inputs per batch.

    Args:
        examples: a tuple of sequences of equal length (arrays, lists), one
            entry per example each; a batch holds each sequence's entries at
            the batch's indices, as arrays (or lists for non-arrays).
        batch_size: int.
        prepare: callable, optional. `prepare(*entries) -> batch`, run on
            every batch (decoding, resizing, augmentation, tokenizing).
        shuffle: bool. A new order every epoch.
        seed: None (drawn once), an int or a `data.EpochSeed`: the order of
            epoch e depends on (seed, e) only, so a resumed run sees the
            same orders as an uninterrupted one.
        drop_remainder: bool. Drop a last partial batch.

    Example:
        >>> batches = ExampleBatches((np.arange(5), np.arange(5) * 10), batch_size=2)
        >>> len(batches), batches[2]
        (3, (array([4]), array([40])))
    """

    def __init__(self, examples: tuple, batch_size: int, prepare=None, *, shuffle=False,
                 seed=None, drop_remainder=False):
        super().__init__()
        self.examples = tuple(examples)
        self.size = len(self.examples[0])
        self.batch_size = int(batch_size)
        self.prepare = prepare
        self.shuffle = shuffle
        self.seed = random.getrandbits(31) if seed is None else seed
        self.drop_remainder = drop_remainder
        self._order = (None, None)

    def __len__(self) -> int:
        count = self.size / self.batch_size
        return math.floor(count) if self.drop_remainder else math.ceil(count)

    def current_epoch(self) -> int:
        epoch = getattr(self.seed, "epoch_number", None)  # an EpochSeed knows it
        return self.epochs_done if epoch is None else epoch

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of `epoch`, in the order they are served."""
        if not self.shuffle:
            return np.arange(self.size)
        if self._order[0] != epoch:
            rng = np.random.default_rng([int(self.seed), epoch])
            self._order = (epoch, rng.permutation(self.size))
        return self._order[1]

    def batch(self, index: int, epoch: int):
        chosen = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        entries = tuple(_take(values, chosen) for values in self.examples)
        return self.prepare(*entries) if self.prepare is not None else entries


class MappedBatches(Batches):
    """The batches of `source` with `function(*batch)` applied to each."""

    def __init__(self, source: Batches, function):
        super().__init__()
        self.source = source
        self.function = function

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, index: int, epoch: int):
        batch = self.source[index]
        return self.function(*batch) if isinstance(batch, tuple) else self.function(batch)

    def on_epoch_end(self):
        super().on_epoch_end()
        self.source.on_epoch_end()


class JoinedBatches(Batches):
    """The batches of several sources, served in a schedule.

    Args:
        sources: list of `Batches`.
        schedule: list of source indices, one per batch of an epoch; a
            source asked for more batches than it has starts over.
        reshuffle_seed: None, or an int or `data.EpochSeed`: serve the
            schedule in a new order every epoch (each source still serves
            its batches in order).
    """

    def __init__(self, sources: list, schedule, reshuffle_seed=None):
        super().__init__()
        self.sources = list(sources)
        self.schedule = np.asarray(schedule, np.int64)
        self.reshuffle_seed = reshuffle_seed
        self._positions = (None, None)

    def __len__(self) -> int:
        return len(self.schedule)

    def current_epoch(self) -> int:
        epoch = getattr(self.reshuffle_seed, "epoch_number", None)
        return self.epochs_done if epoch is None else epoch

    def positions(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """`(source, batch of that source)` for each step of `epoch`."""
        if self._positions[0] != epoch:
            schedule = self.schedule
            if self.reshuffle_seed is not None:
                rng = np.random.default_rng([int(self.reshuffle_seed), epoch])
                schedule = schedule[rng.permutation(len(schedule))]
            within = np.zeros(len(schedule), np.int64)
            for source in range(len(self.sources)):
                steps = np.flatnonzero(schedule == source)
                within[steps] = np.arange(len(steps)) % len(self.sources[source])
            self._positions = (epoch, (schedule, within))
        return self._positions[1]

    def batch(self, index: int, epoch: int):
        sources, within = self.positions(epoch)
        return self.sources[sources[index]][int(within[index])]

    def on_epoch_end(self):
        super().on_epoch_end()
        for source in self.sources:
            source.on_epoch_end()


def _take(values, indices: np.ndarray):
    if isinstance(values, np.ndarray):
        return values[indices]
    return [values[int(i)] for i in indices]


def is_batches(value) -> bool:
    """Whether `value` is a pipeline of this module (not a `tf.data.Dataset`)."""
    return isinstance(value, Batches)
