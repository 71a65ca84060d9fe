"""The feature cache's folder: size limit, least-recently-used eviction, locks, list and clear."""

import logging
import os
import time

import pytest

from keras_transfer import cache_store
from keras_transfer import feature_cache as features
from keras_transfer.cli import main
from processes import child_env, start, stop, tail
from test_features import images, tiny_model


@pytest.fixture
def root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(features.CACHE_ENV_VAR, str(root))
    monkeypatch.delenv(cache_store.MAX_ENV_VAR, raising=False)
    return str(root)


def extract(model, seed, n=24):
    """One entry per seed (the data differ); the returned cache is closed (not in use)."""
    x, y = images(n, seed=seed)
    cache = features.extract_features(model, x, y, batch_size=8)
    cache.close()
    return cache


def published(root):
    return [e.name for e in cache_store.list_entries(root)]


def test_the_cache_never_grows_past_its_limit_and_says_what_it_removes(root, monkeypatch,
                                                                       caplog):
    model = tiny_model()
    size = cache_store.folder_bytes(extract(model, 0).path)
    limit = int(2.5 * size)  # room for two entries
    monkeypatch.setenv(cache_store.MAX_ENV_VAR, str(limit))
    paths = []
    with caplog.at_level(logging.INFO, logger="keras_transfer"):
        for seed in range(1, 6):
            paths.append(extract(model, seed).path)
            assert cache_store.folder_bytes(root) <= limit
            assert os.path.basename(paths[-1]) in published(root)  # the new one is kept
    assert sorted(published(root)) == sorted(os.path.basename(p) for p in paths[-2:])
    assert caplog.text.count("Feature cache: removed") == 4
    assert "least recently used" in caplog.text and cache_store.MAX_ENV_VAR in caplog.text


def test_least_recently_used_entries_are_removed_first(root, monkeypatch):
    model = tiny_model()
    a, b, c = (extract(model, seed) for seed in range(3))
    time.sleep(0.02)
    reused = extract(model, 0)  # using A again makes B the least recently used
    assert reused.reused and reused.path == a.path
    monkeypatch.setenv(cache_store.MAX_ENV_VAR, str(3 * cache_store.folder_bytes(a.path) + 100))
    d = extract(model, 3)
    assert sorted(published(root)) == sorted(os.path.basename(p.path) for p in (a, c, d))
    # Listed least recently used first.
    assert published(root)[-2:] == [os.path.basename(a.path), os.path.basename(d.path)]


def test_an_entry_in_use_in_this_process_is_kept_over_the_limit(root, monkeypatch, caplog):
    model = tiny_model()
    x, y = images(24, seed=0)
    held = features.extract_features(model, x, y, batch_size=8)  # alive: in use
    monkeypatch.setenv(cache_store.MAX_ENV_VAR, "1")
    with caplog.at_level(logging.WARNING, logger="keras_transfer"):
        extract(model, 1)
    assert os.path.basename(held.path) in published(root)
    assert "over its limit" in caplog.text and "1 entry in use" in caplog.text
    features_before = held.load()[0]
    held.close()
    extract(model, 2)  # no longer in use: removed with the other one
    assert os.path.basename(held.path) not in published(root)
    assert features_before.shape == (24, 3, 3, 6)


HOLD = """
import sys, time
from keras_transfer import cache_store
lock = cache_store.open_entry(sys.argv[1])
open(sys.argv[2], "w").close()
time.sleep(300)
"""


def test_an_entry_read_by_another_process_is_never_removed(root, tmp_path, monkeypatch,
                                                           capsys):
    model = tiny_model()
    held, other = extract(model, 0), extract(model, 1)
    ready = tmp_path / "ready"
    env = child_env(tmp_path, lifetime=300, KERAS_BACKEND="numpy")  # a quick import
    child = start(["-c", HOLD, held.path, ready], env, tmp_path / "child.log", script=None)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), tail(tmp_path / "child.log")
        assert cache_store.in_use(held.path) and not cache_store.in_use(other.path)
        monkeypatch.setenv(cache_store.MAX_ENV_VAR, "0")
        assert cache_store.make_room(root) == [other.path]  # the one in use is skipped
        extract(model, 2)
        assert main(["cache", "clear"]) == 0
        out = capsys.readouterr().out
        assert f"Skipped {os.path.basename(held.path)}: in use" in out
        assert published(root) == [os.path.basename(held.path)]
        features.find_cache(held.key, root).verify()  # whole, and still readable
    finally:
        stop(child)
    assert main(["cache", "clear"]) == 0  # the reader is gone: now it goes
    assert published(root) == [] and os.listdir(root) == []


def test_cache_list_and_clear_by_pattern_and_age(root, capsys):
    model = tiny_model()
    old, new = extract(model, 0), extract(model, 1)
    week_ago = time.time() - 8 * 86400
    os.utime(os.path.join(old.path, cache_store.LAST_USED), (week_ago, week_ago))

    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert f"Feature cache {root}: 2 entries" in out and "of 10.0 GiB" in out
    assert out.index(os.path.basename(new.path)) < out.index(os.path.basename(old.path))
    assert "24 x (3, 3, 6)" in out

    assert main(["cache", "clear", "--pattern", "resnet*"]) == 0
    assert "Removed 0 entries" in capsys.readouterr().out and len(published(root)) == 2
    assert main(["cache", "clear", "--older-than", "7d"]) == 0
    assert "Removed 1 entry" in capsys.readouterr().out
    assert published(root) == [os.path.basename(new.path)]
    assert main(["cache", "clear", "--pattern", "custom*", "--cache-dir", root]) == 0
    assert published(root) == []


def test_a_half_written_entry_is_neither_listed_nor_removed_while_it_is_written(root):
    temporary, lock = cache_store.new_temporary(root, "custom-abc")
    try:
        assert published(root) == []
        cache_store.clear(root)
        assert os.path.isdir(temporary)  # its process (this one) is alive
    finally:
        lock.close()


def test_bad_limits_and_ages_say_what_was_received(root, monkeypatch, capsys):
    assert cache_store.parse_size("2GiB") == 2 * 1024 ** 3
    assert cache_store.parse_size("1.5 kb") == 1500
    monkeypatch.setenv(cache_store.MAX_ENV_VAR, "lots")
    with pytest.raises(cache_store.CacheLimitError, match="'lots'.*KERAS_TRANSFER_CACHE_MAX"):
        features.extract_features(tiny_model(), *images(8))
    assert not os.path.exists(root)  # nothing written
    monkeypatch.setenv(cache_store.MAX_ENV_VAR, "none")
    assert cache_store.cache_limit() is None
    with pytest.raises(SystemExit):
        main(["cache", "clear", "--older-than", "soon"])
    assert "'soon'" in capsys.readouterr().err
