"""Checkpoint validation (manifest with a file list, fallback to the newest valid one) and rotation."""

import json

import pytest

from distill.engine.checkpoint import (
    MANIFEST,
    checkpoint_problem,
    complete_checkpoints,
    latest_checkpoint,
    latest_valid_checkpoint,
    save_checkpoint,
    skipped_messages,
)


def _write(step):
    def write(folder):
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * (step + 1))
        (folder / "sub").mkdir()
        (folder / "sub" / "state.pkl").write_bytes(b"state %d" % step)
    return write


def _save(root, step, keep=5):
    return save_checkpoint(root, step, _write(step), {"kind": "test"}, keep=keep)


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    folder = _save(tmp_path, 3)
    files = {f["path"]: f for f in json.loads((folder / MANIFEST).read_text())["files"]}
    assert set(files) == {"model.safetensors", "sub/state.pkl"}
    assert files["model.safetensors"]["size"] == 256 * 4 and len(files["sub/state.pkl"]["sha256"]) == 64
    assert checkpoint_problem(folder) is None and latest_checkpoint(tmp_path) == folder


def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _corrupt(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[7] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    (lambda f: (f / MANIFEST).write_text("garbage{"), "manifest.json is empty or not valid JSON"),
    (lambda f: (f / MANIFEST).write_text(""), "manifest.json is empty"),
    (lambda f: (f / MANIFEST).write_text("[1, 2]"), "has no integer 'step'"),
    (lambda f: (f / MANIFEST).unlink(), "no manifest.json"),
    (lambda f: (f / "sub" / "state.pkl").unlink(), "sub/state.pkl is missing"),
    (_truncate, "model.safetensors has 100 bytes, its manifest records 768 (truncated"),
    (_corrupt, "model.safetensors does not match the sha256"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_with_the_reason(tmp_path, damage, reason):
    previous, newest = _save(tmp_path, 1), _save(tmp_path, 2)
    damage(newest)
    found, skipped = latest_valid_checkpoint(tmp_path)
    assert found == previous and latest_checkpoint(tmp_path) == previous
    assert [path for path, _ in skipped] == [newest] and reason in skipped[0][1]
    assert skipped_messages(skipped) == [f"note: skipped checkpoint {str(newest)!r}: {skipped[0][1]}"]


def test_every_checkpoint_damaged_gives_none_and_lists_them_all(tmp_path):
    for step in (1, 2):
        (_save(tmp_path, step) / MANIFEST).write_text("")
    found, skipped = latest_valid_checkpoint(tmp_path)
    assert found is None and [p.name for p, _ in skipped] == ["step-2", "step-1"]


def test_a_manifest_from_before_file_lists_is_valid_when_it_parses(tmp_path):
    folder = tmp_path / "step-7"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"step": 7, "kind": "distill"}))
    assert latest_valid_checkpoint(tmp_path) == (folder, [])


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """A fresh low-step run writing into a folder that holds an older run's higher-step checkpoints."""
    for step in (100, 200):
        _save(tmp_path, step, keep=2)
    assert _save(tmp_path, 10, keep=2).is_dir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-10", "step-100", "step-200"]
    assert _save(tmp_path, 20, keep=2).is_dir()  # the newest two by step, and the one just written
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-20", "step-100", "step-200"]


def test_rotation_keeps_the_newest_by_step(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-3", "step-4"]
