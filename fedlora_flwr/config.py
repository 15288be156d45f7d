"""The run configuration: every key of ``[tool.flwr.app.config]``, validated into one typed object.

Flower hands both apps the fused run config (pyproject defaults + ``--run-config`` overrides) as
a flat ``{"kebab-key": value}`` mapping. :func:`load_config` turns it into a frozen
:class:`RunConfig` or raises :class:`ConfigError` whose message is one line naming each bad key.

Relative paths (``data-dir``, ``output-dir``) resolve against the working directory of the
process that validates the config: for ``flwr run`` that is the SuperLink's working directory
(the managed local SuperLink starts in the directory where ``flwr run`` first launched it).
The ServerApp resolves them once, logs the absolute paths, records them in ``config.json`` and
sends them to the clients, so every process uses the same absolute paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fedlora_flwr.data import DATASETS
from fedlora_flwr.models import MODELS

_PATH_KEYS = ("data-dir", "output-dir")

#: Every registered method (``fedlora_flwr.methods.METHODS`` has exactly these keys, a test checks
#: it). Named here so that the schema does not import the registry, which imports the strategies,
#: which import this module.
MethodName = Literal[
    "fedlora", "fedavg", "local", "fedavg-lora", "local-lora",
    "fedper", "fedrep", "fedbn", "fedrod", "fedamp", "pfedsd", "pfedgate", "fedcac",
]


class ConfigError(ValueError):
    """A run-config value is invalid; the message is one line naming the key(s)."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """One run of one method. Field docs give the paper symbol where there is one."""

    # strict: Flower passes typed TOML values; a bool or a string is not silently a number.
    model_config = ConfigDict(alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True, strict=True)

    method: MethodName = Field("fedlora", description="registered method, see fedlora_flwr.methods")
    dataset: str = "cifar10"
    data_dir: str = "data"
    partition: Literal["dirichlet", "pathological", "iid"] = "dirichlet"
    alpha: float = Field(0.1, gt=0, description="Dirichlet concentration α")
    classes_per_client: int = Field(2, ge=1, description="k for the pathological partition")
    train_per_client: int = Field(500, ge=1)
    test_per_client: int = Field(100, ge=1)
    model: str = "resnet8"
    num_server_rounds: int = Field(3, ge=1, description="T")
    local_epochs: int = Field(5, ge=1, description="E")
    lora_epochs: int = Field(2, ge=0, description="E_lora (FedLoRA, eq. 6)")
    lora_schedule: Literal["alternating", "simultaneous"] = "alternating"
    batch_size: int = Field(100, ge=1, description="B")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    rank_conv: float = Field(0.6, gt=0, le=1, description="R_c")
    rank_linear: float = Field(0.6, gt=0, le=1, description="R_l")
    fraction_train: float = Field(1.0, gt=0, le=1)
    aggregation: Literal["auto", "mean", "weighted"] = "auto"
    partial_average: Literal["participants", "all-clients"] = "participants"
    seed: int = Field(1, ge=0, lt=2**32, description="numpy RandomState range")
    output_dir: str = "outputs"
    run_name: str = ""
    resume: bool = Field(False, description="continue run-name in output-dir from its last checkpoint")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    round_timeout: float = Field(3600.0, gt=0)
    fault_fraction: float = Field(0.0, ge=0, le=1, description="fraction of each round's participants told to fail")
    fault_kind: Literal["raise", "timeout", "nan", "wrong-shape"] = Field("raise", description="how they fail")
    tensorboard: bool = Field(False, description="also write per-round metrics to <run-dir>/tensorboard/")

    # Per-method hyperparameters (METHODS.md §E); each method reads only its own.
    fedrep_head_epochs: int = Field(4, ge=0, description="FedRep E_h: head epochs, body frozen (E.4)")
    fedrep_body_epochs: int = Field(1, ge=0, description="FedRep E_b: body epochs, head frozen (E.4)")
    fedamp_alpha_k: float = Field(1.0, gt=0, description="FedAMP α_K: attention weight / prox step (E.7)")
    fedamp_lambda: float = Field(1.0, ge=0, description="FedAMP λ: proximal strength (E.7)")
    fedamp_sigma: float = Field(1.0, gt=0, description="FedAMP σ: scale of the similarity e^{−d²/σ} (E.7)")
    pfedsd_lambda: float = Field(0.5, ge=0, description="pFedSD λ: weight of the distillation term (E.8)")
    pfedsd_temperature: float = Field(3.0, gt=0, description="pFedSD τ: distillation temperature (E.8)")
    pfedgate_budget: float = Field(1.0, gt=0, le=1, description="pFedGate sparsity budget s (E.9; only 1)")
    pfedgate_max_grad_norm: float = Field(10.0, gt=0, description="pFedGate gradient-norm clip (E.9)")
    fedcac_tau: float = Field(0.5, ge=0, le=1, description="FedCAC τ: fraction of critical parameters (E.10)")
    fedcac_beta: int = Field(100, ge=1, description="FedCAC β: collaboration threshold growth (E.10)")

    @field_validator("pfedgate_budget")
    @classmethod
    def _full_budget_only(cls, value: float) -> float:
        if value != 1.0:
            raise ValueError("only budget 1 is implemented (pFedGate's minimal version, METHODS.md E.9)")
        return value

    @field_validator("dataset", "model")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        choices = {"dataset": DATASETS, "model": MODELS}[info.field_name]
        if value not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r}; choose one of {sorted(choices)}")
        return value

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must be a plain folder name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("resume")
    @classmethod
    def _names_the_run(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("run_name"):
            raise ValueError("needs run-name: the run to continue")
        return value

    @field_validator("data_dir")
    @classmethod
    def _npz_file_exists(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("dataset") == "npz" and not Path(value).is_file():
            raise ValueError(f"no npz file at {value!r} (dataset='npz' needs the .npz file)")
        return value

    @field_validator("lora_epochs")
    @classmethod
    def _within_local_epochs(cls, value: int, info: ValidationInfo) -> int:
        local_epochs = info.data.get("local_epochs")
        if local_epochs is not None and value > local_epochs:
            raise ValueError(f"{value} exceeds local-epochs={local_epochs}")
        return value

    def as_record(self) -> dict[str, Any]:
        """The config as Flower run-config keys (kebab-case), e.g. for ``config.json``."""
        return self.model_dump(by_alias=True)


def load_config(run_config: Mapping[str, Any], base: Path | None = None) -> RunConfig:
    """Validate Flower's run config (kebab keys) into a :class:`RunConfig` with absolute paths.

    Raises :class:`ConfigError` with one line listing every invalid key and why.
    """
    base = (base or Path.cwd()).resolve()
    values = dict(run_config)
    for key in _PATH_KEYS:
        values.setdefault(key, RunConfig.model_fields[key.replace("-", "_")].default)
        if isinstance(values[key], str) and values[key]:
            values[key] = str((base / Path(values[key]).expanduser()).resolve())
    try:
        return RunConfig.model_validate(values)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            key = ".".join(str(part) for part in error["loc"]) or "config"
            value = run_config.get(key, "<missing>")
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{key}={value!r}: {message}")
        raise ConfigError("invalid run config: " + "; ".join(problems)) from None
