"""Writing feature shards: `.npy` files filled in place, hashed as they are written.

The feature cache (`feature_cache.py`) extracts a backbone's features batch by
batch; `ShardWriter` puts each batch into shards of a fixed number of rows,
created at their final size with `np.lib.format.open_memmap` (the row count is
known from the first pass), so memory holds one batch whatever the data size.
Each shard's sha256 goes into the cache's manifest and is checked on reuse.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from keras_transfer.errors import DataError

# Shards of about this size when the caller gives no `shard_size`.
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024


class ShardWriter:
    """Writes `(features, labels)` rows into `.npy` shards of `shard_size` rows.

    The number of rows is known before extraction (the fingerprint pass
    counted them), so each shard is created at its final size with
    `np.lib.format.open_memmap` and filled in place; memory holds one batch.
    The data part of every file is hashed as it is written.
    """

    def __init__(self, folder: str, total: int, shard_size: int | None, copy: int):
        self.folder = folder
        self.total = total
        self.shard_size = shard_size
        self.copy = copy
        self.written = 0
        self.shards: list[dict] = []
        self._open = None  # [(memmap, sha256, file name), ...] for features and labels
        self._row = 0

    def _name(self, kind: str) -> str:
        prefix = f"copy{self.copy:02d}-" if self.copy else ""
        return f"{prefix}{kind}-{len(self.shards):05d}.npy"

    def write(self, features: np.ndarray, labels: np.ndarray) -> None:
        if self.shard_size is None:  # decided by the first batch: about DEFAULT_SHARD_BYTES
            self.shard_size = max(1, DEFAULT_SHARD_BYTES // max(features[0].nbytes, 1))
        if self.written + len(features) > self.total:
            raise DataError(
                f"The data yielded more than the {self.total:,} examples counted on the "
                "first pass: it changes between passes. Give data that yields the same "
                "examples on every pass.")
        start = 0
        while start < len(features):
            if self._open is None:
                rows = min(self.shard_size, self.total - self.written)
                self._open = [self._create(kind, rows, part) for kind, part in
                              (("features", features), ("labels", labels))]
                self._row = 0
            rows = len(self._open[0][0])
            take = min(rows - self._row, len(features) - start)
            for (array, sha, _), part in zip(self._open, (features, labels)):
                block = np.ascontiguousarray(part[start:start + take], dtype=array.dtype)
                if block.shape[1:] != array.shape[1:]:
                    raise DataError(
                        f"Received a batch of shape {block.shape[1:]} where earlier batches "
                        f"had {array.shape[1:]}; features must have one shape. Give the "
                        "model inputs of one size.")
                array[self._row:self._row + take] = block
                sha.update(block.tobytes())
            self._row += take
            self.written += take
            start += take
            if self._row == rows:
                self._close_shard()

    def _create(self, kind, rows, part):
        name = self._name(kind)
        dtype = np.dtype(part.dtype).newbyteorder("<")
        array = np.lib.format.open_memmap(os.path.join(self.folder, name), mode="w+",
                                          dtype=dtype, shape=(rows, *part.shape[1:]))
        return array, hashlib.sha256(), name

    def _close_shard(self) -> None:
        parts = {}
        for kind, (array, sha, name) in zip(("features", "labels"), self._open):
            array.flush()
            parts[kind] = {"file": name, "count": len(array), "header_bytes": int(array.offset),
                           "bytes": os.path.getsize(os.path.join(self.folder, name)),
                           "sha256": sha.hexdigest()}
            del array
        self._open = None
        self.shards.append({"copy": self.copy, "count": parts["features"]["count"], **parts})

    def finish(self) -> list[dict]:
        if self._open is not None or self.written != self.total:
            raise DataError(
                f"The data yielded {self.written:,} examples where the first pass counted "
                f"{self.total:,}: it changes between passes. Give data that yields the same "
                "examples on every pass.")
        return self.shards
