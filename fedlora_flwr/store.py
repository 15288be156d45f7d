"""Personal-state store: what a client keeps between rounds, on disk (docs/concepts/state-store.md).

Flower re-creates the ClientApp for every message and ``context.state`` lives in memory only, so
each client's personal tensors (FedLoRA's τ_i, a Local client's whole model, ...) live in one
safetensors file per partition id and *slot*: ``<root>/<partition-id>/<slot>.safetensors``. The
slot ``personal`` holds the personal group of the method's partition; a method may keep more in
named slots (pFedSD's ``teacher``). The server keeps its per-client state (FedAMP's w_i, FedCAC's
customized models) in the same kind of store under the run folder. Only the client being served
is ever loaded, so memory does not grow with the number of clients.

Versions by round, for checkpoint and resume: every file records the server round that wrote it
and the round of the version it replaced (none for a client's first). A store is a view from one
round (:meth:`PersonalStateStore.at_round`): a save writes that round's version; when the newest
file is from an earlier round it is first kept as ``<slot>.previous.safetensors``, the state this
round started from (so at most two versions exist). Training in round r loads the newest version
from before r; evaluation also sees round r's. A run resumed from its round-t checkpoint thus
starts round t+1 from the round-t state even if a client had already saved round t+1 before the
crash; when that state is needed but gone (the previous version deleted) the load fails with its
path instead of starting the client afresh.

Every file is bound to its owner: its metadata names the method, the partition id, the slot and
the round, and a load refuses a file whose method, partition id or slot differ (a file copied
from another client). The server may also tell a view the last round each client trained in
(``trained``, sent as the message config key :data:`LAST_TRAINED`): a load for such a client that
finds no version from that round or later fails, as its state was lost. Every slot a client loads
must therefore be saved by each of its trainings (a method with no personal tensors loads none).

Writes are atomic: a temporary file in the same folder is written, fsynced and renamed over the
old one, then the folder is fsynced, so a crash leaves either the old or the new state, never a
torn file. Every tensor's SHA-256 is kept in the file's metadata, so a file corrupted later (a bad
disk, a copy cut short) is reported with its path instead of being loaded as garbage, and never
deleted: a save that would replace a corrupt previous version stops with its path. Loads check
the checksums, the owner (method, partition id, slot), the key set, shapes and dtypes against the
model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

PERSONAL = "personal"
PREVIOUS = "previous"
#: The train/evaluate message config key by which the server tells a client the last round it
#: trained in (0: never), from the run's recorded participants (``results.last_trained_rounds``).
LAST_TRAINED = "last-trained-round"


class StateError(RuntimeError):
    """A personal-state file is unreadable or does not match the model it is loaded into."""


@dataclass(frozen=True)
class PersonalStateStore:
    """Per-client personal tensors of one run, keyed by partition id, seen from one server round.

    ``round``: the round whose version :meth:`save` writes and below which loads look (None: a
    read-only view of the newest versions). ``training``: loads see only earlier rounds' versions
    (the state the round's training starts from), otherwise this round's too. ``trained``:
    partition id -> the last round the server recorded that client training in; its loads must
    find a version from that round or later.
    """

    root: Path
    method: str
    round: int | None = None
    training: bool = False
    trained: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def at_round(self, server_round: int, training: bool = False) -> PersonalStateStore:
        return replace(self, round=int(server_round), training=training)

    def path(self, partition_id: int, slot: str = PERSONAL) -> Path:
        """The newest version of ``slot``."""
        return self.root / str(int(partition_id)) / f"{slot}.safetensors"

    def previous_path(self, partition_id: int, slot: str = PERSONAL) -> Path:
        """The version before the newest one, kept for a resume from the round it belongs to."""
        return self.root / str(int(partition_id)) / f"{slot}.{PREVIOUS}.safetensors"

    def sees(self, server_round: int) -> bool:
        """Whether a version saved in ``server_round`` is visible to this view."""
        return self.round is None or server_round < self.round + (0 if self.training else 1)

    def visible_path(self, partition_id: int, slot: str = PERSONAL) -> Path | None:
        """The version this view loads: the newest one if it sees its round, else the version that
        one replaced (kept as the previous one), or None when there is none: no file yet, or a
        first version from a round it does not see. :class:`StateError` when the version it needs
        is gone."""
        newest, previous = self.path(partition_id, slot), self.previous_path(partition_id, slot)
        # no newest file but a previous one: a save stopped between keeping it and writing the new one
        path = newest if newest.is_file() else previous if previous.is_file() else None
        while path is not None:
            metadata = read_metadata(path)
            saved = recorded_round(path, metadata)
            if self.sees(saved):
                return path
            before = replaced_round(path, metadata)
            if before is None:  # the client's first version: it had no state before
                return None
            needed = f"round {saved} replaced round {before}'s state, which round {self.round} needs"
            if path == previous:
                raise StateError(f"personal state {path}: {needed}, and it is no longer kept")
            if not previous.is_file():
                raise StateError(f"personal state {previous} is missing: {path} of {needed}")
            if saved_round(previous) != before:
                raise StateError(f"personal state {previous} is from round {saved_round(previous)}: {path} of {needed}")
            path = previous
        return None

    def exists(self, partition_id: int, slot: str = PERSONAL) -> bool:
        return self.visible_path(partition_id, slot) is not None

    def stored_ids(self, slot: str = PERSONAL) -> list[int]:
        """The partition ids that have a version of ``slot`` this view sees, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(int(d.name) for d in self.root.iterdir() if d.name.isdigit() and self.exists(int(d.name), slot))

    def save(self, partition_id: int, tensors: Mapping[str, torch.Tensor], slot: str = PERSONAL) -> Path:
        """Atomically write ``tensors`` (copied to CPU) as this round's version of ``slot``; a newest
        version from an earlier round becomes the previous one (a later round's, left by a round
        that the server discarded, is replaced)."""
        if self.round is None:
            raise ValueError("PersonalStateStore.save needs the server round the state belongs to (use at_round)")
        path, previous = self.path(partition_id, slot), self.previous_path(partition_id, slot)
        before = None  # the round of the version this one replaces
        if path.is_file():
            metadata = read_metadata(path)
            newest = recorded_round(path, metadata)
            if newest < self.round:
                if previous.is_file():
                    read_verified(previous)  # a corrupt file stops the save with its path; it is never deleted
                os.replace(path, previous)
                before = newest
            else:  # this round again (a resumed run): the previous version stays what it was
                before = replaced_round(path, metadata)
        metadata = {"method": self.method, "partition-id": str(int(partition_id)), "slot": slot,
                    "round": str(self.round), REPLACED: "" if before is None else str(before)}
        write_safetensors_atomic(path, tensors, metadata)
        return path

    def load(
        self, partition_id: int, expected: Mapping[str, torch.Tensor], slot: str = PERSONAL, keys: list[str] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The visible version of ``slot``, or None if this client has none yet.

        ``expected`` (e.g. the freshly built model's personal tensors) fixes the key set, shapes
        and dtypes the file must have; any difference raises :class:`StateError`. ``keys`` reads
        only those tensors (checked against ``expected`` all the same).
        """
        path = self.visible_path(partition_id, slot)
        trained = self.trained.get(int(partition_id), 0)
        if path is None:
            if trained:
                raise StateError(f"personal state {self.path(partition_id, slot)} is missing: client {partition_id} "
                                 f"trained in round {trained} (the server's record)")
            return None
        tensors, metadata, stored_keys = read_verified(path, keys)
        owner = {"method": self.method, "partition-id": str(int(partition_id)), "slot": slot}
        differs = [f"{key} {metadata.get(key)!r} (expected {value!r})" for key, value in owner.items()
                   if metadata.get(key) != value]
        if differs:
            raise StateError(f"personal state {path} is another owner's: it records {', '.join(differs)}")
        if recorded_round(path, metadata) < trained:
            raise StateError(f"personal state {path} is from round {recorded_round(path, metadata)}, but client "
                             f"{partition_id} trained in round {trained} (the server's record): its newer state "
                             "is gone")
        if stored_keys != set(expected):
            missing = sorted(set(expected) - stored_keys)
            extra = sorted(stored_keys - set(expected))
            raise StateError(f"personal state {path} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        if keys is not None:
            expected = {key: expected[key] for key in keys}
        for key, reference in expected.items():
            stored = tensors[key]
            if stored.shape != reference.shape or stored.dtype != reference.dtype:
                raise StateError(
                    f"personal state {path}: {key} is {stored.dtype}{tuple(stored.shape)}, "
                    f"the model expects {reference.dtype}{tuple(reference.shape)}"
                )
        return tensors


#: Metadata key: the round of the version a file replaced ("" for a client's first version).
REPLACED = "replaced-round"


def read_metadata(path: Path) -> dict[str, str]:
    """A state file's metadata (its header only); :class:`StateError` naming the path if unreadable."""
    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise StateError(f"personal state {path} is corrupt: {err}") from None


def recorded_round(path: Path, metadata: Mapping[str, str]) -> int:
    recorded = metadata.get("round")
    if recorded is None or not recorded.isdigit():
        raise StateError(f"personal state {path} records no round (not written by this store)")
    return int(recorded)


def replaced_round(path: Path, metadata: Mapping[str, str]) -> int | None:
    """The round of the version ``path`` replaced, None when it was its client's first."""
    recorded = metadata.get(REPLACED)
    if recorded is None or not (recorded == "" or recorded.isdigit()):
        raise StateError(f"personal state {path} records no {REPLACED} (not written by this version of the store)")
    return int(recorded) if recorded else None


def saved_round(path: Path) -> int:
    """The server round recorded in a state file's metadata."""
    return recorded_round(path, read_metadata(path))


def read_verified(
    path: Path, keys: list[str] | None = None, what: str = "personal state"
) -> tuple[dict[str, torch.Tensor], dict[str, str], set[str]]:
    """(tensors, metadata, every stored key) of a safetensors file whose ``keys`` (default: all)
    match their recorded SHA-256; :class:`StateError` naming ``what`` and the path otherwise."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            stored_keys = set(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in (stored_keys if keys is None else keys) if key in stored_keys}
    except (SafetensorError, OSError, ValueError) as err:
        raise StateError(f"{what} {path} is corrupt: {err}") from None
    for key, tensor in tensors.items():
        recorded = metadata.get(CHECKSUM + key)
        if recorded is None:
            raise StateError(f"{what} {path} has no checksum for {key} (not written by this store)")
        if recorded != tensor_checksum(tensor):
            raise StateError(f"{what} {path} is corrupt: {key} does not match its checksum")
    return tensors, metadata, stored_keys


CHECKSUM = "sha256:"


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (CPU, contiguous)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def write_safetensors_atomic(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (copied to CPU) as a safetensors file, atomically, with a checksum per tensor."""
    cpu = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    checksums = {CHECKSUM + key: tensor_checksum(value) for key, value in cpu.items()}
    write_atomic(path, save_safetensors(cpu, metadata={**metadata, **checksums}))


def write_atomic(path: Path, payload: bytes) -> None:
    """Temp file in the same folder, fsync, rename over ``path``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp creates 0600; outputs are for other tools too
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
