"""Personal-state store (fedlora_flwr.store, DESIGN.md §1): atomic per-client safetensors files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedlora_flwr.store import PersonalStateStore, StateError

FILENAME = "personal.safetensors"


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.lora_A": torch.randn(12, 9, generator=g),
        "conv1.lora_B": torch.randn(6, 12, generator=g).to(torch.float64),
        "fc.lora_B": torch.randn(4, 3, generator=g).to(torch.float16),
        "fc.weight.T": torch.randn(3, 5, generator=g).t(),  # non-contiguous view
        "bn1.num_batches_tracked": torch.tensor(17, dtype=torch.int64),  # 0-d integer buffer
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
    }


def _files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_round_trip_is_exact(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora")
    tensors = _tensors()
    path = store.save(3, tensors)
    loaded = store.load(3, expected=tensors)
    assert loaded is not None and set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key
    assert path == tmp_path / "3" / FILENAME == store.path(3)
    assert FILENAME == "personal.safetensors"
    assert store.exists(3) and not store.exists(4)


def test_file_location_and_no_temp_files_left(tmp_path):
    store = PersonalStateStore(tmp_path / "clients", "fedlora")
    store.save(0, _tensors(0))
    store.save(0, _tensors(1))  # overwrite
    store.save(12, _tensors(2))
    assert _files(tmp_path / "clients") == ["0", "12"]
    assert _files(tmp_path / "clients" / "0") == [FILENAME]
    assert _files(tmp_path / "clients" / "12") == [FILENAME]
    loaded = store.load(0, expected=_tensors(1))
    assert torch.equal(loaded["conv1.lora_A"], _tensors(1)["conv1.lora_A"]), "the second save wins"


def test_save_copies_the_values(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora")
    tensors = _tensors()
    reference = {key: value.clone() for key, value in tensors.items()}
    store.save(0, tensors)
    tensors["conv1.lora_A"].add_(1.0)  # mutating the live tensor after saving
    loaded = store.load(0, expected=reference)
    assert torch.equal(loaded["conv1.lora_A"], reference["conv1.lora_A"])


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    store = PersonalStateStore(tmp_path, "fedlora")
    old = _tensors(0)
    path = store.save(1, old)
    old_bytes = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="injected"):
        store.save(1, _tensors(5))
    monkeypatch.undo()

    assert path.read_bytes() == old_bytes
    assert _files(path.parent) == [FILENAME], "the temporary file must be removed"
    loaded = store.load(1, expected=old)
    assert all(torch.equal(loaded[key], old[key]) for key in old)


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    store = PersonalStateStore(tmp_path, "fedlora")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("injected")))
    with pytest.raises(OSError):
        store.save(2, _tensors())
    monkeypatch.undo()
    assert not store.exists(2)
    assert store.load(2, expected=_tensors()) is None
    assert not any(store.path(2).parent.iterdir())


def test_missing_file_is_none(tmp_path):
    store = PersonalStateStore(tmp_path / "never-created", "fedlora")
    assert store.load(0, expected=_tensors()) is None
    assert not (tmp_path / "never-created").exists(), "loading must not create folders"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_raises_state_error_naming_the_path(tmp_path, damage):
    store = PersonalStateStore(tmp_path, "fedlora")
    path = store.save(0, _tensors())
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not a safetensors file" * 3, "empty": b""}[damage])
    with pytest.raises(StateError) as info:
        store.load(0, expected=_tensors())
    assert str(path) in str(info.value)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    """Same length, valid header, one data byte changed: safetensors alone would load it."""
    store = PersonalStateStore(tmp_path, "fedlora")
    path = store.save(0, _tensors())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="checksum") as info:
        store.load(0, expected=_tensors())
    assert str(path) in str(info.value) and path.read_bytes() == bytes(data), "nothing is deleted or rewritten"


def test_file_without_checksums_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "0" / FILENAME
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in _tensors().items()}, str(path), metadata={"method": "fedlora"})
    with pytest.raises(StateError, match="no checksum"):
        PersonalStateStore(tmp_path, "fedlora").load(0, expected=_tensors())


def test_wrong_method_tag(tmp_path):
    PersonalStateStore(tmp_path, "local").save(0, _tensors())
    with pytest.raises(StateError, match="local") as info:
        PersonalStateStore(tmp_path, "fedlora").load(0, expected=_tensors())
    assert str(tmp_path / "0" / FILENAME) in str(info.value)


def test_missing_key(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora")
    tensors = _tensors()
    store.save(0, {k: v for k, v in tensors.items() if k != "fc.lora_B"})
    with pytest.raises(StateError, match=r"missing \['fc\.lora_B'\]"):
        store.load(0, expected=tensors)


def test_extra_key(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora")
    tensors = _tensors()
    store.save(0, {**tensors, "fc.lora_C": torch.zeros(2)})
    with pytest.raises(StateError, match=r"unexpected \['fc\.lora_C'\]"):
        store.load(0, expected=tensors)


def test_wrong_shape(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora")
    tensors = _tensors()
    store.save(0, {**tensors, "conv1.lora_A": torch.zeros(9, 12)})  # transposed: same numel
    with pytest.raises(StateError, match=r"conv1\.lora_A"):
        store.load(0, expected=tensors)


def test_wrong_dtype(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora")
    tensors = _tensors()
    store.save(0, {**tensors, "bn1.num_batches_tracked": torch.tensor(17.0)})  # float32 instead of int64
    with pytest.raises(StateError, match=r"bn1\.num_batches_tracked"):
        store.load(0, expected=tensors)
