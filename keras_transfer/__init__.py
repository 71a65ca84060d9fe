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

from keras_transfer.backbones import BackboneSpec, get_backbone_spec, list_backbones
from keras_transfer.causal_lm import adapt_causal_lm
from keras_transfer.data import default_augmentation, make_image_dataset, task_schedule
from keras_transfer.distribute import get_strategy
from keras_transfer.errors import (
    BackboneError,
    DataError,
    ExportError,
    KerasTransferError,
    TrainingDivergedError,
    WeightsError,
)
from keras_transfer.export import load_metadata
from keras_transfer.feature_cache import FeatureCache, extract_features
from keras_transfer.forgetting import (
    ForgettingReport,
    block_layers,
    forgetting_report,
    linear_cka,
    snapshot_backbone,
)
from keras_transfer.heads import Head
from keras_transfer.image import (
    ImageBackbone,
    ImagePreprocessing,
    ImageTransferModel,
    MultiTaskModel,
)
from keras_transfer.imagenet import imagenet_class_names, imagenet_predict, imagenet_top_k
from keras_transfer.insight import (
    ClassificationReport,
    classification_report,
    confusion_matrix,
    grad_cam,
    head_logits,
    last_conv_layer,
    model_grad_cam,
    overlay_heatmap,
    plot_confusion_matrix,
    plot_grad_cam,
    plot_worst_images,
    top_k,
    worst_predictions,
    worst_texts_table,
)
from keras_transfer.model import TransferModel
from keras_transfer.plots import plot_forgetting, plot_history
from keras_transfer.text import (
    TextBackbone,
    TextMultiTaskModel,
    TextPooling,
    TextTransferModel,
    minilm_path,
    text_presets,
)
from keras_transfer.torch_checkpoint import load_torch_checkpoint, load_torch_state_dict
from keras_transfer.torchvision_models import (
    load_torch_weights,
    mobilenet_v2_imagenet_checkpoint,
    torchvision_eval_crop,
    torchvision_mobilenet_v2,
)
from keras_transfer.training import (
    FineTunePhase,
    HeadPhase,
    TransferHistory,
    WarmupDecay,
    unfreeze,
)
from keras_transfer.weights import WeightsLoadReport, load_weights_by_name

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "ClassificationReport",
    "DataError",
    "ExportError",
    "FeatureCache",
    "FineTunePhase",
    "ForgettingReport",
    "Head",
    "HeadPhase",
    "ImageBackbone",
    "ImagePreprocessing",
    "ImageTransferModel",
    "KerasTransferError",
    "MultiTaskModel",
    "TextBackbone",
    "TextMultiTaskModel",
    "TextPooling",
    "TextTransferModel",
    "TrainingDivergedError",
    "TransferHistory",
    "TransferModel",
    "WarmupDecay",
    "WeightsError",
    "WeightsLoadReport",
    "__version__",
    "adapt_causal_lm",
    "block_layers",
    "classification_report",
    "confusion_matrix",
    "default_augmentation",
    "extract_features",
    "forgetting_report",
    "get_backbone_spec",
    "get_strategy",
    "grad_cam",
    "head_logits",
    "imagenet_class_names",
    "imagenet_predict",
    "imagenet_top_k",
    "last_conv_layer",
    "linear_cka",
    "list_backbones",
    "load_metadata",
    "load_torch_checkpoint",
    "load_torch_state_dict",
    "load_torch_weights",
    "load_weights_by_name",
    "make_image_dataset",
    "minilm_path",
    "model_grad_cam",
    "mobilenet_v2_imagenet_checkpoint",
    "overlay_heatmap",
    "plot_confusion_matrix",
    "plot_forgetting",
    "plot_grad_cam",
    "plot_history",
    "plot_worst_images",
    "snapshot_backbone",
    "task_schedule",
    "text_presets",
    "top_k",
    "torchvision_eval_crop",
    "torchvision_mobilenet_v2",
    "unfreeze",
    "worst_predictions",
    "worst_texts_table",
]
