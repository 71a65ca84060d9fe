"""LoRA adapter files: a fine-tuned text model's adapters and heads, a few MB.

`TransferModel.save_adapters` / `load_adapters` call these; the backbone's
own weights stay those of its preset.
"""

from __future__ import annotations

import os

import h5py
import keras
import numpy as np


def save_adapters(model, path: str) -> str:
    """Saves a model's LoRA adapters and heads, nothing else.

    Args:
        model: a `TransferModel` whose backbone has LoRA adapters.
        path: str. A file name ending in `.lora.h5`.

    Returns:
        The path written (a few MB at most, not the whole backbone).
    """
    if model.backbone.lora_rank is None:
        raise ValueError("No adapters to save: fine-tune with "
                         "FineTunePhase(lora_rank=...) first (or backbone.enable_lora).")
    if not str(path).endswith(".lora.h5"):
        raise ValueError(f"Received path={path!r}; adapter files end in '.lora.h5'.")
    model.backbone.network.save_lora_weights(path)
    with h5py.File(path, "a") as file:
        for name, head in model.heads.items():
            for i, weight in enumerate(head.weights):
                file[f"heads/{name}/{i}"] = keras.ops.convert_to_numpy(weight)
    return path

def load_adapters(model, path: str) -> None:
    """Loads adapters and heads saved by `save_adapters` into `model` (same heads)."""
    if not os.path.isfile(path):
        raise ValueError(f"Received adapter file {path!r}, which does not exist.")
    with h5py.File(path, "r") as file:
        rank = int(file["lora/vars/rank"][()])
        saved = {name: [np.asarray(file[f"heads/{name}/{i}"])
                        for i in range(len(file[f"heads/{name}"]))]
                 for name in file["heads"]}
    if sorted(saved) != sorted(model.heads):
        raise ValueError(f"The adapter file {path!r} holds heads {sorted(saved)}; this "
                         f"model has {sorted(model.heads)}.")
    for name, weights in saved.items():
        if [w.shape for w in weights] != [tuple(w.shape) for w in model.heads[name].weights]:
            raise ValueError(f"The head {name!r} in {path!r} does not fit this model's "
                             "head (different num_classes or hidden_units).")
    model.backbone.enable_lora(rank)
    model.backbone.network.load_lora_weights(path)
    for name, weights in saved.items():
        model.heads[name].set_weights(weights)
