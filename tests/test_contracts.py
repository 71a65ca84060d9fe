"""A backbone component and a phase written against `contracts` alone train a `TransferModel`.

Neither class inherits from the toolkit's: they have the protocols' members
and nothing more, so the model, the trainer and the memory estimate must
not ask them for anything else.
"""

import dataclasses

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer import contracts, training
from keras_transfer.batches import ExampleBatches
from keras_transfer.data import labels_for_head


class TinyComponent(keras.layers.Layer):
    """Vectors of 6 numbers in, 4 features out: a one-layer network."""

    data_forms = "(vectors, labels)"
    lora_rank = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        inputs = keras.Input((6,))
        self.network = keras.Model(inputs, keras.layers.Dense(4, activation="tanh",
                                                              name="dense")(inputs))
        self.preprocessor = keras.layers.Identity()
        self.feature_shape = (4,)
        self.input_shape_ = (6,)

    @property
    def pretrained(self):
        return True

    def call(self, inputs, training=None):
        return self.network(self.preprocessor(inputs), training=False)

    def make_dataset(self, x, y=None, *, head, batch_size=32, shuffle=False,
                     augmentation=None, seed=None, drop_remainder=False):
        labels, _ = labels_for_head(y, head)
        return ExampleBatches((np.asarray(x, "float32"), labels), batch_size, shuffle=shuffle,
                              seed=seed, drop_remainder=drop_remainder), None

    def predict_dataset(self, x, *, batch_size=32):
        return ExampleBatches((np.asarray(x, "float32"),), batch_size,
                              prepare=lambda vectors: vectors)

    def freeze(self):
        self.trainable = False

    def unfreeze(self, layers="all", train_batchnorm=False):
        self.trainable = True
        return 1

    def enable_lora(self, rank, target_layer_names=None):
        raise ValueError("no adapters here")

    def serving_endpoints(self, predict):
        return {}

    def metadata(self):
        return {"kind": "vectors"}

    def cache_key(self):
        return {"backbone": "tiny"}


@dataclasses.dataclass(frozen=True)
class AdamOnHeads:
    """A user's phase: a few Adam epochs on the heads, the backbone frozen."""

    epochs: int = 30
    name: str = "my_phase"
    trains_backbone: bool = False

    def prepare(self, model):
        model.backbone.freeze()

    def run(self, model, data, callbacks, initial_epoch, verbose):
        self.prepare(model)
        (train, _), validation = data.batches(), data.validation_batches()
        return training.fit_phase(
            model, self.name, train, validation, self.epochs,
            lambda: keras.optimizers.Adam(0.05), callbacks, None, initial_epoch, verbose,
            0.05, backup=data.phase_backup)


def _data(component=None, seed=0):
    """96 vectors; labels a linear function of the component's features (separable)."""
    x = np.random.default_rng(seed).normal(size=(96, 6)).astype("float32")
    if component is None:
        return x, (x[:, 0] > 0).astype("int64")
    features = keras.ops.convert_to_numpy(component.network(x))
    return x, (features[:, 0] - features[:, 1] > 0).astype("int64")


def test_the_toolkits_own_classes_satisfy_the_protocols():
    assert isinstance(kt.HeadPhase(), contracts.CachingPhase)
    assert isinstance(kt.FineTunePhase(), contracts.UnfreezingPhase)
    assert not kt.HeadPhase().trains_backbone and kt.FineTunePhase().trains_backbone
    backbone = kt.ImageBackbone(keras.Sequential([keras.Input((8, 8, 3)),
                                                  keras.layers.Conv2D(2, 3)]))
    assert isinstance(backbone, contracts.BackboneComponent)
    assert isinstance(TinyComponent(), contracts.BackboneComponent)
    assert isinstance(AdamOnHeads(), contracts.Phase)


def test_a_minimal_component_and_a_minimal_phase_train_a_model():
    model = kt.TransferModel(TinyComponent(), kt.Head(2))
    x, y = _data(model.backbone)
    before = model.evaluate(x, y)["accuracy"]
    frozen = [w.numpy().copy() for w in model.backbone.network.weights]
    history = model.fit(x, y, phases=[AdamOnHeads()], batch_size=16, seed=0, verbose=0)
    assert [p.name for p in history.phases] == ["my_phase"]
    assert len(history.history["loss"]) == 30
    assert history.history["loss"][-1] < history.history["loss"][0]
    after = model.evaluate(x, y)["accuracy"]
    assert after > max(before, 0.9)
    for old, new in zip(frozen, model.backbone.network.weights):  # the phase froze it
        np.testing.assert_array_equal(old, new.numpy())
    assert model.predict(x[:5]).shape == (5, 2)
    # The memory estimate asks the phase only what the protocol says.
    estimate = kt.estimate_memory(model, 16, AdamOnHeads())
    assert estimate.phase == "head" and estimate.gradients == 4 * (4 * 2 + 2)


def test_a_phase_that_trains_the_backbone_is_estimated_as_unfreezing_all_of_it():
    model = kt.TransferModel(TinyComponent(), kt.Head(2))
    estimate = kt.estimate_memory(model, 16, AdamOnHeads(trains_backbone=True))
    assert estimate.phase == "fine_tune"
    assert estimate.gradients == 4 * (6 * 4 + 4 + 4 * 2 + 2)


@pytest.mark.parametrize("phase", ["head", object(), [kt.HeadPhase(), 3]])
def test_fit_refuses_what_is_not_a_phase_naming_it(phase):
    x, y = _data()
    model = kt.TransferModel(TinyComponent(), kt.Head(2))
    with pytest.raises(ValueError, match="not one") as error:
        model.fit(x, y, phases=phase, verbose=0)
    assert "kt.contracts.Phase" in str(error.value)
