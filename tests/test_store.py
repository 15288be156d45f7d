"""Personal-state store (fedlora_flwr.store, docs/concepts/state-store.md): atomic per-client safetensors files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedlora_flwr.store import PREVIOUS, PersonalStateStore, StateError

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
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
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
    store = PersonalStateStore(tmp_path / "clients", "fedlora", round=1)
    store.save(0, _tensors(0))
    store.save(0, _tensors(1))  # overwrite
    store.save(12, _tensors(2))
    assert _files(tmp_path / "clients") == ["0", "12"]
    assert _files(tmp_path / "clients" / "0") == [FILENAME]
    assert _files(tmp_path / "clients" / "12") == [FILENAME]
    loaded = store.load(0, expected=_tensors(1))
    assert torch.equal(loaded["conv1.lora_A"], _tensors(1)["conv1.lora_A"]), "the second save wins"


def test_save_copies_the_values(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
    tensors = _tensors()
    reference = {key: value.clone() for key, value in tensors.items()}
    store.save(0, tensors)
    tensors["conv1.lora_A"].add_(1.0)  # mutating the live tensor after saving
    loaded = store.load(0, expected=reference)
    assert torch.equal(loaded["conv1.lora_A"], reference["conv1.lora_A"])


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
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
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("injected")))
    with pytest.raises(OSError):
        store.save(2, _tensors())
    monkeypatch.undo()
    assert not store.exists(2)
    assert store.load(2, expected=_tensors()) is None
    assert not any(store.path(2).parent.iterdir())


def test_missing_file_is_none(tmp_path):
    store = PersonalStateStore(tmp_path / "never-created", "fedlora", round=1)
    assert store.load(0, expected=_tensors()) is None
    assert not (tmp_path / "never-created").exists(), "loading must not create folders"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_raises_state_error_naming_the_path(tmp_path, damage):
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
    path = store.save(0, _tensors())
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not a safetensors file" * 3, "empty": b""}[damage])
    with pytest.raises(StateError) as info:
        store.load(0, expected=_tensors())
    assert str(path) in str(info.value)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    """Same length, valid header, one data byte changed: safetensors alone would load it."""
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
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
    save_file({k: v.contiguous() for k, v in _tensors().items()}, str(path), metadata={"method": "fedlora", "round": "1"})
    with pytest.raises(StateError, match="no checksum"):
        PersonalStateStore(tmp_path, "fedlora", round=1).load(0, expected=_tensors())
    save_file({k: v.contiguous() for k, v in _tensors().items()}, str(path), metadata={"method": "fedlora"})
    with pytest.raises(StateError, match="records no round") as info:
        PersonalStateStore(tmp_path, "fedlora", round=1).load(0, expected=_tensors())
    assert str(path) in str(info.value)


def test_wrong_method_tag(tmp_path):
    PersonalStateStore(tmp_path, "local", round=1).save(0, _tensors())
    with pytest.raises(StateError, match="local") as info:
        PersonalStateStore(tmp_path, "fedlora", round=1).load(0, expected=_tensors())
    assert str(tmp_path / "0" / FILENAME) in str(info.value)


def test_missing_key(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
    tensors = _tensors()
    store.save(0, {k: v for k, v in tensors.items() if k != "fc.lora_B"})
    with pytest.raises(StateError, match=r"missing \['fc\.lora_B'\]"):
        store.load(0, expected=tensors)


def test_extra_key(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
    tensors = _tensors()
    store.save(0, {**tensors, "fc.lora_C": torch.zeros(2)})
    with pytest.raises(StateError, match=r"unexpected \['fc\.lora_C'\]"):
        store.load(0, expected=tensors)


def test_wrong_shape(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
    tensors = _tensors()
    store.save(0, {**tensors, "conv1.lora_A": torch.zeros(9, 12)})  # transposed: same numel
    with pytest.raises(StateError, match=r"conv1\.lora_A"):
        store.load(0, expected=tensors)


def test_wrong_dtype(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
    tensors = _tensors()
    store.save(0, {**tensors, "bn1.num_batches_tracked": torch.tensor(17.0)})  # float32 instead of int64
    with pytest.raises(StateError, match=r"bn1\.num_batches_tracked"):
        store.load(0, expected=tensors)


# --------------------------------------------------------------------------- versions by round (resume)


def _value(store: PersonalStateStore, partition_id: int = 0) -> float | None:
    loaded = store.load(partition_id, expected={"w": torch.zeros(3)})
    return None if loaded is None else float(loaded["w"][0])


def _save(tmp_path: Path, server_round: int, value: float, partition_id: int = 0) -> None:
    PersonalStateStore(tmp_path, "fedlora").at_round(server_round).save(partition_id, {"w": torch.full((3,), value)})


def test_training_loads_the_newest_version_before_its_round(tmp_path):
    store = PersonalStateStore(tmp_path, "fedlora")
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)
    assert _value(store.at_round(2, training=True)) == 1.0, "round 2's training starts from round 1's state"
    assert _value(store.at_round(2)) == 2.0, "round 2's evaluation sees round 2's training"
    assert _value(store.at_round(3, training=True)) == 2.0 and _value(store) == 2.0
    assert _value(store.at_round(1, training=True)) is None
    _save(tmp_path, 2, 2.5)  # round 2 again (a resumed run): the previous version stays round 1's
    assert _value(store.at_round(2, training=True)) == 1.0 and _value(store.at_round(2)) == 2.5
    _save(tmp_path, 4, 4.0)  # a non-participant of round 3
    assert _files(tmp_path / "0") == [f"personal.{PREVIOUS}.safetensors", FILENAME], "at most two versions"
    assert _value(store.at_round(4, training=True)) == 2.5 and _value(store.at_round(4)) == 4.0


def test_state_saved_for_a_round_past_the_checkpoint_is_not_used(tmp_path):
    """Checkpoint after round 1; client 0 and a new client 1 saved round 2 before the crash."""
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)
    _save(tmp_path, 2, 9.0, partition_id=1)
    resumed = PersonalStateStore(tmp_path, "fedlora").at_round(2, training=True)
    assert _value(resumed) == 1.0 and _value(resumed, 1) is None
    assert resumed.stored_ids() == [0] and PersonalStateStore(tmp_path, "fedlora").stored_ids() == [0, 1]


def test_corrupt_previous_version_stops_the_save_and_is_kept(tmp_path):
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)
    store = PersonalStateStore(tmp_path, "fedlora", round=3)
    previous = store.previous_path(0)
    data = bytearray(previous.read_bytes())
    data[-1] ^= 0xFF
    previous.write_bytes(bytes(data))
    newest = store.path(0).read_bytes()
    with pytest.raises(StateError, match="checksum") as info:
        store.save(0, {"w": torch.full((3,), 3.0)})
    assert str(previous) in str(info.value)
    assert previous.read_bytes() == bytes(data) and store.path(0).read_bytes() == newest, "nothing is deleted"


def test_save_needs_a_round(tmp_path):
    with pytest.raises(ValueError, match="round"):
        PersonalStateStore(tmp_path, "fedlora").save(0, _tensors())


KILLED_WHILE_SAVING = """
import os, sys, time
import torch
from fedlora_flwr.store import PersonalStateStore

fsync = os.fsync
def stall(fd):  # the temporary file is written and fsynced, not yet renamed over the state
    fsync(fd)
    print("saving", flush=True)
    time.sleep(600)

os.fsync = stall
PersonalStateStore(sys.argv[1], "fedlora", round=int(sys.argv[2])).save(0, {"w": torch.full((3,), 7.0)})
"""


@pytest.mark.parametrize("server_round", [1, 2], ids=["same-round", "next-round"])
def test_client_killed_while_saving_leaves_its_previous_state(tmp_path, server_round):
    """SIGKILL mid-save, in the round of the existing state or in the next one (after the newest
    version became the previous one): the state of round 1 loads intact; nothing is deleted (the
    killed save's temporary file stays, and no load ever reads it)."""
    import subprocess
    import sys

    _save(tmp_path, 1, 1.0)
    child = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_SAVING, str(tmp_path), str(server_round)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saving"
    finally:
        child.kill()  # SIGKILL, by PID
        child.wait(timeout=30)
    store = PersonalStateStore(tmp_path, "fedlora")
    assert _value(store.at_round(server_round, training=True)) == (1.0 if server_round == 2 else None)
    assert _value(store.at_round(2, training=True)) == 1.0 and _value(store) == 1.0
    temporary = [name for name in _files(tmp_path / "0") if name.startswith(".")]
    assert len(temporary) == 1, _files(tmp_path / "0")


# --------------------------------------------------------------------------- bound to owner and round


def test_swapped_client_files_are_refused(tmp_path):
    """Two clients' files swapped (a copy gone wrong): each load names the path and the owner it records."""
    store = PersonalStateStore(tmp_path, "fedlora", round=1)
    first, second = store.save(0, _tensors(0)), store.save(1, _tensors(1))
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)
    for pid, other in ((0, 1), (1, 0)):
        with pytest.raises(StateError) as info:
            store.load(pid, expected=_tensors())
        assert str(store.path(pid)) in str(info.value) and f"partition-id '{other}' (expected '{pid}')" in str(info.value)


def test_file_of_another_slot_is_refused(tmp_path):
    store = PersonalStateStore(tmp_path, "pfedsd", round=1)
    teacher = store.save(0, _tensors(), slot="teacher")
    store.path(0).write_bytes(teacher.read_bytes())  # same keys, shapes and dtypes
    with pytest.raises(StateError, match="slot 'teacher' \\(expected 'personal'\\)") as info:
        store.load(0, expected=_tensors())
    assert str(store.path(0)) in str(info.value)


@pytest.mark.parametrize("redone", [False, True], ids=["first-try", "saved-again"])
def test_missing_previous_version_of_a_redone_round_is_an_error(tmp_path, redone):
    """Round 2 is being redone (a resume) and the round-1 state it starts from was deleted: the
    load names the missing file instead of starting the client afresh."""
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)
    if redone:
        _save(tmp_path, 2, 2.5)  # saving round 2 again keeps the record of what it replaced
    store = PersonalStateStore(tmp_path, "fedlora")
    store.previous_path(0).unlink()
    with pytest.raises(StateError, match="is missing") as info:
        _value(store.at_round(2, training=True))
    assert str(store.previous_path(0)) in str(info.value) and "round 1" in str(info.value)
    assert _value(store.at_round(2)) == (2.5 if redone else 2.0), "evaluation of round 2 sees the round-2 state"


def test_previous_version_from_another_round_is_refused(tmp_path):
    """The round-3 state replaced round 2's; a round-1 file in the previous version's place is refused."""
    other = tmp_path / "other"
    _save(other, 1, 1.0)
    _save(other, 2, 2.0)
    for server_round in (1, 2, 3):
        _save(tmp_path, server_round, float(server_round))
    store = PersonalStateStore(tmp_path, "fedlora")
    store.previous_path(0).write_bytes(PersonalStateStore(other, "fedlora").previous_path(0).read_bytes())
    with pytest.raises(StateError, match="is from round 1") as info:
        _value(store.at_round(3, training=True))
    assert str(store.previous_path(0)) in str(info.value)


def test_server_record_of_the_last_training_requires_its_state(tmp_path):
    """``trained``: the server recorded client 0 training in round 2."""
    store = PersonalStateStore(tmp_path, "fedlora", trained={0: 2})
    with pytest.raises(StateError, match="is missing: client 0 trained in round 2") as info:
        _value(store.at_round(3, training=True))
    assert str(store.path(0)) in str(info.value)
    _save(tmp_path, 1, 1.0)
    with pytest.raises(StateError, match="is from round 1, but client 0 trained in round 2"):
        _value(store.at_round(3, training=True))
    _save(tmp_path, 2, 2.0)
    assert _value(store.at_round(3, training=True)) == 2.0 and _value(store.at_round(2)) == 2.0
    _save(tmp_path, 3, 3.0)  # trained in round 3 too, though the server did not aggregate that update
    assert _value(store.at_round(4, training=True)) == 3.0
    assert _value(PersonalStateStore(tmp_path, "fedlora", trained={1: 0}).at_round(4, training=True), 1) is None
