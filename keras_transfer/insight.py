"""Looking inside a trained classifier: where it errs, and where it looks.

- `confusion_matrix` / `plot_confusion_matrix`: which classes it confuses;
- `classification_report`: precision, recall and F1 per class, with averages;
- `top_k`: the k most probable classes of each example, with their names;
- `worst_predictions`, `plot_worst_images`, `worst_texts_table`: the most
  confidently wrong examples, as an image grid or a text table;
- `grad_cam`, `overlay_heatmap`, `plot_grad_cam` (in `saliency`): Grad-CAM heat maps of
  where an image model looked (by default weighted per position, as
  LayerCAM does, which stays right for Flatten heads).

Everything takes NumPy arrays: labels as integers or one-hot rows,
predictions as integers or probability rows (`model.predict`). Only
`grad_cam` needs TensorFlow. Plots follow `plots.py`: they return a
`matplotlib.figure.Figure` and save it when given a path.

Example:

```python
import keras_transfer as kt
probabilities = model.predict(x_test)
print(kt.classification_report(y_test, probabilities, model.class_names))
kt.plot_confusion_matrix(kt.confusion_matrix(y_test, probabilities), model.class_names)
kt.plot_worst_images(x_test, probabilities, y_test, model.class_names, path="worst.png")
heatmaps = kt.model_grad_cam(model, x_test[:8])
kt.plot_grad_cam(x_test[:8], heatmaps)
```
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from keras_transfer.errors import DataError
from keras_transfer.plots import _figure, _save

NORMALIZATIONS = (None, "true", "pred", "all")


def _labels(y, name: str) -> np.ndarray:
    """Integer class labels of integer labels, one-hot rows or probability rows."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        return np.argmax(y, axis=1)
    if y.ndim != 1:
        raise DataError(f"Received {name} of shape {y.shape}; expected integer labels (N,), "
                        "one-hot labels or probabilities (N, classes).")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError(f"Received {name} with values that are not class indices, "
                            f"such as {y[~(y == np.round(y))][:3].tolist()}. "
                            "For one sigmoid output per example pass "
                            "`(probabilities > 0.5).astype(int)`.")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"Received {name} with a negative class {int(y.min())}; "
                        "expected class indices 0, 1, ...")
    return y


def _width(y) -> int | None:
    """The number of classes an (N, classes) array states, else None."""
    y = np.asarray(y)
    return y.shape[1] if y.ndim == 2 and y.shape[1] > 1 else None


def _pair(y_true, y_pred, num_classes):
    """`(true labels, predicted labels, number of classes)`, checked."""
    true, pred = _labels(y_true, "y_true"), _labels(y_pred, "predictions")
    if len(true) != len(pred):
        raise DataError(f"Received {len(true)} labels and {len(pred)} predictions; "
                        "expected one prediction per label.")
    if num_classes is None:
        num_classes = _width(y_pred) or _width(y_true)
    largest = int(max(true.max(initial=-1), pred.max(initial=-1)))
    if num_classes is None:
        num_classes = largest + 1
    if largest >= num_classes:
        raise DataError(f"Received class {largest} with num_classes={num_classes}; "
                        "pass the number of classes the model has.")
    return true, pred, int(num_classes)


def _names(class_names, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise DataError(f"Received {len(names)} class names for {num_classes} classes; "
                        "expected one name per class.")
    return names


def _divide(numerator, denominator):
    """Elementwise division that gives 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(
        numerator, denominator).shape), where=denominator != 0)


def _normalized(matrix: np.ndarray, normalize) -> np.ndarray:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"Received normalize={normalize!r}; expected one of {NORMALIZATIONS}.")
    if normalize is None:
        return matrix
    total = {"true": matrix.sum(axis=1, keepdims=True),
             "pred": matrix.sum(axis=0, keepdims=True),
             "all": matrix.sum()}[normalize]
    return _divide(matrix, total)


def confusion_matrix(y_true, y_pred_or_probabilities, num_classes: int | None = None,
                     normalize: str | None = None) -> np.ndarray:
    """Counts how often each true class was predicted as each class.

    Args:
        y_true: integer labels `(N,)` or one-hot labels `(N, classes)`.
        y_pred_or_probabilities: predicted labels `(N,)` or probabilities
            `(N, classes)` (the argmax is the prediction).
        num_classes: int, optional. Default: the width of the
            probabilities, else the largest class seen plus one.
        normalize: None (counts), `"true"` (each row, a true class, sums
            to 1: the diagonal is the recall), `"pred"` (each column sums
            to 1: the diagonal is the precision) or `"all"` (everything
            sums to 1). A row or column without examples stays 0.

    Returns:
        `(num_classes, num_classes)` array: rows are true classes, columns
        predicted ones. Integer counts, or floats when normalized.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 0, 1])
        array([[1, 0],
               [1, 1]])
    """
    true, pred, num_classes = _pair(y_true, y_pred_or_probabilities, num_classes)
    counts = np.bincount(true * num_classes + pred, minlength=num_classes ** 2)
    return _normalized(counts.reshape(num_classes, num_classes), normalize)


def plot_confusion_matrix(matrix, class_names: Sequence[str] | None = None, path=None,
                          normalize: str | None = "true", title: str | None = None):
    """Draws a confusion matrix, each cell annotated with its count and share.

    Colours show the normalized values (by default the share of each true
    class, so a rare class is as visible as a common one); each cell gives
    the count and, when normalized, the percentage. Up to about 20 classes
    stay readable; beyond 10, empty cells are left blank.

    Args:
        matrix: `(classes, classes)` counts, from `confusion_matrix`.
        class_names: sequence of str, optional. Tick labels.
        path: str, optional. Where to save the figure.
        normalize: `"true"` (default), `"pred"`, `"all"` or None (colours
            and annotations are the counts).
        title: str, optional. Default: the accuracy the counts imply.

    Returns:
        The `matplotlib.figure.Figure`.

    Example:
        >>> matrix = kt.confusion_matrix(y_test, model.predict(x_test))
        >>> kt.plot_confusion_matrix(matrix, model.class_names, path="confusion.png")
        <Figure size ... with 2 Axes>
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not matrix.size:
        raise DataError(f"Received a matrix of shape {matrix.shape}; expected a square "
                        "(classes, classes) confusion matrix.")
    n = matrix.shape[0]
    names = _names(class_names, n)
    shares = _normalized(matrix.astype(np.float64), normalize)
    side = max(4.0, (0.42 if n <= 14 else 0.5) * n + 2.2)
    figure, axes = _figure(1, 1, width=side + 1.0, height=side)
    axis = axes[0, 0]
    image = axis.imshow(shares, cmap="Blues", vmin=0,
                        vmax=1 if normalize else max(float(shares.max()), 1.0))
    figure.colorbar(image, ax=axis, shrink=0.8,
                    label={"true": "share of the true class", "pred": "share of the prediction",
                           "all": "share of all examples", None: "count"}[normalize])
    counts_are_integers = np.all(matrix == np.round(matrix))
    size = 9 if n <= 8 else 7 if n <= 14 else 6
    for (row, col), value in np.ndenumerate(matrix):
        if n > 10 and value == 0:
            continue
        text = f"{int(value)}" if counts_are_integers else f"{value:.2g}"
        if normalize:
            text += f"\n{shares[row, col]:.0%}"
        dark = shares[row, col] > 0.5 * (1 if normalize else shares.max())
        axis.text(col, row, text, ha="center", va="center", fontsize=size,
                  color="white" if dark else "black")
    ticks = range(n)
    rotate = n > 6 or max(len(name) for name in names) > 4
    axis.set_xticks(ticks, labels=names, rotation=45 if rotate else 0,
                    ha="right" if rotate else "center", rotation_mode="anchor")
    axis.set_yticks(ticks, labels=names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    if title is None:
        total = matrix.sum()
        title = "Confusion matrix"
        if total:
            title += f" (accuracy {np.trace(matrix) / total:.1%}, {int(total)} examples)"
    axis.set_title(title)
    return _save(figure, path)


class ClassificationReport(dict):
    """Precision, recall, F1 and support per class, with averages.

    A plain dict (`report["classes"]["cat"]["f1"]`, `report["accuracy"]`,
    `report["macro avg"]`, `report["weighted avg"]`) that prints as a table.
    """

    def __str__(self) -> str:
        names = list(self["classes"])
        width = max([len(n) for n in names] + [len("weighted avg")])
        header = f"{'':<{width}}  precision  recall  f1-score  support"
        lines = [header]
        row = "{:<{w}}  {:>9.3f}  {:>6.3f}  {:>8.3f}  {:>7d}"
        for name, values in self["classes"].items():
            lines.append(row.format(name, values["precision"], values["recall"],
                                    values["f1"], values["support"], w=width))
        lines.append("")
        total = self["weighted avg"]["support"]
        lines.append(f"{'accuracy':<{width}}  {'':>9}  {'':>6}  {self['accuracy']:>8.3f}  "
                     f"{total:>7d}")
        for key in ("macro avg", "weighted avg"):
            values = self[key]
            lines.append(row.format(key, values["precision"], values["recall"],
                                    values["f1"], values["support"], w=width))
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle):  # IPython and Jupyter show the table
        printer.text(str(self))


def classification_report(y_true, probabilities, class_names: Sequence[str] | None = None
                          ) -> ClassificationReport:
    """Precision, recall and F1 of every class, their averages and accuracy.

    Precision is the share of the examples predicted as a class that are
    that class; recall the share of a class's examples found; F1 their
    harmonic mean. A ratio with nothing to count (no example predicted as
    a class, or none of it) is 0. The macro average is the plain mean over
    the classes that occur in the labels or the predictions (as
    scikit-learn does); the weighted average weighs each class by its
    support (number of true examples).

    Args:
        y_true: integer labels `(N,)` or one-hot labels `(N, classes)`.
        probabilities: `(N, classes)` probabilities, or predicted labels.
        class_names: sequence of str, optional. Default: "0", "1", ...

    Returns:
        A `ClassificationReport`: a dict `{"classes": {name: {"precision",
        "recall", "f1", "support"}}, "accuracy": float, "macro avg": {...},
        "weighted avg": {...}}` that prints as a table.

    Example:
        >>> report = kt.classification_report(y_test, model.predict(x_test), names)
        >>> print(report)
        precision  recall  f1-score  support
        cat ...
        dog ...
        fox ...
        accuracy ...
        >>> recall = report["classes"]["cat"]["recall"]
    """
    num_classes = _width(probabilities)
    if num_classes is None and class_names is not None:  # predicted labels and names
        num_classes = len(class_names)
    matrix = confusion_matrix(y_true, probabilities, num_classes)
    names = _names(class_names, len(matrix))
    hits = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _divide(hits, predicted)
    recall = _divide(hits, support)
    f1 = _divide(2 * precision * recall, precision + recall)
    present = (support + predicted) > 0
    total = int(support.sum())

    def average(weights):
        return {"precision": float(_divide(np.sum(precision * weights), np.sum(weights))),
                "recall": float(_divide(np.sum(recall * weights), np.sum(weights))),
                "f1": float(_divide(np.sum(f1 * weights), np.sum(weights))),
                "support": total}

    return ClassificationReport(
        classes={name: {"precision": float(precision[i]), "recall": float(recall[i]),
                        "f1": float(f1[i]), "support": int(support[i])}
                 for i, name in enumerate(names)},
        accuracy=float(_divide(hits.sum(), total)),
        **{"macro avg": average(present.astype(np.float64)),
           "weighted avg": average(support.astype(np.float64))})


class Prediction(NamedTuple):
    """One of the top-k classes of an example."""

    index: int
    name: str
    probability: float


def _probabilities(probabilities) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim == 1:
        probabilities = probabilities[None]
    if probabilities.ndim != 2:
        raise DataError(f"Received probabilities of shape {probabilities.shape}; expected "
                        "(N, classes), as `model.predict` returns.")
    return probabilities


def top_k(probabilities, k: int = 5, class_names: Sequence[str] | None = None
          ) -> list[list[Prediction]]:
    """The k most probable classes of every example, most probable first.

    Args:
        probabilities: `(N, classes)` array (one example may be `(classes,)`).
        k: int. How many classes; at most the number of classes.
        class_names: sequence of str, optional. Default: "0", "1", ...

    Returns:
        One list per example of `Prediction(index, name, probability)`
        tuples; ties keep the lower class index first.

    Example:
        >>> probabilities = np.array([[0.1, 0.7, 0.2]])   # model.predict(images[:1])
        >>> for index, name, p in kt.top_k(probabilities, 3, names)[0]:
        ...     print(f"{name}: {p:.1%}")
        dog: 70.0%
        fox: 20.0%
        cat: 10.0%
    """
    probabilities = _probabilities(probabilities)
    names = _names(class_names, probabilities.shape[1])
    if k < 1:
        raise ValueError(f"Received k={k}; expected at least 1.")
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[Prediction(int(i), names[i], float(row[i])) for i in indices]
            for row, indices in zip(probabilities, order)]


class Mistake(NamedTuple):
    """A wrong prediction: which example, its true and predicted class, how sure."""

    index: int
    true: int
    predicted: int
    confidence: float
    true_probability: float


def worst_predictions(probabilities, y_true, k: int = 16) -> list[Mistake]:
    """The most confidently wrong examples.

    Args:
        probabilities: `(N, classes)` array, from `model.predict`.
        y_true: integer labels `(N,)` or one-hot labels `(N, classes)`.
        k: int. How many at most (fewer when there are fewer mistakes).

    Returns:
        A list of `Mistake(index, true, predicted, confidence,
        true_probability)`, the most confident first; `confidence` is the
        probability of the (wrong) predicted class.

    Example:
        >>> probabilities = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
        >>> for mistake in kt.worst_predictions(probabilities, [1, 1, 0], k=5):
        ...     print(mistake.index, names[mistake.predicted], mistake.confidence)
        0 cat 0.9
        2 fox 0.8
    """
    probabilities = _probabilities(probabilities)
    true, predicted, _ = _pair(y_true, probabilities, probabilities.shape[1])
    confidence = probabilities[np.arange(len(true)), predicted]
    wrong = np.flatnonzero(true != predicted)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:k]
    return [Mistake(int(i), int(true[i]), int(predicted[i]), float(confidence[i]),
                    float(probabilities[i, true[i]])) for i in wrong]


def _as_uint8(image) -> np.ndarray:
    """An image (H, W), (H, W, 1) or (H, W, 3), 0-255, as uint8 for display."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise DataError(f"Received an image of shape {image.shape}; expected (height, width) "
                        "or (height, width, 1 or 3).")
    if image.dtype != np.uint8:
        image = np.clip(np.nan_to_num(image.astype(np.float64)), 0, 255).round().astype(np.uint8)
    return image


def _image_grid(count: int, columns: int | None, cell: float = 2.3):
    columns = columns or max(1, min(8, math.ceil(math.sqrt(count))))
    rows = max(1, math.ceil(count / columns))
    figure, axes = _figure(rows, columns, width=cell, height=cell + 0.35)
    cells = list(axes.flat)
    for axis in cells:
        axis.set_axis_off()
    return figure, cells


def plot_worst_images(images, probabilities, y_true, class_names: Sequence[str] | None,
                      k: int = 16, path=None, columns: int | None = None):
    """Shows the most confidently wrong images, each titled true vs predicted.

    Args:
        images: the images the probabilities belong to, raw (not
            preprocessed): an array `(N, H, W)`, `(N, H, W, 1)` or
            `(N, H, W, 3)`, or a sequence of such images; uint8 or floats
            in 0-255.
        probabilities: `(N, classes)` array, from `model.predict`.
        y_true: integer labels `(N,)` or one-hot labels `(N, classes)`.
        class_names: sequence of str or None.
        k: int. How many images at most.
        path: str, optional. Where to save the figure.
        columns: int, optional. Grid width (default: about square).

    Returns:
        The `matplotlib.figure.Figure`.

    Example:
        >>> kt.plot_worst_images(x_test, model.predict(x_test), y_test, names, k=9)
        <Figure size ... Axes>
    """
    probabilities = _probabilities(probabilities)
    if len(images) != len(probabilities):
        raise DataError(f"Received {len(images)} images and {len(probabilities)} rows of "
                        "probabilities; expected one row per image.")
    names = _names(class_names, probabilities.shape[1])
    mistakes = worst_predictions(probabilities, y_true, k)
    figure, cells = _image_grid(max(1, len(mistakes)), columns)
    if not mistakes:
        cells[0].text(0.5, 0.5, "no mistakes", ha="center", va="center",
                      transform=cells[0].transAxes)
    for axis, mistake in zip(cells, mistakes):
        image = _as_uint8(images[mistake.index])
        axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        axis.set_title(f"true: {names[mistake.true]}\npred: {names[mistake.predicted]} "
                       f"({mistake.confidence:.0%})", fontsize="small")
    figure.suptitle(f"The {len(mistakes)} most confident mistakes")
    return _save(figure, path)


def worst_texts_table(texts: Sequence[str], probabilities, y_true,
                      class_names: Sequence[str] | None, k: int = 10, width: int = 70
                      ) -> tuple[list[dict], str]:
    """The most confidently wrong texts, as rows and as a plain-text table.

    Args:
        texts: sequence of str, the inputs the probabilities belong to.
        probabilities: `(N, classes)` array, from `model.predict`.
        y_true: integer labels `(N,)` or one-hot labels `(N, classes)`.
        class_names: sequence of str or None.
        k: int. How many rows at most.
        width: int. Texts longer than this are cut in the table (not in
            the rows).

    Returns:
        `(rows, table)`: rows are dicts with `index`, `text`, `true`,
        `predicted` (class names) and `confidence`; `table` is a str.

    Example:
        >>> reviews = ["Great food.", "Cold and slow.", "Not bad at all."]
        >>> probabilities = np.array([[0.1, 0.9], [0.8, 0.2], [0.95, 0.05]])  # model.predict
        >>> rows, table = kt.worst_texts_table(reviews, probabilities, [1, 0, 1],
        ...                                    ["negative", "positive"])
        >>> print(table)
        index  true      predicted  confidence  text
        -----  --------  ---------  ----------  ---------------
        2      positive  negative   95.0%       Not bad at all.
    """
    probabilities = _probabilities(probabilities)
    if len(texts) != len(probabilities):
        raise DataError(f"Received {len(texts)} texts and {len(probabilities)} rows of "
                        "probabilities; expected one row per text.")
    names = _names(class_names, probabilities.shape[1])
    rows = [{"index": m.index, "text": str(texts[m.index]), "true": names[m.true],
             "predicted": names[m.predicted], "confidence": m.confidence}
            for m in worst_predictions(probabilities, y_true, k)]
    columns = ("index", "true", "predicted", "confidence", "text")
    cells = [[str(r["index"]), r["true"], r["predicted"], f"{r['confidence']:.1%}",
              _shorten(r["text"], width)] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    if not rows:
        lines.append("(no mistakes)")
    return rows, "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line: newlines and tabs would break the table
    return text if len(text) <= width else text[:width - 1] + "…"
