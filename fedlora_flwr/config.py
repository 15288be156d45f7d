"""The run configuration: the core keys every run has, plus the keys of the run's method.

Flower hands both apps the fused run config (pyproject defaults + ``--run-config`` overrides) as
a flat ``{"kebab-key": value}`` mapping. :func:`load_config` turns it into a frozen
:class:`RunConfig` or raises :class:`ConfigError` whose message is one line naming each bad key:

- the core keys (:class:`RunConfig`'s fields) are validated for every run;
- a method's own keys are the fields of its :class:`MethodParams` model (declared by the method,
  ``fedlora_flwr.methods``); only the run's method's keys are validated, into ``config.params``.
  The keys of the other registered methods are accepted and not read (one WARNING line names those
  set away from their defaults, :func:`unread_changes`); a key no one declares is refused;
- a method from another package, whose keys are not in the app's ``[tool.flwr.app.config]``
  (Flower refuses unknown ``--run-config`` keys), takes them in ``method-params``, a TOML
  inline-table body (``method-params="fedprox-mu = 0.01"``);
- then the method's model-independent requirements (``fedlora_flwr.methods.Requirements``).

Every field says whether it changes results: :func:`operational` marks those that only change
where or how long a run goes, or what it logs; :data:`OPERATIONAL_KEYS` lists them for the
report's grouping and resume's checks.

Relative paths (``data-dir``, ``output-dir``, ``backbone``) resolve against the working directory of the
process that validates the config: for ``flwr run`` that is the SuperLink's working directory
(the managed local SuperLink starts in the directory where ``flwr run`` first launched it).
The ServerApp resolves them once, logs the absolute paths, records them in ``config.json`` and
sends them to the clients, so every process uses the same absolute paths.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fedlora_flwr.data import DATASETS
from fedlora_flwr.models import MODEL_FAMILIES, MODELS
from fedlora_flwr.text import TEXT_DATASETS
from fedlora_flwr.text_models import HF_PREFIX, is_pretrained_text_model, is_text_model

_PATH_KEYS = ("data-dir", "output-dir", "backbone")
#: How a client told to fail fails (``fault-kind``; strategies/faults.py says what each one does).
FaultKind = Literal["raise", "timeout", "nan", "wrong-shape", "nan-weight", "negative-weight", "forged-id", "bad-eval",
                    "scaled"]
#: How the shared tensors are aggregated (``aggregation``): the method's default, a mean, or a
#: Byzantine-robust rule (strategies/robust.py).
Aggregation = Literal["auto", "mean", "weighted", "trimmed-mean", "median", "krum"]
#: The two evaluation points (``evaluate-at``): a client's model after the server's aggregation
#: (the received shared tensors + its personal state), or right after its own local training.
AFTER_AGGREGATION, AFTER_TRAINING = "after-aggregation", "after-training"
EvalPoint = Literal["after-aggregation", "after-training"]
#: The longest run-name: the run folder's name must stay well within a file name's 255 bytes.
MAX_RUN_NAME = 120


class ConfigError(ValueError):
    """A run-config value is invalid; the message is one line naming the key(s)."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def operational(default: Any, description: str, **constraints: Any) -> Any:
    """A field that does not change what a run computes (where it writes, how long it waits, what
    it logs): runs that differ only in such keys are the same experiment, and resume may change them."""
    return Field(default, description=description, json_schema_extra={"changes_results": False}, **constraints)


class Settings(BaseModel):
    """Kebab-case keys, frozen, strict (Flower passes typed TOML values: a bool or a string is not
    silently a number), finite floats (inf and NaN are refused for every float key)."""

    model_config = ConfigDict(alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True, strict=True,
                              allow_inf_nan=False)

    @classmethod
    def keys(cls) -> set[str]:
        """The run-config keys of this model."""
        return {field.alias or name for name, field in cls.model_fields.items() if not field.exclude}


class MethodParams(Settings):
    """A method's own run-config keys (subclass it; document each field once, with its paper symbol).

    :meth:`check` holds the rules that relate them to the core keys."""

    def check(self, config: RunConfig) -> None:
        """Raise ``ValueError("key=value: reason")`` when the keys do not fit ``config``."""


class RunConfig(Settings):
    """One run of one method: the core keys; the method's own keys are in ``params``."""

    method: str = Field("fedlora", description="a registered method (fedlora_flwr.methods), built in or from an "
                        "installed package's `fedlora_flwr.methods` entry point")
    dataset: str = Field("cifar10", description="cifar10, cifar100 (torchvision: downloaded into data-dir when online, "
                         "else read from it), tiny-imagenet (the official tiny-imagenet-200/ folder in data-dir; val = "
                         "test), npz (a file with x_train, y_train, x_test, y_test, uint8 HWC), synthetic (offline, for "
                         "tests), agnews (text: a local agnews.jsonl.gz, or Hugging Face ag_news when online)")
    data_dir: str = operational("data", "the dataset's folder or file")
    partition: Literal["dirichlet", "pathological", "iid"] = Field(
        "dirichlet", description="dirichlet: q ~ Dir(α) per client, fixed sizes, test drawn with the same q (the "
        "FedLoRA paper's protocol); pathological: classes-per-client classes per client; iid")
    alpha: float = Field(0.1, gt=0, description="Dirichlet concentration α")
    classes_per_client: int = Field(2, ge=1, description="k for the pathological partition")
    train_per_client: int = Field(500, ge=1, description="training samples per client")
    test_per_client: int = Field(100, ge=1, description="test samples per client (drawn with its train distribution)")
    model: str = Field("resnet8", description="resnet8, resnet10, cnn (small and fast), cnn-1 … cnn-5 (pFedLoRA's "
                       "heterogeneous CNNs); text: minilm (pretrained all-MiniLM-L6-v2), hf:<name> (a Hugging Face "
                       "encoder), transformer-small (FedLoRA's Table 6 Transformer, from scratch)")
    model_family: str = Field("", description="when set, client k builds member k mod n of this family; `model` is unused")
    num_server_rounds: int = Field(3, ge=1, description="T: rounds (the FedLoRA paper: 300)")
    local_epochs: int = Field(5, ge=1, description="E: local epochs per round")
    batch_size: int = Field(100, ge=1, description="B: mini-batch size")
    lr: float = Field(0.1, gt=0, description="SGD learning rate (optimizers are rebuilt every phase and round)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    fraction_train: float = Field(1.0, gt=0, le=1, description="fraction of clients trained per round, sampled by "
                                  "partition id with the seed and the round")
    fraction_evaluate: float = Field(1.0, gt=0, le=1, description="fraction of the clients evaluated after aggregation "
                                     "each round (1: every client), sampled by partition id with the seed and the round "
                                     "(a draw of its own); metrics.jsonl then says fraction_evaluate and num_evaluated")
    aggregation: Aggregation = Field(
        "auto", description="mean: unweighted (FedLoRA eq. 8); weighted: by training samples; auto: the method's own "
        "rule; or a robust rule: trimmed-mean, median, krum (strategies/robust.py)")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed-mean: fraction β cut at each end, per coordinate")
    krum_byzantine: int = Field(1, ge=0, description="krum: f, the hostile clients it tolerates (scores over n − f − 2 neighbours)")
    partial_average: Literal["participants", "all-clients"] = Field(
        "participants", description="the mean over the round's participants, or over all N clients with absent ones "
        "holding the previous aggregate (FedDecomp's code)")
    seed: int = Field(1, ge=0, lt=2**32, description="partition, model init, batch order and client sampling")
    output_dir: str = operational("outputs", "where run folders are written")
    run_name: str = operational("", "the run folder's name; \"\": <method>-<dataset>-<model>-a<alpha>-s<seed>-<time>")
    resume: bool = operational(False, "continue run-name in output-dir from its last checkpoint")
    device: Literal["auto", "cpu", "cuda"] = operational("auto", "cpu, cuda, or auto (CUDA when visible)")
    augment_backend: Literal["auto", "per-sample", "batched"] = Field(
        "auto", description="training augmentation: torchvision per image, or batched on the device; auto: batched on CUDA")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="forward passes of image models under bfloat16 autocast (bf16); state stays float32")
    round_timeout: float = operational(3600.0, "seconds to wait for one round's replies", gt=0)
    fused_evaluation: bool = operational(False, "evaluate round t at the start of round t+1's train message "
                                         "(the same numbers as separate evaluate messages)")
    min_available_nodes: int = operational(0, "SuperNodes connected before round 1; 0 = num-partitions", ge=0)
    node_wait_timeout: float = operational(600.0, "seconds to wait for them, then the run stops", gt=0)
    evaluate_at: Literal["default", "after-aggregation", "after-training", "both"] = Field(
        "default", description="where clients are evaluated: after-aggregation (received shared tensors + personal "
        "state, every client every round), after-training (each client's model right after its last local training "
        "whose update was aggregated), both, or default (the method's paper point, on its page); acc_mean is the "
        "method's default point when evaluated, and eval_point in metrics.jsonl names it")
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="fraction of each client's training split held out for validation (seeded by seed "
        "and partition id; training uses the rest); clients report its accuracy with every evaluation (val_acc_* in "
        "metrics.jsonl), so the round can be chosen by validation rather than test accuracy; 0: none")
    fault_fraction: float = Field(0.0, ge=0, le=1, description="fraction of each round's participants told to fail")
    fault_kind: FaultKind = Field("raise", description="how they fail (strategies/faults.py)")
    fault_scale: float = Field(100.0, description="fault-kind 'scaled': the factor of the shared update sent "
                               "(received + factor·(trained − received))")

    # Differential privacy of the shared update (strategies/privacy.py); off while dp-clip-norm = 0.
    dp_clip_norm: float = Field(0.0, ge=0, description="C: each client's shared update is clipped to this L2 norm "
                                "(the initial C with dp-clipping = 'adaptive'); 0: no DP")
    dp_noise_multiplier: float = Field(0.0, ge=0, description="z: Gaussian noise of std z·C/m on the mean of m clipped updates")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="δ at which ε is reported")
    dp_target_epsilon: float = Field(0.0, ge=0, description="stop the run (exit 6) before a round would spend more; 0: no target")
    dp_clipping: Literal["fixed", "adaptive"] = Field("fixed", description="fixed C, or C adapted to a quantile "
                                                      "of the update norms (Andrew et al. 2021)")
    dp_target_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: γ, the fraction of updates left unclipped")
    dp_clip_lr: float = Field(0.2, gt=0, description="adaptive: η_C, C ← C·exp(−η_C(b̄ − γ))")
    dp_clipped_count_stddev: float = Field(0.0, ge=0, description="adaptive: σ_b, noise std of the unclipped "
                                           "count; 0: m/20")
    tensorboard: bool = operational(False, "also write per-round metrics to <run-dir>/tensorboard/")

    # Text data and pretrained image backbones (docs/guide/text.md).
    max_seq_length: int = Field(128, ge=2, description="tokens per text sample (truncated / padded)")
    backbone: str = Field("", description="safetensors of an image model's weights (e.g. a fedavg run's "
                          "shared.safetensors), frozen under the methods that fine-tune a pretrained model; \"\": none")
    method_params: str = Field("", description="the method's own keys as a TOML inline-table body, e.g. "
                               "'fedprox-mu = 0.01, warmup = 2': for a method from another package, whose keys "
                               "are not in the app's [tool.flwr.app.config]; recorded flat in config.json")


    #: The method's own keys, validated (set by :func:`load_config`).
    params: MethodParams = Field(default_factory=MethodParams, exclude=True)
    #: ``evaluate-at`` resolved for the run's method, its primary point first (set by :func:`load_config`).
    evaluation_points: tuple[EvalPoint, ...] = Field((), exclude=True)

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
    def _known_family(cls, value: str) -> str:
        if value and value not in MODEL_FAMILIES:
            raise ValueError(f"unknown model family {value!r}; choose one of {sorted(MODEL_FAMILIES)} or \"\"")
        return value

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must be a plain folder name (letters, digits, '.', '_', '-')")
        if len(value) > MAX_RUN_NAME:
            raise ValueError(f"is {len(value)} characters long; at most {MAX_RUN_NAME}")
        return value

    @field_validator("resume")
    @classmethod
    def _names_the_run(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("run_name"):
            raise ValueError("needs run-name: the run to continue")
        return value

    @field_validator("validation_fraction")
    @classmethod
    def _holds_out_some(cls, value: float, info: ValidationInfo) -> float:
        per_client = info.data.get("train_per_client")
        if value and per_client is not None and not 0 < round(value * per_client) < per_client:
            raise ValueError(f"holds out {round(value * per_client)} of train-per-client={per_client} samples; "
                             "validation and training each need at least one")
        return value

    @field_validator("data_dir")
    @classmethod
    def _npz_file_exists(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("dataset") == "npz" and not Path(value).is_file():
            raise ValueError(f"no npz file at {value!r} (dataset='npz' needs the .npz file)")
        return value

    @field_validator("backbone")
    @classmethod
    def _image_backbone(cls, value: str, info: ValidationInfo) -> str:
        model = info.data.get("model")
        if value and model is not None and is_text_model(model):
            raise ValueError(f"model={model!r} is a text model; backbone is for image models")
        return value

    @field_validator("precision")
    @classmethod
    def _bf16_for_image_models(cls, value: str, info: ValidationInfo) -> str:
        model = info.data.get("model")
        if value == "bf16" and model is not None and is_text_model(model):
            raise ValueError(f"bf16 autocast is for the image models; model={model!r} is a text model; use fp32")
        return value

    @field_validator("method_params")
    @classmethod
    def _toml_table(cls, value: str) -> str:
        parse_method_params(value)
        return value

    @property
    def pretrained(self) -> bool:
        """The run fine-tunes a pretrained model: a pretrained text encoder, or an image ``backbone``."""
        return is_pretrained_text_model(self.model) or bool(self.backbone)

    @property
    def text(self) -> bool:
        return self.dataset in TEXT_DATASETS

    def as_record(self) -> dict[str, Any]:
        """The config as Flower run-config keys (kebab-case), the method's keys flat beside the core
        ones (``method-params`` spelled out), e.g. for ``config.json``; :func:`load_config` reads it back."""
        record = self.model_dump(by_alias=True)
        record["method-params"] = ""
        return {**record, **self.params.model_dump(by_alias=True)}


#: Core keys that do not change what a run computes (:func:`operational`).
OPERATIONAL_KEYS = frozenset(
    field.alias for field in RunConfig.model_fields.values()
    if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("changes_results") is False
)


def flower_run_config(config: RunConfig, app_keys: Collection[str]) -> dict[str, Any]:
    """``config`` as ``flwr run --run-config`` keys of an app whose ``[tool.flwr.app.config]`` has
    ``app_keys``: the method's keys the app does not declare (a plugin's) go into ``method-params``."""
    record = config.as_record()
    extra = {key: value for key, value in record.items() if key not in app_keys}
    values = {key: value for key, value in record.items() if key in app_keys}
    values["method-params"] = ", ".join(tomli_w.dumps({key: value}).strip() for key, value in extra.items())
    return values


def parse_method_params(text: str) -> dict[str, Any]:
    """``method-params``: a TOML inline-table body (``"a-key = 1, other = 'x'"``) as a dict."""
    if not text.strip():
        return {}
    try:
        return tomllib.loads(f"table = {{ {text} }}")["table"]
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"not a TOML inline-table body ({err})") from None


def _problems(err: ValidationError, given: Mapping[str, Any]) -> list[str]:
    problems = []
    for error in err.errors():
        key = ".".join(str(part) for part in error["loc"]) or "config"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{key}={given.get(key, '<missing>')!r}: {message}")
    return problems


def load_config(run_config: Mapping[str, Any], base: Path | None = None) -> RunConfig:
    """Validate Flower's run config (kebab keys) into a :class:`RunConfig` with absolute paths and
    the method's validated keys in ``params``.

    Raises :class:`ConfigError` with one line listing every invalid key and why.
    """
    from fedlora_flwr.methods import UnknownMethod, all_param_keys, get_method

    base = (base or Path.cwd()).resolve()
    values = dict(run_config)
    for key in _PATH_KEYS:
        values.setdefault(key, RunConfig.model_fields[key.replace("-", "_")].default)
        if isinstance(values[key], str) and values[key]:
            values[key] = str((base / Path(values[key]).expanduser()).resolve())
    core_keys = RunConfig.keys()
    core = {key: value for key, value in values.items() if key in core_keys}
    problems: list[str] = []
    bad_core: set[str] = set()
    try:
        config = RunConfig.model_validate(core)
    except ValidationError as err:
        problems += _problems(err, values)
        bad_core = {str(error["loc"][0]) for error in err.errors() if error["loc"]}
        config = None

    method, method_values = None, {}
    try:
        method = get_method(str(values.get("method", RunConfig.model_fields["method"].default)))
    except UnknownMethod as err:
        problems.append(f"method={values.get('method')!r}: {err}")
    try:
        extra = parse_method_params(str(values.get("method-params", "")))
    except ValueError:
        extra = {}  # already named by RunConfig's validator
    if method is not None:
        declared = method.params.keys()
        known = all_param_keys()
        unknown = sorted(key for key in values if key not in core_keys and key not in known)
        problems += [f"{key}={values[key]!r}: unknown key (no core key, and no registered method declares it)"
                     for key in unknown]
        problems += [f"method-params: {key!r} is not a key of method {method.name!r} (its keys: {sorted(declared)})"
                     for key in extra if key not in declared]
        problems += [f"method-params: {key!r} is also given as a key of its own; give it once" for key in extra
                     if key in values and key in declared and values[key] != method.params.model_fields[key.replace('-', '_')].default]
        method_values = {key: value for key, value in values.items() if key in declared}
        method_values.update({key: value for key, value in extra.items() if key in declared})
        try:
            params = method.params.model_validate(method_values)
        except ValidationError as err:
            problems += _problems(err, method_values)
            params = None
        if params is not None:
            # The cross-key rules also run when a core key is bad (on the valid ones, defaults for the
            # bad ones), so that one line names every problem.
            valid = {alias: value for alias, value in core.items() if alias not in bad_core}
            checked = (config.model_copy(update={"params": params}) if config is not None else RunConfig.model_construct(
                params=params, **{name: valid.get(field.alias, field.default)
                                  for name, field in RunConfig.model_fields.items() if name != "params"}))
            try:
                params.check(checked)
                if config is not None:
                    method.requires.check_config(checked, method.name)
                    config = checked.model_copy(update={"evaluation_points": method.evaluation_points(checked)})
            except ValueError as err:
                problems.append(str(err))
    if problems:
        raise ConfigError("invalid run config: " + "; ".join(problems))
    return config


def unread_changes(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of other methods that ``run_config`` sets away from their defaults: the run does
    not read them (the ServerApp names them in one WARNING line)."""
    from fedlora_flwr.methods import all_param_defaults, get_method

    method = get_method(str(run_config.get("method", RunConfig.model_fields["method"].default)))
    read = RunConfig.keys() | method.params.keys()
    defaults = all_param_defaults()
    return {key: value for key, value in run_config.items()
            if key not in read and key in defaults and value != defaults[key]}
