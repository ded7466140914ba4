"""distill.core.file_cache: values derived from files are reused only while the files keep their path, size and mtime,
and a cache that cannot be written changes nothing."""

import os

import numpy as np
import pytest
import torch

from distill.core import file_cache
from teachers.folders import file_hash


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(file_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_teacher_hash_is_reused_until_a_file_changes(tmp_path, cache):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"weights" * 1000)
    b.write_bytes(b"config")
    calls = []
    first = file_hash([a, b])
    assert len(list((cache / "values").iterdir())) == 1
    original = file_cache.cached_text

    def counting(paths, kind, compute):
        return original(paths, kind, lambda: calls.append(1) or compute())

    import teachers.folders as folders

    folders.cached_text = counting
    try:
        assert file_hash([a, b]) == first and calls == []  # read from the cache
        a.write_bytes(b"Weights" * 1000)  # same size, new content and mtime
        changed = file_hash([a, b])
        assert calls == [1] and changed != first
        os.utime(b, ns=(0, 10**18))  # only the mtime moves: recomputed, same value
        assert file_hash([a, b]) == changed and calls == [1, 1]
    finally:
        folders.cached_text = original


def test_an_unwritable_cache_computes_as_without_one(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setenv(file_cache.CACHE_ENV, str(blocker / "cache"))
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert file_cache.cached_text([f], "k", lambda: "v1") == "v1"
    out = file_cache.cached_arrays([f], "k", lambda: {"x": np.arange(3)})
    assert out["x"].tolist() == [0, 1, 2]


def test_a_damaged_cache_entry_is_recomputed(tmp_path, cache):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert file_cache.cached_arrays([f], "k", lambda: {"x": np.arange(4)})["x"].tolist() == [0, 1, 2, 3]
    (entry,) = (cache / "arrays").iterdir()
    entry.write_bytes(b"garbage")
    assert file_cache.cached_arrays([f], "k", lambda: {"x": np.arange(2)})["x"].tolist() == [0, 1]


def test_mnist16_from_the_cache_is_bit_identical_to_parsing(cache):
    from distill import data

    data._mnist16_all.cache_clear()
    parsed = data._mnist16_all()
    assert len(list((cache / "arrays").iterdir())) == 1
    data._mnist16_all.cache_clear()
    cached = data._mnist16_all()
    data._mnist16_all.cache_clear()
    assert torch.equal(parsed[0], cached[0]) and torch.equal(parsed[1], cached[1]) and parsed[1].dtype == cached[1].dtype
