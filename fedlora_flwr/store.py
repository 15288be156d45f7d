"""Personal-state store: what a client keeps between rounds, on disk (DESIGN.md §1).

Flower re-creates the ClientApp for every message and ``context.state`` lives in memory only, so
each client's personal tensors (FedLoRA's τ_i, a Local client's whole model, ...) live in one
safetensors file per partition id and *slot*: ``<root>/<partition-id>/<slot>.safetensors``. The
slot ``personal`` holds the personal group of the method's partition; a method may keep more in
named slots (pFedSD's ``teacher``). The server keeps its per-client state (FedAMP's w_i, FedCAC's
customized models) in the same kind of store under the run folder. Only the client being served
is ever loaded, so memory does not grow with the number of clients.

Versions by round, for checkpoint and resume: every file records the server round that wrote it.
A store is a view from one round (:meth:`PersonalStateStore.at_round`): a save writes that round's
version; when the newest file is from an earlier round it is first kept as
``<slot>.previous.safetensors``, the state this round started from (so at most two versions
exist). Training in round r loads the newest version from before r; evaluation also sees round
r's. A run resumed from its round-t checkpoint thus starts round t+1 from the round-t state even
if a client had already saved round t+1 before the crash.

Writes are atomic: a temporary file in the same folder is written, fsynced and renamed over the
old one, then the folder is fsynced, so a crash leaves either the old or the new state, never a
torn file. Every tensor's SHA-256 is kept in the file's metadata, so a file corrupted later (a bad
disk, a copy cut short) is reported with its path instead of being loaded as garbage, and never
deleted: a save that would replace a corrupt previous version stops with its path. Loads check
the checksums, the method tag, the key set, shapes and dtypes against the model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

PERSONAL = "personal"
PREVIOUS = "previous"


class StateError(RuntimeError):
    """A personal-state file is unreadable or does not match the model it is loaded into."""


@dataclass(frozen=True)
class PersonalStateStore:
    """Per-client personal tensors of one run, keyed by partition id, seen from one server round.

    ``round``: the round whose version :meth:`save` writes and below which loads look (None: a
    read-only view of the newest versions). ``training``: loads see only earlier rounds' versions
    (the state the round's training starts from), otherwise this round's too.
    """

    root: Path
    method: str
    round: int | None = None
    training: bool = False

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

    def visible_path(self, partition_id: int, slot: str = PERSONAL) -> Path | None:
        """The version this view loads: the newest one from a round it may see, or None."""
        for path in (self.path(partition_id, slot), self.previous_path(partition_id, slot)):
            if path.is_file() and (self.round is None or saved_round(path) < self.round + (0 if self.training else 1)):
                return path
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
        if path.is_file() and saved_round(path) < self.round:
            if previous.is_file():
                read_verified(previous)  # a corrupt file stops the save with its path; it is never deleted
            os.replace(path, previous)
        metadata = {"method": self.method, "partition-id": str(int(partition_id)), "round": str(self.round)}
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
        if path is None:
            return None
        tensors, metadata, stored_keys = read_verified(path, keys)
        if metadata.get("method") != self.method:
            raise StateError(f"personal state {path} belongs to method {metadata.get('method')!r}, not {self.method!r}")
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


def saved_round(path: Path) -> int:
    """The server round recorded in a state file's metadata."""
    try:
        with safe_open(path, framework="pt") as handle:
            recorded = (handle.metadata() or {}).get("round")
    except (SafetensorError, OSError, ValueError) as err:
        raise StateError(f"personal state {path} is corrupt: {err}") from None
    if recorded is None or not recorded.isdigit():
        raise StateError(f"personal state {path} records no round (not written by this store)")
    return int(recorded)


def read_verified(path: Path, keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], set[str]]:
    """(tensors, metadata, every stored key) of a safetensors file whose ``keys`` (default: all)
    match their recorded SHA-256; :class:`StateError` naming the path otherwise."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            stored_keys = set(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in (stored_keys if keys is None else keys) if key in stored_keys}
    except (SafetensorError, OSError, ValueError) as err:
        raise StateError(f"personal state {path} is corrupt: {err}") from None
    for key, tensor in tensors.items():
        recorded = metadata.get(CHECKSUM + key)
        if recorded is None:
            raise StateError(f"personal state {path} has no checksum for {key} (not written by this store)")
        if recorded != tensor_checksum(tensor):
            raise StateError(f"personal state {path} is corrupt: {key} does not match its checksum")
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
