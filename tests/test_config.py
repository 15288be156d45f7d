"""The run configuration (fedlora_flwr.config): pyproject defaults, key coverage, validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import app_defaults

from fedlora_flwr.config import ConfigError, RunConfig, load_config


def _aliases() -> set[str]:
    return {field.alias or name for name, field in RunConfig.model_fields.items()}


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
    # METHODS.md A.8: E=5, E_lora=2, B=100, SGD lr .1 m .9, (R_c, R_l)=(.6, .6) on CIFAR-10 ResNet-8,
    # α=.1, 500/100 samples per client (A.7), Dirichlet partition, method FedLoRA.
    assert config.local_epochs == 5
    assert config.lora_epochs == 2
    assert config.batch_size == 100
    assert config.lr == pytest.approx(0.1)
    assert config.momentum == pytest.approx(0.9)
    assert config.rank_conv == pytest.approx(0.6)
    assert config.rank_linear == pytest.approx(0.6)
    assert config.alpha == pytest.approx(0.1)
    assert (config.train_per_client, config.test_per_client) == (500, 100)
    assert config.model == "resnet8"
    assert config.dataset == "cifar10"
    assert config.partition == "dirichlet"
    assert config.method == "fedlora"
    assert config.lora_schedule == "alternating"
    assert config.fraction_train == pytest.approx(1.0)  # full participation (A.8)
    assert config.partial_average == "participants"


def test_pyproject_defaults_equal_the_model_defaults(tmp_path):
    """The field defaults of RunConfig and the pyproject table must not drift apart."""
    from_pyproject = load_config(app_defaults(), base=tmp_path).as_record()
    from_fields = RunConfig().as_record()
    for key in ("data-dir", "output-dir"):  # resolved against the base only when given
        assert Path(from_pyproject.pop(key)) == (tmp_path / from_fields.pop(key)).resolve()
    assert from_pyproject == from_fields


def test_omitted_path_keys_are_resolved_too(tmp_path):
    config = load_config({}, base=tmp_path)
    assert Path(config.output_dir).is_absolute() and Path(config.data_dir).is_absolute()


def test_every_pyproject_key_is_a_field_and_vice_versa():
    keys = set(app_defaults())
    assert keys == _aliases(), (
        f"only in pyproject: {sorted(keys - _aliases())}; only in RunConfig: {sorted(_aliases() - keys)}"
    )


def test_as_record_uses_the_run_config_keys(tmp_path):
    record = load_config(app_defaults(), base=tmp_path).as_record()
    assert set(record) == set(app_defaults())
    assert record["rank-conv"] == pytest.approx(0.6) and record["lora-epochs"] == 2


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
    # E_lora = E is allowed (σ never trained, METHODS.md A.4), and so is E_lora = 0 (FedAvg).
    assert load_config({**app_defaults(), "local-epochs": 2, "lora-epochs": 2}, base=tmp_path).lora_epochs == 2
    assert load_config({**app_defaults(), "lora-epochs": 0}, base=tmp_path).lora_epochs == 0


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
    message = _error(tmp_path, **{"rank-conv": 0.0, "batch-size": 0, "method": "nope", "alpha": -1.0, "run-name": "a/b"})
    for key in ("rank-conv", "batch-size", "method", "alpha", "run-name"):
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
