"""Choosing and using a distribution: `tf.distribute` strategies, `keras.distribution` on JAX.

A Keras model must be built and compiled inside the scope of the strategy it
trains with. Transfer models take `strategy=` at construction, build every
layer in its scope, and compile each training phase in it again.

Batch sizes are global, as in Keras: `fit(batch_size=64)` on 2 replicas
gives each replica 32 examples a step (the log says so).

Several workers (`"multi_worker"`, `MultiWorkerMirroredStrategy`):

- The strategy reads `TF_CONFIG` and must be created before TensorFlow runs
  any operation (`get_strategy` says so when that is what failed). Create
  the model (or call `get_strategy("multi_worker")`) first thing.
- Keras 3's `fit` fails under it (keras#20585); `MultiWorkerFitMixin`, a
  base of `TransferModel`, fixes the two places (see its docstring).
- Every worker runs the whole input pipeline and keeps its share of each
  global batch (`AutoShardPolicy.DATA`), so shuffling must use the same seed
  everywhere: `fit` forces one. Training batches drop a last partial batch.
- Only the chief writes: feature caches, backups (`backup_dir=`) and
  exports. The other workers take part in every collective but write to
  temporary folders they delete (or write nothing).

TPUs (`"tpu"`), as the TensorFlow TPU guide and `tf.distribute.TPUStrategy`
documentation describe them: the resolver finds a TPU from `TPU_NAME` (a
TPU node or pod), `COLAB_TPU_ADDR`, or the TPU devices of a Cloud TPU VM
(`/dev/accel*`, `/dev/vfio`, resolved as `tpu="local"`); the program
connects to the cluster, initialises the TPU system once per process (again
would wipe the TPU's memory), then makes the strategy. XLA compiles for one
batch shape, so training and validation batches drop a last partial batch,
and feature extraction pads every batch to one size. Choose a global batch
that is a multiple of 8 per core. On a TPU node (not a TPU VM) the input
pipeline and file writes run on the remote TPU host: image folders must be
on storage it reads (GCS), and SavedModel exports to a local disk would need
`experimental_io_device` (not set here). Not run here: no TPU was lent;
without one, `"tpu"` fails at once with a message that says where it looked.

On JAX, the same names map to Keras's own distributed engine for that
backend, `keras.distribution`: `"auto"`, `"mirrored"` and `"tpu"` give
`DataParallel` over the local accelerators (variables replicated, every
batch split over them; nothing when there is one device), `"cpu"` and
`"default"` none; a `keras.distribution.Distribution` is used as given.
`"multi_worker"` is TensorFlow's (call `keras.distribution.initialize()`
on every host and pass `DataParallel()` for JAX across machines).
TensorFlow is imported only for `tf.distribute` (see `backend.py`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os

import keras

from keras_transfer import backend
from keras_transfer.errors import BackboneError

logger = logging.getLogger("keras_transfer")

STRATEGY_NAMES = ("auto", "default", "mirrored", "multi_worker", "tpu", "cpu")
TIMEOUT_ENV_VAR = "KERAS_TRANSFER_COLLECTIVE_TIMEOUT"

# Made once per process: MWMS configures collectives at startup, and
# initialising a TPU system again would wipe its memory.
_MULTI_WORKER = None
_TPU = None


def _tf():
    return backend.tensorflow("tf.distribute strategies")


def get_strategy(strategy=None):
    """Resolves a strategy argument.

    Args:
        strategy: None (no distribution), a `tf.distribute.Strategy`, or a
            name: `"auto"` (a TPU if one is attached, else every local GPU
            with `MirroredStrategy` when there are several, else the
            default), `"mirrored"` (every local GPU, or the CPU),
            `"multi_worker"` (`MultiWorkerMirroredStrategy` from
            `TF_CONFIG`; a collective timeout in seconds can be set with
            `$KERAS_TRANSFER_COLLECTIVE_TIMEOUT`), `"tpu"`, `"cpu"` (one CPU
            device) or `"default"` (same as None).

    Returns:
        A `tf.distribute.Strategy` (TensorFlow), a
        `keras.distribution.Distribution` (other backends), or None.

    Raises:
        RuntimeError: `"multi_worker"` after TensorFlow has run operations,
            or `"tpu"` where no TPU can be found or initialised.

    Example:
        >>> model = kt.ImageTransferModel("resnet50", 10, weights=None, strategy="auto")
    """
    if strategy is None or backend.is_tf_strategy(strategy) \
            or is_keras_distribution(strategy):
        return strategy
    if not backend.is_tensorflow():
        return _keras_distribution(strategy)
    tf = _tf()
    if strategy == "default":
        return None
    if strategy == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if strategy == "multi_worker":
        return _multi_worker_strategy()
    if strategy == "tpu":
        return _tpu_strategy(required=True)
    if strategy == "auto":
        tpu = _tpu_strategy(required=False)
        if tpu is not None:
            return tpu
        if len(tf.config.list_logical_devices("GPU")) > 1:
            return tf.distribute.MirroredStrategy()
        return None
    raise ValueError(
        f"Received strategy={strategy!r}; expected a tf.distribute.Strategy, "
        f"None, or one of {STRATEGY_NAMES}."
    )


def is_keras_distribution(value) -> bool:
    """Whether `value` is a `keras.distribution` (DataParallel, ModelParallel)."""
    # Keras exports no base class of its distributions; these two make one.
    return hasattr(value, "device_mesh") and hasattr(value, "get_data_layout")


def _keras_distribution(strategy):
    """`strategy` (a name) as a `keras.distribution` on a backend other than TensorFlow."""
    if strategy in ("default", "cpu"):
        return None
    if strategy == "multi_worker":
        raise ValueError(
            f"Received strategy='multi_worker' on the {backend.name()!r} backend; it is "
            "TensorFlow's MultiWorkerMirroredStrategy. On JAX, call "
            "keras.distribution.initialize() on every host and pass "
            "strategy=keras.distribution.DataParallel().")
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"Received strategy={strategy!r}; expected a "
                         f"keras.distribution.Distribution, None, or one of {STRATEGY_NAMES}.")
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        return None  # one device: nothing to distribute
    return keras.distribution.DataParallel(devices=devices)


def _multi_worker_strategy():
    global _MULTI_WORKER
    tf = _tf()
    if _MULTI_WORKER is not None:
        return _MULTI_WORKER
    if "TF_CONFIG" not in os.environ:
        logger.warning("strategy='multi_worker' without TF_CONFIG: one worker on the local "
                       "devices. Set TF_CONFIG on every worker to train on several.")
    timeout = os.environ.get(TIMEOUT_ENV_VAR)
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=float(timeout) if timeout else None)
    try:
        _MULTI_WORKER = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=options)
    except RuntimeError as error:
        if "program startup" not in str(error):
            raise
        raise RuntimeError(
            "MultiWorkerMirroredStrategy must be created before TensorFlow runs any "
            "operation, and something ran first in this process. Create the model with "
            "strategy='multi_worker' (or call kt.get_strategy('multi_worker')) at the top "
            "of the program, before making tensors, datasets or other models.") from error
    return _MULTI_WORKER


def find_tpu():
    """A resolver for the TPU this machine can use, or None without one.

    It looks only where a TPU can be: `TPU_NAME` (a TPU node or pod, the way
    Cloud TPU tools set it), `COLAB_TPU_ADDR`, or the TPU devices of a Cloud
    TPU VM. No network request is made elsewhere (the resolver would ask the
    GCE metadata server otherwise).
    """
    name = os.environ.get("TPU_NAME") or os.environ.get("KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS")
    if not name and os.environ.get("COLAB_TPU_ADDR"):
        name = "grpc://" + os.environ["COLAB_TPU_ADDR"]
    if not name:
        if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
            return None
        name = "local"  # a TPU VM: the chips are attached to this host
    return _tf().distribute.cluster_resolver.TPUClusterResolver(tpu=name)


def _tpu_strategy(required: bool):
    global _TPU
    tf = _tf()
    if _TPU is not None:
        return _TPU
    where = ("Checked $TPU_NAME, $KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS, $COLAB_TPU_ADDR and the "
             "TPU VM devices /dev/accel*, /dev/vfio")
    try:
        resolver = find_tpu()
        if resolver is None:
            if required:
                raise RuntimeError(
                    f"Received strategy='tpu', but this machine has no TPU. {where}. On a "
                    "TPU VM run it there; for a TPU node set TPU_NAME; elsewhere use "
                    "strategy='auto'.")
            return None
        # The order of the TensorFlow TPU guide: connect (a TPU node's remote
        # devices become visible; a no-op on a TPU VM), initialise the TPU
        # system once, then make the strategy.
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        _TPU = tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        if not required:
            logger.warning("A TPU seemed present but could not be used (%s); strategy='auto' "
                           "goes on without it.", error)
            return None
        if isinstance(error, RuntimeError) and "no TPU" in str(error):
            raise
        raise RuntimeError(f"Received strategy='tpu', but the TPU could not be initialised: "
                           f"{error}. {where}.") from error
    logger.info("TPU: %d cores.", _TPU.num_replicas_in_sync)
    return _TPU


# ------------------------------------------------------------------ queries
def num_replicas(strategy=None) -> int:
    """Replicas that train in sync (1 without a strategy)."""
    if strategy is None:
        return 1
    if is_keras_distribution(strategy):
        return int(strategy.device_mesh.devices.size)
    return int(strategy.num_replicas_in_sync)


def is_multi_worker(strategy) -> bool:
    """Whether `strategy` spans several worker processes."""
    if not backend.is_tf_strategy(strategy):
        return False
    # More replicas in sync than this process has devices: others elsewhere.
    return (isinstance(strategy, _tf().distribute.MultiWorkerMirroredStrategy)
            and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices))


def is_tpu(strategy) -> bool:
    """Whether `strategy` trains on TPU cores."""
    if not backend.is_tf_strategy(strategy):
        return False
    tf = _tf()
    return isinstance(strategy, (tf.distribute.TPUStrategy,
                                 tf.distribute.experimental.TPUStrategy))


def needs_full_batches(strategy) -> bool:
    """Whether training batches must all have the global batch size.

    TPUs compile for one batch shape. With several workers a last partial
    batch is split unevenly, and a replica's loss, a mean over its own
    examples scaled by 1/replicas, then weighs that step wrongly. A
    `keras.distribution` on several devices splits every batch evenly.
    """
    if is_keras_distribution(strategy):
        return num_replicas(strategy) > 1
    return is_multi_worker(strategy) or is_tpu(strategy)


def is_chief(strategy=None) -> bool:
    """Whether this process writes files (checkpoints, caches, exports).

    The chief is the task of type `"chief"`, else worker 0. Single-process
    strategies always are.
    """
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def worker_name(strategy=None) -> str:
    """`"worker 1"`, `"chief"`, ... for logs; `"single process"` otherwise."""
    if not is_multi_worker(strategy):
        return "single process"
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type} {resolver.task_id}"


def batch_message(batch_size: int, strategy=None) -> str:
    """Says how a global batch is split over the replicas."""
    replicas = num_replicas(strategy)
    if replicas == 1:
        return f"Batch size {batch_size} (one replica)."
    per_replica, extra = divmod(batch_size, replicas)
    split = (f"{per_replica} per replica" if not extra else
             f"{per_replica}-{per_replica + 1} per replica (not divisible: uneven split)")
    return (f"Global batch size {batch_size} = {split} x {replicas} replicas "
            f"({type(strategy).__name__}).")


def all_workers_agree(strategy, flag: bool) -> bool:
    """True only where `flag` is true on every worker (a collective: call it on all)."""
    if not is_multi_worker(strategy):
        return bool(flag)
    tf = _tf()
    value = strategy.run(tf.function(lambda: tf.constant(1.0 if flag else 0.0)))
    # Only SUM and MEAN reduce: every replica says yes when the sum is the count.
    total = float(strategy.reduce("SUM", value, axis=None))
    return total > strategy.num_replicas_in_sync - 0.5


# ------------------------------------------------------------------ scopes
def scope(strategy):
    """The strategy's (or Keras distribution's) scope, or a no-op context for None."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def check_built_in_scope(backbone, strategy) -> None:
    """Raises `BackboneError` if the backbone's weights were created outside `strategy`.

    A network built before the strategy (or Keras distribution) and passed in
    keeps variables the strategy cannot mirror or shard; training would then
    fail deep inside TensorFlow ("`colocate_vars_with` must only be passed a
    variable created in this tf.distribute.Strategy.scope()") or JAX ("a mix
    of local and distributed variables").
    """
    weights = backbone.weights
    if strategy is None or not weights:
        return
    if backend.is_tensorflow():
        outside = [w for w in weights if not strategy.extended.variable_created_in_scope(w.value)]
    elif strategy.device_mesh.devices.size > 1:
        import jax  # lazy: the JAX backend only

        outside = [w for w in weights if isinstance(getattr(w.value, "sharding", None),
                                                    jax.sharding.SingleDeviceSharding)]
    else:
        return
    if outside:
        raise BackboneError(
            f"Received a backbone whose weights were created outside the scope of "
            f"strategy={type(strategy).__name__} ({len(outside)} of {len(weights)}, e.g. "
            f"{outside[0].path!r}): it cannot distribute them, and training would fail. "
            f"Build the network inside the strategy's scope and pass both: "
            f"`with strategy.scope(): network = ...`, then "
            f"`ImageTransferModel(network, ..., strategy=strategy)` in that same block; or "
            f"pass a registry name, which is built in the scope.")


def model_scope(model):
    """The scope of the strategy or Keras distribution `model` was built in."""
    return scope(strategy_of(model))


def strategy_of(model):
    """The strategy (TensorFlow) or Keras distribution (JAX) `model` was built in, or None.

    The one place that reads where Keras (TensorFlow: its own `_distribute_strategy`)
    or `TransferModel` (JAX: `_keras_distribution`) keeps it; everything else asks
    this function (or `TransferModel.strategy`) or takes the strategy as an argument.
    """
    if backend.is_tensorflow():
        return getattr(model, "_distribute_strategy", None)
    return getattr(model, "_keras_distribution", None)


# -------------------------------------------------------- Keras fit, N workers
class MultiWorkerFitMixin:
    """Makes Keras 3's `fit`/`evaluate` work under `MultiWorkerMirroredStrategy`.

    Put it first in the bases of a `keras.Model` subclass. Keras 3.15 fails in
    two places when the strategy spans several workers (keras#20585):

    1. `_maybe_symbolic_build` pulls one batch and reduces the whole `(x, y)`
       structure with one `strategy.reduce` call, which takes one value: the
       collective ops try `convert_to_tensor` on a tuple of `PerReplica`. The
       build needs shapes and dtypes only, which the dataset's `element_spec`
       has; reading them there also spares an iterator and a batch.
    2. `reduce_per_replica` reduces every log with `reduce("MEAN", v,
       axis=0)`; logs are scalars ("Invalid reduction dimension 0").
       Returning them as shape-(1,) tensors makes that the exact mean over
       workers (metric states are SyncOnRead sums, so every worker logs the
       same global values, and callbacks decide alike everywhere).

    On one worker it changes nothing but (1), which reads shapes instead of
    a batch under any strategy. Keras's `steps_per_execution` must stay 1
    under several workers (Keras's multi-step loop fails there).
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and getattr(self, "_distribute_strategy", None) is not None:
            data_batch = iterator.data_adapter.get_tf_dataset().element_spec
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # `*args`: JAX's steps take `(state, data)` and return `(logs, state)`, left as they are.
    def train_step(self, *args):
        return _logs_as_vectors(super().train_step(*args))

    def test_step(self, *args):
        return _logs_as_vectors(super().test_step(*args))


def _logs_as_vectors(logs):
    if not backend.is_tensorflow():
        return logs
    tf = _tf()
    if is_multi_worker(tf.distribute.get_strategy()):
        return tf.nest.map_structure(lambda v: tf.reshape(v, (1,)), logs)
    return logs


def tf_config() -> dict:
    """The parsed `TF_CONFIG`, or `{}`."""
    try:
        return json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}. Received "
                         f"{os.environ['TF_CONFIG'][:200]!r}.") from error
