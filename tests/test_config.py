"""The run configuration (fedlora_flwr.config): pyproject defaults, key coverage, validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import app_defaults

from clients.fedlora import FedLoRAParams
from fedlora_flwr.config import OPERATIONAL_KEYS, ConfigError, RunConfig, load_config, unread_changes
from fedlora_flwr.methods import all_param_keys, registry


def _aliases() -> set[str]:
    """The keys validated for the default method, fedlora: the core keys and FedLoRA's own."""
    return RunConfig.keys() | FedLoRAParams.keys()


def _error(tmp_path: Path, **overrides) -> str:
    """The ConfigError message for the defaults + ``overrides`` (kebab keys via ``_`` → ``-``)."""
    values = {**app_defaults(), **{key.replace("_", "-"): value for key, value in overrides.items()}}
    with pytest.raises(ConfigError) as info:
        load_config(values, base=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, f"message must be one line: {message!r}"
    return message


# --------------------------------------------------------------------------- defaults


def test_pyproject_defaults_are_the_paper_cifar10_setup(tmp_path):
    config = load_config(app_defaults(), base=tmp_path)
    assert isinstance(config, RunConfig)
    # FedLoRA paper §4.1 / FedDecomp's options.py: E=5, E_lora=2, B=100, SGD lr .1 m .9, (R_c, R_l)=(.6, .6)
    # on CIFAR-10 ResNet-8, α=.1, 500/100 samples per client, Dirichlet partition, method FedLoRA.
    assert config.local_epochs == 5
    assert config.params.lora_epochs == 2
    assert config.batch_size == 100
    assert config.lr == pytest.approx(0.1)
    assert config.momentum == pytest.approx(0.9)
    assert config.params.rank_conv == pytest.approx(0.6)
    assert config.params.rank_linear == pytest.approx(0.6)
    assert config.alpha == pytest.approx(0.1)
    assert (config.train_per_client, config.test_per_client) == (500, 100)
    assert config.model == "resnet8"
    assert config.dataset == "cifar10"
    assert config.partition == "dirichlet"
    assert config.method == "fedlora"
    assert config.params.lora_schedule == "alternating"
    assert config.fraction_train == pytest.approx(1.0)  # full participation (the paper's frac 1.0)
    assert config.partial_average == "participants"


def test_pyproject_defaults_equal_the_model_defaults(tmp_path):
    """The field defaults of RunConfig and the pyproject table must not drift apart."""
    from_pyproject = load_config(app_defaults(), base=tmp_path).as_record()
    from_fields = {**RunConfig().as_record(), **FedLoRAParams().model_dump(by_alias=True)}
    for key in ("data-dir", "output-dir"):  # resolved against the base only when given
        assert Path(from_pyproject.pop(key)) == (tmp_path / from_fields.pop(key)).resolve()
    assert from_pyproject == from_fields


def test_omitted_path_keys_are_resolved_too(tmp_path):
    config = load_config({}, base=tmp_path)
    assert Path(config.output_dir).is_absolute() and Path(config.data_dir).is_absolute()


def test_every_pyproject_key_is_a_core_or_method_key_and_vice_versa():
    keys = set(app_defaults())
    declared = RunConfig.keys() | all_param_keys()
    assert keys == declared, f"only in pyproject: {sorted(keys - declared)}; only declared: {sorted(declared - keys)}"


def test_every_built_in_methods_defaults_are_the_pyproject_defaults(tmp_path):
    defaults = app_defaults()
    for name, method in registry().items():
        for key, value in method.params().model_dump(by_alias=True).items():
            assert defaults[key] == value, f"{name}: {key} defaults to {value!r}, pyproject says {defaults[key]!r}"


def test_as_record_holds_the_core_keys_and_the_methods_own(tmp_path):
    record = load_config(app_defaults(), base=tmp_path).as_record()
    assert set(record) == _aliases()
    assert record["rank-conv"] == pytest.approx(0.6) and record["lora-epochs"] == 2
    assert "fedamp-lambda" not in record  # another method's key: not read, not recorded
    assert load_config(record, base=tmp_path) == load_config(app_defaults(), base=tmp_path)


def test_config_is_frozen(tmp_path):
    config = load_config(app_defaults(), base=tmp_path)
    with pytest.raises(Exception):
        config.lr = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- one bad key


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rank-conv", 0.0),
        ("rank-conv", 1.5),
        ("rank-linear", 0.0),
        ("method", "fedprox-typo"),
        ("dataset", "imagenet"),
        ("model", "vgg16"),
        ("partition", "shards"),
        ("alpha", 0.0),
        ("alpha", -1.0),
        ("fraction-train", 0.0),
        ("run-name", "a/b"),
        ("run-name", "../escape"),
        ("batch-size", 0),
        ("local-epochs", 0),
        ("momentum", 1.0),
    ],
)
def test_bad_value_names_its_key(tmp_path, key, value):
    message = _error(tmp_path, **{key: value})
    assert key in message, message
    # Only the offending key is blamed.
    others = _aliases() - {key}
    blamed = {other for other in others if f"{other}=" in message or f"{other}:" in message}
    assert not blamed, f"{message!r} also blames {blamed}"


def test_lora_epochs_above_local_epochs_is_rejected(tmp_path):
    message = _error(tmp_path, **{"local-epochs": 2, "lora-epochs": 3})
    assert "lora-epochs" in message
    # E_lora = E is allowed (σ never trained), and so is E_lora = 0 (FedAvg; paper §3.4).
    assert load_config({**app_defaults(), "local-epochs": 2, "lora-epochs": 2}, base=tmp_path).params.lora_epochs == 2
    assert load_config({**app_defaults(), "lora-epochs": 0}, base=tmp_path).params.lora_epochs == 0


@pytest.mark.parametrize("method", sorted(registry()))
def test_every_method_starts_with_one_local_epoch_and_its_defaults(tmp_path, method):
    """A key a method does not read never blocks it: lora-epochs=2 > local-epochs=1 stops only FedLoRA,
    the one method that reads both (E_lora ≤ E, paper §3.4), with one line naming its key."""
    text = registry()[method].requires.pretrained == "required"
    values = {**app_defaults(), **({"dataset": "agnews", "model": "minilm"} if text else {}), "method": method,
              "local-epochs": 1}
    if method == "fedlora":
        assert "lora-epochs=2: 2 exceeds local-epochs=1" in _error(tmp_path, **values)
        values["lora-epochs"] = 1
    assert load_config(values, base=tmp_path).method == method


def test_keys_of_other_methods_are_not_validated_but_named_when_changed(tmp_path):
    values = {**app_defaults(), "method": "fedavg", "fedamp-lambda": -1.0, "lora-epochs": 9}
    assert load_config(values, base=tmp_path).params.keys() == set()
    assert unread_changes(values) == {"fedamp-lambda": -1.0, "lora-epochs": 9}
    assert "fedamp-lambda" in _error(tmp_path, method="fedamp", **{"fedamp-lambda": -1.0})


def test_method_params_carries_a_methods_keys(tmp_path):
    config = load_config({**app_defaults(), "method": "fedamp", "method-params": "fedamp-lambda = 0.25"}, base=tmp_path)
    assert config.params.fedamp_lambda == 0.25 and config.as_record()["fedamp-lambda"] == 0.25
    assert "not a key of method 'fedamp'" in _error(tmp_path, method="fedamp", **{"method-params": "lora-r = 4"})
    assert "not a TOML inline-table body" in _error(tmp_path, **{"method-params": "a = = 1"})
    assert "give it once" in _error(tmp_path, method="fedamp", **{"fedamp-lambda": 2.0, "method-params": "fedamp-lambda = 3.0"})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("key", ["lr", "round-timeout", "alpha", "rank-conv"])
def test_every_float_key_refuses_inf_and_nan(tmp_path, key, value):
    assert key in _error(tmp_path, **{key: value})


def test_operational_keys_are_marked_on_their_fields():
    assert {"output-dir", "run-name", "data-dir", "device", "round-timeout", "tensorboard", "resume",
            "fused-evaluation", "min-available-nodes", "node-wait-timeout"} == OPERATIONAL_KEYS


def test_npz_dataset_needs_an_existing_file(tmp_path):
    message = _error(tmp_path, dataset="npz", **{"data-dir": "missing/cifar10.npz"})
    assert "data-dir" in message
    assert str(tmp_path / "missing" / "cifar10.npz") in message  # the resolved path is shown
    # A directory is not a file either.
    (tmp_path / "folder.npz").mkdir()
    assert "data-dir" in _error(tmp_path, dataset="npz", **{"data-dir": "folder.npz"})
    # An existing file passes.
    (tmp_path / "ok.npz").write_bytes(b"")
    assert load_config({**app_defaults(), "dataset": "npz", "data-dir": "ok.npz"}, base=tmp_path).dataset == "npz"


def test_unknown_extra_key_is_rejected(tmp_path):
    message = _error(tmp_path, **{"learning-rate": 0.01})
    assert "learning-rate" in message


def test_snake_case_key_from_flower_is_not_silently_accepted(tmp_path):
    """Flower passes kebab keys; a snake_case spelling in an override must not be dropped silently."""
    with pytest.raises(ConfigError) as info:
        load_config({**app_defaults(), "local_epochs": 1, "local-epochs": 5}, base=tmp_path)
    assert "local_epochs" in str(info.value)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_outside_numpy_range_is_rejected(tmp_path, seed):
    assert "seed" in _error(tmp_path, seed=seed)


# --------------------------------------------------------------------------- several bad keys


def test_several_bad_keys_are_all_named_in_one_line(tmp_path):
    message = _error(tmp_path, **{"rank-conv": 0.0, "batch-size": 0, "alpha": -1.0, "run-name": "a/b"})
    for key in ("rank-conv", "batch-size", "alpha", "run-name"):
        assert key in message, f"{key} missing from {message!r}"
    message = _error(tmp_path, **{"method": "nope", "batch-size": 0})
    for key in ("method", "batch-size"):
        assert key in message, f"{key} missing from {message!r}"


def test_cross_field_errors_are_named_together_with_field_errors(tmp_path):
    message = _error(tmp_path, **{"batch-size": 0, "local-epochs": 2, "lora-epochs": 3})
    assert "batch-size" in message
    assert "lora-epochs" in message


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_base(tmp_path):
    base = tmp_path / "launch"
    base.mkdir()
    config = load_config({**app_defaults(), "data-dir": "data/cifar", "output-dir": "../runs"}, base=base)
    assert Path(config.data_dir) == (base / "data" / "cifar").resolve()
    assert Path(config.output_dir) == (tmp_path / "runs").resolve()
    assert Path(config.data_dir).is_absolute() and Path(config.output_dir).is_absolute()


def test_absolute_paths_are_kept(tmp_path):
    data = tmp_path / "elsewhere" / "data"
    config = load_config({**app_defaults(), "data-dir": str(data)}, base=tmp_path / "other")
    assert Path(config.data_dir) == data.resolve()


def test_default_base_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(app_defaults())
    assert Path(config.output_dir) == (tmp_path / "outputs").resolve()
    assert Path(config.data_dir) == (tmp_path / "data").resolve()


def test_load_config_does_not_mutate_its_input(tmp_path):
    values = {**app_defaults(), "output-dir": "rel"}
    snapshot = dict(values)
    load_config(values, base=tmp_path)
    assert values == snapshot


def test_evaluate_at_resolves_to_the_methods_paper_point_and_refuses_what_a_method_cannot_mean():
    def points(method: str, evaluate_at: str, **extra) -> tuple[str, ...]:
        return load_config({**app_defaults(), "method": method, "evaluate-at": evaluate_at, **extra}).evaluation_points

    after_training = {name for name, method in registry().items() if method.evaluate_at == "after-training"}
    assert after_training == {"pfedsd", "pfedlora", "fedavg-adapter"}
    assert points("fedlora", "default") == ("after-aggregation",)
    assert points("pfedsd", "default") == ("after-training",)
    assert points("fedlora", "both") == ("after-aggregation", "after-training")
    assert points("pfedsd", "both") == ("after-training", "after-aggregation")
    assert points("pfedsd", "after-aggregation") == ("after-aggregation",)
    assert points("local-lora", "after-training") == ("after-training",)
    for choice in ("after-training", "both"):
        with pytest.raises(ConfigError, match=r"^invalid run config: evaluate-at='[a-z-]+': method='lora-ft' cannot "
                           r"be evaluated after-training \(it evaluates after-aggregation only\)$"):
            points("lora-ft", choice)
    with pytest.raises(ConfigError, match="evaluate-at='last'"):
        points("fedlora", "last")
