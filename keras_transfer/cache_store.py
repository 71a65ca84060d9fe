"""The feature cache's folder: publishing entries, locks, last use, the size limit, list, clear.

`feature_cache` extracts features and reads them back; this module owns what
happens to the entries on disk, whatever they hold::

    <root>/<backbone>-<key digest>/     one entry
        manifest.json                   written last: key parts, shards, checksums
        features-00000.npy, ...
        .lock                           shared-locked by every process reading the entry
        .last_used                      touched whenever the entry is opened (its mtime)
    <root>/.tmp-<name>-<id>/            an extraction in progress
    <root>/.trash-<name>-<id>/          an entry being removed

Publishing is atomic: an entry is written in a `.tmp-` folder and renamed into
place once its manifest is complete, so a half-written entry never has a
final name; temporaries of processes that are gone are removed by the next
extraction.

The cache is kept under a size limit, `KERAS_TRANSFER_CACHE_MAX` (bytes, or a
number with a unit: "500MB", "2GiB"; "none" for no limit), 10 GiB by default,
like pip's and Hugging Face's caches. After every extraction the least
recently used entries are removed until the cache fits. An entry in use is
never removed: a process reading an entry holds a shared `fcntl.flock` on its
`.lock` file (for as long as its `FeatureCache` lives); removal takes the
exclusive lock without waiting, skips the entry when it cannot, and renames
the entry away before deleting it, so no reader ever sees half of one. Each
removal is logged to the `keras_transfer` logger.

`keras-transfer cache list` lists the entries; `keras-transfer cache clear`
removes them (all, or those matching `--pattern` or `--older-than`), skipping
and naming the ones in use.

Example:
    >>> from keras_transfer import cache_store
    >>> cache_store.parse_size("2GiB"), cache_store.parse_size("500 MB")
    (2147483648, 500000000)
    >>> [entry.name for entry in cache_store.list_entries("/tmp/no-cache-here")]
    []
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid

from keras_transfer.errors import DataError, KerasTransferError

logger = logging.getLogger("keras_transfer")

CACHE_ENV_VAR = "KERAS_TRANSFER_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "keras_transfer", "features")
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
LAST_USED = ".last_used"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
MAX_ENV_VAR = "KERAS_TRANSFER_CACHE_MAX"
DEFAULT_MAX_BYTES = 10 * 1024 ** 3
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6,
          "g": 10 ** 9, "gb": 10 ** 9, "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10,
          "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CacheLimitError(KerasTransferError, ValueError):
    """A cache size limit (`KERAS_TRANSFER_CACHE_MAX`) or age that cannot be read."""


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The root folder of feature caches.

    Args:
        cache_dir: str, optional. Wins when given.

    Returns:
        `cache_dir`, else `$KERAS_TRANSFER_CACHE`, else
        `~/.cache/keras_transfer/features`, with `~` expanded.
    """
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV_VAR)
    return os.path.abspath(os.path.expanduser(os.fspath(root or DEFAULT_CACHE_DIR)))


# ------------------------------------------------------------- the limit
def parse_size(text) -> int:
    """Bytes from an int or a text such as `"10GB"`, `"2 GiB"`, `"500000"`.

    Args:
        text: int, or str: a number and an optional unit (B, KB, MB, GB, TB
            in powers of 1000; KiB, MiB, GiB, TiB in powers of 1024).

    Returns:
        The number of bytes, an int >= 0.

    Raises:
        CacheLimitError: naming what was received.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise CacheLimitError(
            f"Received a cache size of {text!r}; expected a number of bytes or a number "
            "with a unit, e.g. 500MB, 2GiB or 10GB (or 'none' for no limit).")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def cache_limit() -> int | None:
    """The cache's size limit in bytes: `$KERAS_TRANSFER_CACHE_MAX`, else 10 GiB; None: no limit."""
    value = os.environ.get(MAX_ENV_VAR, "").strip()
    if not value:
        return DEFAULT_MAX_BYTES
    if value.lower() in ("none", "unlimited", "inf"):
        return None
    try:
        return parse_size(value)
    except CacheLimitError as error:
        raise CacheLimitError(f"{error} (from ${MAX_ENV_VAR})") from None


def parse_age(text: str) -> float:
    """Seconds from an age such as `"7d"`, `"12h"`, `"30m"`, `"90s"` or `"2w"`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw]?)\s*", str(text))
    if not match:
        raise CacheLimitError(f"Received an age of {text!r}; expected a number with a unit "
                              "s, m, h, d or w, e.g. 7d or 12h.")
    return float(match.group(1)) * _AGE_UNITS[match.group(2) or "s"]


def format_size(size: float) -> str:
    """`1536` -> `"1.5 KiB"`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""  # pragma: no cover


# ------------------------------------------------------- locks and use
def open_entry(path: str):
    """Takes the shared lock of the entry at `path` and records its use.

    The lock is held until the returned file is closed (or garbage
    collected); removal skips an entry while anyone holds it.

    Returns:
        The open lock file, or None when the entry is gone (removed while
        this process waited for its lock).
    """
    try:
        lock = open(os.path.join(path, LOCK_FILE), "a")  # noqa: SIM115 - held by the caller
    except FileNotFoundError:
        return None
    except OSError:  # a read-only cache: nobody can remove its entries either
        return _NoLock()
    fcntl.flock(lock, fcntl.LOCK_SH)  # waits only while a removal holds it
    try:
        same = os.stat(os.path.join(path, LOCK_FILE)).st_ino == os.fstat(lock.fileno()).st_ino
    except OSError:
        same = False
    if not same:
        lock.close()  # removed (renamed away) while we waited
        return None
    touch(path)
    return lock


class _NoLock:
    def close(self) -> None:
        pass


def touch(path: str) -> None:
    """Records that the entry at `path` was used now."""
    try:
        with open(os.path.join(path, LAST_USED), "a"):
            pass
        os.utime(os.path.join(path, LAST_USED))
    except OSError:  # a read-only cache can still be read
        pass


def last_used(path: str) -> float:
    """When the entry was last opened (its manifest's time for entries never opened)."""
    for name in (LAST_USED, MANIFEST, ""):
        try:
            return os.path.getmtime(os.path.join(path, name))
        except OSError:
            continue
    return 0.0


def remove_entry(path: str, why: str, damaged: bool = False) -> bool:
    """Removes the entry at `path` unless a process has it open.

    Args:
        path: str. The entry's folder.
        why: str. Said in the log line.
        damaged: bool. An entry that cannot be used: even when in use it is
            renamed away (its readers keep their open files), and deleted
            once nobody holds it.

    Returns:
        True when removed (or renamed away), False when in use (or gone).
    """
    try:
        lock = open(os.path.join(path, LOCK_FILE), "a")  # noqa: SIM115
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = False
        except BlockingIOError:
            if not damaged:
                return False
            busy = True
        size = folder_bytes(path)
        root, name = os.path.split(path)
        trash = os.path.join(root, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)  # readers never see half an entry
        except OSError:
            return False
    if not busy:
        shutil.rmtree(trash, ignore_errors=True)
    logger.info("Feature cache: removed %s (%s) %s.", path, format_size(size), why)
    return True


def in_use(path: str) -> bool:
    """Whether a process holds the entry at `path` open right now."""
    try:
        with open(os.path.join(path, LOCK_FILE), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def folder_bytes(path: str) -> int:
    """Bytes of the files in a folder and its subfolders."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


# --------------------------------------------------- listing, the limit
@dataclasses.dataclass
class Entry:
    """One cache entry, as `list_entries` sees it."""

    name: str
    path: str
    bytes: int
    last_used: float
    manifest: dict | None

    @property
    def backbone(self) -> str:
        return (self.manifest or {}).get("backbone_name", "?")


def list_entries(root: str) -> list[Entry]:
    """The published entries under `root`, least recently used first."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as file:
                manifest = json.load(file)
        except (OSError, ValueError):
            manifest = None
        found.append(Entry(name, path, folder_bytes(path), last_used(path), manifest))
    return sorted(found, key=lambda e: (e.last_used, e.name))


def make_room(root: str, needed: int = 0, keep=(), limit: int | None | str = "env") -> list[str]:
    """Removes least recently used entries until the cache and `needed` bytes fit the limit.

    Args:
        root: str. The cache root.
        needed: int. Bytes about to be written.
        keep: paths never removed (the entry just written).
        limit: int bytes, None for no limit, or "env": `cache_limit()`.

    Returns:
        The paths removed. Entries in use are skipped; the cache can stay
        over the limit only while they are.
    """
    limit = cache_limit() if limit == "env" else limit
    if limit is None:
        return []
    entries = list_entries(root)
    temporaries = sum(folder_bytes(os.path.join(root, n)) for n in _names(root, TMP_PREFIX))
    total = sum(e.bytes for e in entries) + temporaries + needed
    removed, busy = [], []
    keep = {os.path.abspath(p) for p in keep}
    for entry in entries:
        if total <= limit:
            break
        if os.path.abspath(entry.path) in keep:
            continue
        if remove_entry(entry.path, f"as the least recently used, to keep the cache under "
                                    f"{format_size(limit)} (${MAX_ENV_VAR})"):
            total -= entry.bytes
            removed.append(entry.path)
        else:
            busy.append(entry.name)
    if total > limit:
        logger.warning(
            "Feature cache: %s under %s is over its limit of %s%s. Raise $%s or run "
            "`keras-transfer cache clear`.", format_size(total), root, format_size(limit),
            f" ({len(busy)} entr{'y' if len(busy) == 1 else 'ies'} in use)" if busy else "",
            MAX_ENV_VAR)
    return removed


def clear(root: str, pattern: str | None = None, older_than: float | None = None
          ) -> tuple[list[Entry], list[Entry]]:
    """Removes entries (all, or matching `pattern` / unused for `older_than` seconds).

    Args:
        root: str. The cache root.
        pattern: str, optional. Shell pattern on the entry's name or backbone.
        older_than: float, optional. Only entries last used this many seconds ago or more.

    Returns:
        `(removed, skipped because in use)`.
    """
    removed, skipped = [], []
    now = time.time()
    for entry in list_entries(root):
        if pattern and not (fnmatch.fnmatch(entry.name, pattern)
                            or fnmatch.fnmatch(entry.backbone, pattern)):
            continue
        if older_than is not None and now - entry.last_used < older_than:
            continue
        (removed if remove_entry(entry.path, "by keras-transfer cache clear")
         else skipped).append(entry)
    remove_stale_temporaries(root)
    return removed, skipped


# -------------------------------------------------- publishing entries
def check_complete(path: str, key: dict, version: int) -> tuple[dict | None, str]:
    """Reads an entry's manifest: `(manifest, "")` or `(None, why not)`."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as file:
            manifest = json.load(file)
    except FileNotFoundError:
        return None, "it has no manifest (an extraction did not finish)"
    except (OSError, ValueError) as error:
        return None, f"its manifest cannot be read ({error})"
    if manifest.get("format") != version or not manifest.get("complete"):
        return None, "its manifest is incomplete or of another format"
    if manifest.get("key") != key:
        return None, "its key differs"
    for shard in manifest.get("shards", []):
        for part in (shard["features"], shard["labels"]):
            file = os.path.join(path, part["file"])
            if not os.path.isfile(file) or os.path.getsize(file) != part["bytes"]:
                return None, f"the shard {part['file']} is missing or has the wrong size"
    return manifest, ""


def verify_shards(path: str, manifest: dict) -> None:
    """Checks every shard of an entry against the checksums of its manifest.

    Raises:
        DataError: naming the first shard that differs.
    """
    for shard in manifest["shards"]:
        for part in (shard["features"], shard["labels"]):
            file_path = os.path.join(path, part["file"])
            h = hashlib.sha256()
            with open(file_path, "rb") as file:
                file.seek(part["header_bytes"])
                for block in iter(lambda: file.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != part["sha256"]:
                raise DataError(
                    f"The feature cache shard {file_path} does not match its checksum: "
                    f"it was changed or damaged. Delete {path} and run again.")


def is_sound(path: str, key: dict, version: int) -> bool:
    """Whether the entry at `path` is complete, has `key` and matches its checksums."""
    manifest, _ = check_complete(path, key, version)
    if manifest is None:
        return False
    try:
        verify_shards(path, manifest)
    except DataError:
        return False
    return True


def new_temporary(root: str, name: str):
    """Creates `<root>/.tmp-<name>-<id>` for an extraction: `(its path, its held lock)`.

    The lock taken here moves with the folder when it is published, so the
    new entry is in use (never removed) from its first moment.
    """
    temporary = os.path.join(root, f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(temporary)
    with open(os.path.join(temporary, "owner.json"), "w", encoding="utf-8") as file:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, file)
    return temporary, open_entry(temporary)


def write_manifest(folder: str, manifest: dict) -> None:
    """Writes `manifest.json` last, in one step (a partial file is never read)."""
    partial = os.path.join(folder, MANIFEST + ".partial")
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(manifest, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, os.path.join(folder, MANIFEST))
    os.remove(os.path.join(folder, "owner.json"))


def move_into_place(temporary: str, final: str, key: dict, version: int) -> str:
    """Renames the finished temporary folder to `final` in one step."""
    if os.path.isdir(final):
        if is_sound(final, key, version):  # another process finished the same entry first
            shutil.rmtree(temporary, ignore_errors=True)
            return final
        remove_entry(final, "to replace it (incomplete or damaged)", damaged=True)
    try:
        os.rename(temporary, final)
    except OSError:
        if not is_sound(final, key, version):
            raise
        shutil.rmtree(temporary, ignore_errors=True)  # lost a race to an identical entry
    return final


def _names(root: str, prefix: str) -> list[str]:
    try:
        return [n for n in os.listdir(root) if n.startswith(prefix)]
    except OSError:
        return []


def remove_stale_temporaries(root: str, max_age_s: float = 24 * 3600) -> None:
    """Removes the temporaries of extractions whose process is gone, and left trash."""
    host = socket.gethostname()
    for entry in _names(root, TRASH_PREFIX):  # killed half-way, or damaged and in use
        if not in_use(os.path.join(root, entry)):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    for entry in _names(root, TMP_PREFIX):
        path = os.path.join(root, entry)
        try:
            with open(os.path.join(path, "owner.json"), encoding="utf-8") as file:
                owner = json.load(file)
            alive = owner["host"] != host or _pid_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError):
            alive = True  # being created right now, or unreadable: judge by age
        try:
            old = time.time() - os.path.getmtime(path) > max_age_s
        except OSError:
            continue
        if not alive or old:
            logger.info("Removing the unfinished feature cache %s (its process is gone).", path)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------ keras-transfer cache
def add_cache_command(command) -> None:
    """Adds `keras-transfer cache list|clear` through cli's `command(name, help, run)`."""
    p = command("cache", "list or clear the feature cache", run_cache_command)
    p.add_argument("action", choices=["list", "clear"],
                   help="list: the entries, most recently used first, their size and whether "
                        "a process uses them; clear: remove entries not in use")
    p.add_argument("--cache-dir", metavar="FOLDER",
                   help="the cache root (default: $KERAS_TRANSFER_CACHE, else "
                        "~/.cache/keras_transfer/features)")
    p.add_argument("--pattern", help="clear: only entries whose name or backbone match this "
                                     "shell pattern, e.g. 'resnet*' (default: all)")
    p.add_argument("--older-than", metavar="AGE", type=_age_argument,
                   help="clear: only entries unused for this long, e.g. 7d, 12h (default: "
                        "any age)")


def _age_argument(text: str) -> float:
    try:
        return parse_age(text)
    except CacheLimitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_cache_command(args) -> int:
    """`keras-transfer cache list|clear`: prints what is there, or what was removed."""
    root = default_cache_dir(args.cache_dir)
    limit = cache_limit()
    if args.action == "clear":
        removed, skipped = clear(root, args.pattern, args.older_than)
        freed = sum(e.bytes for e in removed)
        print(f"Removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} "
              f"({format_size(freed)}) from {root}.")
        for entry in skipped:
            print(f"Skipped {entry.name}: in use by another process; run again when it ends.")
        return 0
    entries = list_entries(root)
    print(f"Feature cache {root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
          f"{format_size(sum(e.bytes for e in entries))} of "
          f"{'no limit' if limit is None else format_size(limit)} (${MAX_ENV_VAR}).")
    for entry in reversed(entries):  # most recently used first
        manifest = entry.manifest or {}
        rows = (f"{manifest['num_examples']:,} x {tuple(manifest['feature_shape'])}"
                if manifest else "incomplete")
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        print(f"  {entry.name:44} {rows:28} {format_size(entry.bytes):>10}  last used "
              f"{used}{'  (in use)' if in_use(entry.path) else ''}")
    return 0
