"""Reading texts and their labels: lists of strings, CSV/TSV files, datasets.

Text is checked here (UTF-8, no empty strings, one label per text); the
labels stay as given until the head they are for reads them
(`data.labels_for_head`). The text backbone turns the texts into batches.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import numpy as np

from keras_transfer import backend
from keras_transfer.data import check_finite
from keras_transfer.errors import DataError


@dataclasses.dataclass
class TextSource:
    """Texts and their labels as read from a source, before any check against a head.

    Attributes:
        texts: list of str.
        labels: the labels as given (a list or array; strings when read from
            a file), or None.
    """

    texts: list
    labels: object = None


def read_text_file(path: str, text_column: str = "text", label_column: str | None = "label",
                   delimiter: str | None = None) -> TextSource:
    """Reads a CSV or TSV file with named text and label columns.

    Cells may be quoted and hold newlines; a UTF-8 byte-order mark is
    dropped. Labels stay strings here: the head they are for decides whether
    they are class names, class indices or numbers (`labels_for_head`).

    Args:
        path: str. A `.csv` or `.tsv` file with a header row (the delimiter
            is guessed from the extension unless given).
        text_column: str. Name of the column holding the texts.
        label_column: str or None. Name of the label column (None for
            unlabelled text).
        delimiter: str, optional. Field separator.

    Returns:
        A `TextSource`.
    """
    if not os.path.isfile(path):
        raise DataError(f"Received text file {path!r}, which does not exist.")
    delimiter = delimiter or ("\t" if path.lower().endswith((".tsv", ".tab")) else ",")
    text = read_utf8(path)
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    if not rows:
        raise DataError(f"{path!r} has a header but no rows, or is empty.")
    columns = [c for c in rows[0].keys() if c is not None]
    for column in (text_column, label_column):
        if column is not None and column not in columns:
            raise DataError(f"{path!r} has no column {column!r}; its columns are {columns}. "
                            "Pass text_column= and label_column= to pick them.")
    short = [i + 2 for i, row in enumerate(rows) if None in row.values()]
    if short:
        raise DataError(f"{path!r} has rows with fewer fields than its header, at lines "
                        f"{short[:10]} (counting the header as line 1); fill them in.")
    # DictReader puts the fields beyond the header under the key None.
    long = [i + 2 for i, row in enumerate(rows) if None in row]
    if long:
        raise DataError(f"{path!r} has rows with more fields than its header ({len(columns)}), "
                        f"at lines {long[:10]} (counting the header as line 1); quote fields "
                        "that hold the delimiter, or remove the extra fields.")
    texts = [row[text_column] for row in rows]
    if label_column is None:
        return TextSource(texts)
    return TextSource(texts, [row[label_column] for row in rows])


def read_utf8(path: str) -> str:
    """Reads a text file, naming the first line that is not UTF-8; drops a BOM.

    Args:
        path: str. The file.

    Returns:
        Its text, line endings as they are.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path!r} is not valid UTF-8 at line {line} (byte {error.start}: "
            f"{raw[max(error.start - 10, 0):error.start + 10]!r}). Re-save the file as UTF-8."
        ) from error


def read_utf8_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, without line endings (see `read_utf8`)."""
    return read_utf8(path).splitlines()


def as_text_source(x, y=None, *, text_column="text",
                   label_column="label"):
    """Wraps a list of strings, a CSV/TSV path or a dataset of strings.

    Returns:
        A `TextSource` for lists and files, or the `tf.data.Dataset` as is.
    """
    if backend.is_tf_dataset(x):
        if y is not None:
            raise DataError("Received a tf.data.Dataset and separate labels y; "
                            "put the labels in the dataset as (text, label) pairs.")
        check_finite(x)
        spec = x.element_spec
        if isinstance(spec, tuple) and getattr(spec[1], "dtype", None) is not None \
                and spec[1].dtype.name == "string":
            raise DataError("Received a tf.data.Dataset with string labels; expected class "
                            "indices or numbers. Pass lists (texts, labels), where class "
                            "names are mapped for you, or map the names to indices first.")
        return x
    if isinstance(x, (str, os.PathLike)):
        if isinstance(x, str) and not os.path.isfile(x):
            raise DataError(
                f"Received the string {x[:60]!r}, which is not an existing CSV/TSV file. "
                f"Texts are given as a list: [{x[:30]!r}, ...] (one text: a list of one).")
        if y is not None:
            raise DataError("Received labels y together with a file; the labels come "
                            "from its label column. Drop y or pass a list of texts.")
        source = read_text_file(os.fspath(x), text_column, label_column)
    else:
        if isinstance(x, np.ndarray):
            x = x.tolist()
        if not isinstance(x, (list, tuple)):
            raise DataError(f"Received texts of type {type(x).__name__}; expected a list "
                            "of strings, a CSV/TSV path or a tf.data.Dataset.")
        source = TextSource([_decode(t) for t in x], y)
    if not source.texts:
        raise DataError("Received no texts: the list is empty.")
    not_str = [i for i, t in enumerate(source.texts) if not isinstance(t, str)]
    if not_str:
        raise DataError(f"Received non-string texts at positions {not_str[:10]}.")
    unencodable = [i for i, t in enumerate(source.texts) if not _is_utf8(t)]
    if unencodable:
        raise DataError(
            f"Received texts that cannot be written as UTF-8 (a lone surrogate such as "
            f"'\\ud800', often half of an emoji cut in two) at positions {unencodable[:10]}. "
            "Fix them, or drop the broken characters: "
            "text.encode('utf-8', 'replace').decode('utf-8').")
    empty = [i for i, t in enumerate(source.texts) if not t.strip()]
    if empty:
        raise DataError(f"Received {len(empty)} empty strings, at positions {empty[:10]}. "
                        "Remove them or give them some text.")
    if source.labels is not None and len(source.labels) != len(source.texts):
        raise DataError(f"Received {len(source.texts)} texts but {len(source.labels)} "
                        "labels; expected one label per text.")
    return source


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _decode(text):
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"Received a bytes text that is not UTF-8 ({text[:40]!r}); "
                            "decode it to str first.") from error
    return text
