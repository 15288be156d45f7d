"""Personal-state store: what a client keeps between rounds, on disk (DESIGN.md §1).

Flower re-creates the ClientApp for every message and ``context.state`` lives in memory only, so
each client's personal tensors (FedLoRA's τ_i, a Local client's whole model, ...) live in one
safetensors file per partition id and *slot*: ``<root>/<partition-id>/<slot>.safetensors``. The
slot ``personal`` holds the personal group of the method's partition; a method may keep more in
named slots (pFedSD's ``teacher``). The server keeps its per-client state (FedAMP's w_i, FedCAC's
customized models) in the same kind of store under the run folder. Only the client being served
is ever loaded, so memory does not grow with the number of clients.

Writes are atomic: a temporary file in the same folder is written, fsynced and renamed over the
old one, then the folder is fsynced, so a crash leaves either the old or the new state, never a
torn file. Every tensor's SHA-256 is kept in the file's metadata, so a file corrupted later (a bad
disk, a copy cut short) is reported with its path instead of being loaded as garbage. Loads check
the checksums, the method tag, the key set, shapes and dtypes against the model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

PERSONAL = "personal"


class StateError(RuntimeError):
    """A personal-state file is unreadable or does not match the model it is loaded into."""


class PersonalStateStore:
    """Per-client personal tensors of one run, keyed by partition id."""

    def __init__(self, root: str | Path, method: str) -> None:
        self.root = Path(root)
        self.method = method

    def path(self, partition_id: int, slot: str = PERSONAL) -> Path:
        return self.root / str(int(partition_id)) / f"{slot}.safetensors"

    def exists(self, partition_id: int, slot: str = PERSONAL) -> bool:
        return self.path(partition_id, slot).is_file()

    def stored_ids(self, slot: str = PERSONAL) -> list[int]:
        """The partition ids that have a file in ``slot``, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(int(d.name) for d in self.root.iterdir() if d.name.isdigit() and (d / f"{slot}.safetensors").is_file())

    def save(self, partition_id: int, tensors: Mapping[str, torch.Tensor], slot: str = PERSONAL) -> Path:
        """Atomically replace the client's ``slot`` with ``tensors`` (copied to CPU)."""
        path = self.path(partition_id, slot)
        write_safetensors_atomic(path, tensors, {"method": self.method, "partition-id": str(int(partition_id))})
        return path

    def load(
        self, partition_id: int, expected: Mapping[str, torch.Tensor], slot: str = PERSONAL, keys: list[str] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The stored tensors of ``slot``, or None if this client has none yet.

        ``expected`` (e.g. the freshly built model's personal tensors) fixes the key set, shapes
        and dtypes the file must have; any difference raises :class:`StateError`. ``keys`` reads
        only those tensors (checked against ``expected`` all the same).
        """
        path = self.path(partition_id, slot)
        if not path.is_file():
            return None
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
