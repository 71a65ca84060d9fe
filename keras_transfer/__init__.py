"""keras_transfer: transfer learning with Keras 3 and TensorFlow.

Example:

```python
import keras_transfer as kt
model = kt.ImageTransferModel("mobilenet_v2", num_classes=5, weights="imagenet")
history = model.fit(train, validation_data=val, head_epochs=5, fine_tune_epochs=5)
model.evaluate(test)
model.export("saved_models/flowers")
```
"""

__version__ = "0.1.0"

import importlib
import importlib.util
import os
import sys

# Where each public name is defined: {module: names}.
_MODULES = {
    "backbones": ("BackboneSpec", "get_backbone_spec", "list_backbones"),
    "causal_lm": ("adapt_causal_lm", "docstring_corpus", "perplexity"),
    "contrastive": ("ContrastivePhase", "PairSimilarity", "sample_pairs"),
    "data": ("task_schedule",),
    "distribute": ("get_strategy",),
    "doctor": ("estimate_backbone_memory",),
    "efficientnet_lite": ("efficientnet_lite0",),
    "errors": (
        "BackboneError", "BackendError", "DataError", "ExportError", "KerasTransferError",
        "PhaseOptionError", "TrainingDivergedError", "WeightsError",
    ),
    "export": ("load_metadata",),
    "feature_cache": ("FeatureCache", "extract_features"),
    "generation": ("ChatTokenizer", "chat_prompt", "generate", "make_sampler", "stream"),
    "gguf": ("GGUFCheckpoint", "load_gguf", "read_gguf", "smollm2_path"),
    "forgetting": (
        "ForgettingReport", "block_layers", "forgetting_report", "linear_cka", "snapshot_backbone",
    ),
    "gradual": ("GradualUnfreezePhase",),
    "heads": ("Head",),
    "image": ("ImageBackbone", "ImagePreprocessing", "ImageTransferModel", "MultiTaskModel"),
    "image_data": ("default_augmentation", "make_image_dataset"),
    "imagenet": ("imagenet_class_names", "imagenet_predict", "imagenet_top_k"),
    "layer_groups": ("LayerGroup", "group_rates", "layer_groups"),
    "insight": (
        "ClassificationReport", "classification_report", "confusion_matrix",
        "plot_confusion_matrix", "plot_worst_images", "top_k", "worst_predictions",
        "worst_texts_table",
    ),
    "lm_memory": ("estimate_lm_memory",),
    "memory": ("MemoryEstimate", "estimate_memory"),
    "model": ("TransferModel",),
    "phases": ("FineTunePhase", "HeadPhase"),
    "plots": ("plot_forgetting", "plot_history"),
    "saliency": (
        "grad_cam", "head_logits", "last_conv_layer", "model_grad_cam", "overlay_heatmap",
        "plot_grad_cam",
    ),
    "text": (
        "TextBackbone", "TextMultiTaskModel", "TextPooling", "TextTransferModel", "minilm_path",
        "text_presets",
    ),
    "torch_checkpoint": ("load_torch_checkpoint", "load_torch_state_dict"),
    "torchvision_models": (
        "load_torch_weights", "mobilenet_v2_imagenet_checkpoint", "torchvision_eval_crop",
        "torchvision_mobilenet_v2",
    ),
    "training": ("TransferHistory", "WarmupDecay", "unfreeze"),
    "weights": ("WeightsLoadReport", "load_weights_by_name"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name):
    # Names (and submodules) are imported on first use when importing is lazy.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"keras_transfer.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"keras_transfer.{name}") is not None:
        return importlib.import_module(f"keras_transfer.{name}")
    raise AttributeError(f"module 'keras_transfer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _started_as_command() -> bool:
    """Whether this process is the `keras-transfer` command.

    The command imports TensorFlow only for the subcommands that need it, so
    `keras-transfer --help` and `list-backbones` answer at once.
    """
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if any(os.path.basename(a).split(".")[0] == "keras-transfer" for a in argv[:2]):
        return True
    return "-m" in argv and argv[argv.index("-m") + 1:][:1] == ["keras_transfer.cli"]


# A library user gets everything at import, which also registers the Keras
# classes, so `keras.saving.load_model` finds them after `import keras_transfer`.
if not _started_as_command():
    for _name in _EXPORTS:
        __getattr__(_name)
