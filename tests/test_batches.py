"""The NumPy data path (`batches.py`): orders, epochs, joins. Runs on every backend."""

import numpy as np
import pytest

from keras_transfer.batches import ExampleBatches, JoinedBatches
from keras_transfer.data import EpochSeed, join_heads
from keras_transfer.heads import Head


def epoch_orders(batches, epochs):
    orders = []
    for _ in range(epochs):
        orders.append(np.concatenate([batches[i][0] for i in range(len(batches))]))
        batches.on_epoch_end()
    return orders


def test_example_batches_cut_and_keep_order_without_shuffle():
    batches = ExampleBatches((np.arange(10), np.arange(10) * 2), batch_size=4)
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[2][0], [8, 9])
    np.testing.assert_array_equal(batches[2][1], [16, 18])
    dropped = ExampleBatches((np.arange(10),), batch_size=4, drop_remainder=True)
    assert len(dropped) == 2
    with pytest.raises(IndexError):
        dropped[2]


def test_shuffled_order_depends_on_seed_and_epoch_only():
    first = epoch_orders(ExampleBatches((np.arange(50),), 8, shuffle=True, seed=3), 3)
    again = epoch_orders(ExampleBatches((np.arange(50),), 8, shuffle=True, seed=3), 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)  # same seed: same orders
    assert not np.array_equal(first[0], first[1])  # a new order each epoch
    for order in first:
        np.testing.assert_array_equal(np.sort(order), np.arange(50))  # each example once
    # A run resumed at epoch 2 (an EpochSeed set by training) sees epoch 2's order.
    seed = EpochSeed(3)
    resumed = ExampleBatches((np.arange(50),), 8, shuffle=True, seed=seed)
    seed.set_epoch(2)
    np.testing.assert_array_equal(
        np.concatenate([resumed[i][0] for i in range(len(resumed))]), first[2])


def test_prepare_runs_on_every_batch():
    batches = ExampleBatches((np.arange(6), ["a", "b", "c", "d", "e", "f"]), 4,
                             lambda numbers, texts: (numbers * 10, "".join(texts)))
    assert batches[0][1] == "abcd"
    np.testing.assert_array_equal(batches[1][0], [40, 50])


def test_joined_batches_round_robin_repeats_the_smaller_source():
    a = ExampleBatches((np.arange(6),), 2)           # 3 batches
    b = ExampleBatches((np.arange(100, 102),), 2)    # 1 batch
    joined = JoinedBatches([a, b], [0, 1, 0, 1, 0, 1])
    firsts = [int(joined[i][0][0]) for i in range(len(joined))]
    assert firsts == [0, 100, 2, 100, 4, 100]


def test_join_heads_routes_targets_and_masks_per_head():
    heads = {"a": Head(3), "b": Head(2, kind="multilabel")}
    data = {"a": ExampleBatches((np.zeros((4, 2)), np.array([0, 1, 2, 1])), 2),
            "b": ExampleBatches((np.ones((2, 2)), np.array([[1, 0], [0, 1]], np.float32)), 2)}
    joined, steps = join_heads(data, heads, training=True, sampling="proportional",
                               seed=EpochSeed(0), class_weights={"a": np.array([1., 2., 3.])})
    assert steps == 3
    seen = []
    for index in range(steps):
        inputs, targets, masks = joined[index]
        owner = "a" if inputs[0, 0] == 0 else "b"
        other = "b" if owner == "a" else "a"
        np.testing.assert_array_equal(masks[other], 0)
        assert targets["b"].shape == (2, 2) and targets["a"].shape == (2,)
        if owner == "a":  # class weights multiply the mask
            np.testing.assert_array_equal(masks["a"], np.array([1., 2., 3.])[targets["a"]])
        seen.append(owner)
    assert sorted(seen) == ["a", "a", "b"]
