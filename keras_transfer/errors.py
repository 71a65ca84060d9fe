"""Errors raised by keras_transfer.

Every error says what was received and what to do instead. They subclass the
built-in exception a user would already catch (`ValueError`, `RuntimeError`,
`FileExistsError`), so generic handlers keep working.
"""


class KerasTransferError(Exception):
    """Base class of every error raised by keras_transfer."""


class BackboneError(KerasTransferError, ValueError):
    """An unknown backbone, or an input shape the backbone cannot take."""


class WeightsError(KerasTransferError, ValueError):
    """Weights that cannot be downloaded, found or matched to the network."""


class DataError(KerasTransferError, ValueError):
    """Training or prediction data that cannot be used as given."""


class TrainingDivergedError(KerasTransferError, RuntimeError):
    """The loss became NaN or infinite during training."""


class ExportError(KerasTransferError, FileExistsError):
    """An export that would overwrite or lose an existing one, or Keras not on TensorFlow."""


class BackendError(KerasTransferError, RuntimeError):
    """A feature that needs TensorFlow, used without it or on another Keras backend."""


class PhaseOptionError(KerasTransferError, ValueError):
    """A training phase's option out of range (a count, a rate, a share)."""
