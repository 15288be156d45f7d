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
from fedlora_flwr.models import MODEL_FAMILIES, MODELS
from fedlora_flwr.text import TEXT_DATASETS
from fedlora_flwr.text_models import HF_PREFIX, is_text_model

_PATH_KEYS = ("data-dir", "output-dir", "backbone")

#: Every registered method (``fedlora_flwr.methods.METHODS`` has exactly these keys, a test checks
#: it). Named here so that the schema does not import the registry, which imports the strategies,
#: which import this module.
MethodName = Literal[
    "fedlora", "fedavg", "local", "fedavg-lora", "local-lora",
    "fedper", "fedrep", "fedbn", "fedrod", "fedamp", "pfedsd", "pfedgate", "fedcac",
    "fedsa-lora", "fedsa-rslora", "fedsa-vera", "lora", "ffa-lora", "fedavg-head",
    "pfedlora", "fedavg-adapter",
    "pf2lora", "pf2lora-simultaneous", "lora-ft",
]
#: The methods whose uploads do not depend on the client's architecture, so that clients of a
#: ``model-family`` can be federated (a test checks their upload templates agree across a family).
HETEROGENEOUS_METHODS = ("pfedlora", "fedavg-adapter", "local")
#: The adapter methods on a frozen pretrained model (clients/adapters.py): the readers of ``backbone``.
PRETRAINED_METHODS = ("fedsa-lora", "fedsa-rslora", "fedsa-vera", "lora", "ffa-lora", "local-lora", "fedavg-head")
#: The methods whose schedule takes PF2LoRA's bilevel step (float32 only, METHODS.md D.8; a test
#: checks this against the registry's schedules).
BILEVEL_METHODS = ("pf2lora", "pf2lora-simultaneous")


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
    model_family: str = Field("", description="when set, client k builds member k mod n of this family; `model` is unused")
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
    augment_backend: Literal["auto", "per-sample", "batched"] = Field(
        "auto", description="training augmentation: torchvision per image, or batched on the device; auto: batched on CUDA")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="forward passes of image models under bfloat16 autocast (bf16); state stays float32")
    round_timeout: float = Field(3600.0, gt=0)
    fused_evaluation: bool = Field(False, description="evaluate round t at the start of round t+1's train message")
    min_available_nodes: int = Field(0, ge=0, description="SuperNodes connected before round 1; 0 = num-partitions")
    node_wait_timeout: float = Field(600.0, gt=0, description="seconds to wait for them, then the run stops")
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
    pfedlora_rank: int = Field(16, ge=1, description="pFedLoRA adapter rank r (C.2)")
    pfedlora_mu: float = Field(0.5, ge=0, le=1, description="pFedLoRA μ: weight of the local head FC3_k (C.2)")
    pfedlora_local_epochs: int = Field(1, ge=0, description="pFedLoRA E_1: local model, adapter frozen (C.3)")
    pfedlora_adapter_epochs: int = Field(1, ge=0, description="pFedLoRA E_2: adapter, local model frozen (C.3)")
    pfedlora_lr: float = Field(0.01, gt=0, description="pFedLoRA SGD learning rate (C.3)")
    pfedlora_weight_decay: float = Field(1e-3, ge=0, description="pFedLoRA SGD weight decay (C.3)")
    pfedlora_max_grad_norm: float = Field(50.0, gt=0, description="pFedLoRA gradient-norm clip (C.3)")

    # Text track and adapters on pretrained models (METHODS.md §B).
    max_seq_length: int = Field(128, ge=2, description="tokens per text sample (truncated / padded)")
    local_steps: int = Field(10, ge=0, description="local mini-batch steps per round of the adapter methods (B.2) and PF2LoRA's I (D.3); 0: local-epochs epochs")
    lora_r: int = Field(8, ge=1, description="LoRA rank r (B.1)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA α: scaling α/r, or α/√r with rsLoRA (B.1, B.5)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input (B.1)")
    lora_target_modules: str = Field("", description="comma-separated module names; \"\": query,value on a text "
                                     "model, every Conv2d and Linear but the head fc on an image backbone")
    backbone: str = Field("", description="safetensors of an image model's weights (e.g. a fedavg run's "
                          "shared.safetensors): frozen under the adapter methods; \"\": none")
    vera_r: int = Field(256, ge=1, description="VeRA rank r_v of the shared random projections (B.5)")
    vera_lr: float = Field(0.01, gt=0, description="FedSA-VeRA AdamW learning rate (B.5: lr_c)")

    # PF2LoRA (METHODS.md §D) and its controls; lr-upper/lr-lower: rebuttal Table 2 (MNLI, SST-2, QQP, QNLI).
    rank_common: int = Field(8, ge=1, description="r: rank of the common adapter (B, A) (D.1)")
    rank_client: int = Field(2, ge=1, description="r̃: rank of the client adapter (D_k, C_k) (D.1)")
    lr_lower: float = Field(1e-3, ge=0, description="α: SGD step of the client adapter (D.3)")
    lr_upper: float = Field(1e-3, ge=0, description="β: step of the common adapter's optimizer (D.3)")
    pf2lora_upper_optimizer: Literal["sgd", "adamw"] = Field("sgd", description="common adapter's optimizer (D.3 REC: sgd)")
    pf2lora_head: Literal["shared", "personal"] = Field("shared", description="the head's own weights: with x or with y (D.1)")

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
        any_hf = info.field_name == "model" and value.startswith(HF_PREFIX) and len(value) > len(HF_PREFIX)
        if value not in choices and not any_hf:
            hint = " or 'hf:<name>'" if info.field_name == "model" else ""
            raise ValueError(f"unknown {info.field_name} {value!r}; choose one of {sorted(choices)}{hint}")
        if info.field_name == "model" and "dataset" in info.data:
            text_data, text_model = info.data["dataset"] in TEXT_DATASETS, is_text_model(value)
            if text_data != text_model:
                raise ValueError(f"dataset={info.data['dataset']!r} needs a {'text' if text_data else 'vision'} model")
        return value

    @field_validator("model_family")
    @classmethod
    def _family_for_heterogeneous_method(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            return value
        if value not in MODEL_FAMILIES:
            raise ValueError(f"unknown model family {value!r}; choose one of {sorted(MODEL_FAMILIES)} or \"\"")
        method = info.data.get("method")
        if method is not None and method not in HETEROGENEOUS_METHODS:
            raise ValueError(f"method {method!r} shares architecture-dependent tensors; "
                             f"only {', '.join(HETEROGENEOUS_METHODS)} federate a model family")
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

    @field_validator("backbone")
    @classmethod
    def _image_backbone_for_adapters(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            return value
        method, model = info.data.get("method"), info.data.get("model")
        if method is not None and method not in PRETRAINED_METHODS:
            raise ValueError(f"method {method!r} trains from scratch; only {', '.join(PRETRAINED_METHODS)} "
                             "fine-tune a backbone")
        if model is not None and is_text_model(model):
            raise ValueError(f"model={model!r} is a text model; backbone is for image models")
        return value

    @field_validator("precision")
    @classmethod
    def _bf16_where_tested(cls, value: str, info: ValidationInfo) -> str:
        if value == "fp32":
            return value
        method, model = info.data.get("method"), info.data.get("model")
        if method in BILEVEL_METHODS:
            raise ValueError(f"method {method!r} takes the bilevel step, which runs in float32 only (METHODS.md D.8); use fp32")
        if model is not None and is_text_model(model):
            raise ValueError(f"bf16 autocast is for the image models; model={model!r} is a text model; use fp32")
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
