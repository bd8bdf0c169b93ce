from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from fedsplit.configio import ConfigError, config_to_dict, dump_config, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class Mode(enum.Enum):
    SPLIT = "split"
    CENTRAL = "central"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    dtype: Literal["float32", "bfloat16"] = "float32"
    cut_layers: tuple[int, int] = (1, 1)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-4
    steps: int = 10
    shuffle: bool = True
    data: Path = Path("data/train.jsonl")
    warmup: int | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    mode: Mode = Mode.SPLIT
    seed: int = 0
    tags: tuple[str, ...] = ()


MODEL = '[model]\nname = "m"\n'  # the one required key


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_load_fills_nested_dataclasses_with_typed_values(tmp_path: Path) -> None:
    # Arrange
    path = _write(
        tmp_path,
        """
seed = 3
mode = "central"
tags = ["a", "b"]

[model]
name = "tiny-llama"
dtype = "bfloat16"
cut_layers = [2, 3]

[train]
lr = 1          # an int is a fine float
data = "/data/x.jsonl"
warmup = 5
extra = {clip = 1.5}
""",
    )

    # Act
    config = load_config(RunConfig, path)

    # Assert
    assert config == RunConfig(
        model=ModelConfig(name="tiny-llama", dtype="bfloat16", cut_layers=(2, 3)),
        train=TrainConfig(lr=1.0, data=Path("/data/x.jsonl"), warmup=5, extra={"clip": 1.5}),
        mode=Mode.CENTRAL,
        seed=3,
        tags=("a", "b"),
    )
    assert isinstance(config.train.lr, float) and isinstance(config.train.data, Path)


def test_missing_sections_and_keys_take_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\nname = "m"\n')

    config = load_config(RunConfig, path)

    assert config.train == TrainConfig()
    assert config.model.lora_targets == ["q_proj", "v_proj"]


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "seed = 1\n")

    expected = r"run.toml: key 'model.name': expected a value of type str, got nothing"
    with pytest.raises(ConfigError, match=expected):
        load_config(RunConfig, path)


def test_unknown_key_names_file_key_and_valid_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\nname = "m"\n[train]\nlrr = 0.1\n')

    with pytest.raises(ConfigError) as caught:
        load_config(RunConfig, path)

    message = str(caught.value)
    assert str(path) in message
    assert "unknown key 'train.lrr'" in message
    assert "valid keys in [train]: lr, steps, shuffle, data, warmup, extra" in message


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\nname = "m"\n[optimizer]\nlr = 0.1\n')

    expected = r"unknown section 'optimizer'; valid keys in the top level: model, train, mode, seed"
    with pytest.raises(ConfigError, match=expected):
        load_config(RunConfig, path)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[model]\nname = 3\n', r"key 'model.name': expected str, got int 3"),
        (
            MODEL + 'dtype = "fp8"\n',
            r"key 'model.dtype': expected one of 'float32', 'bfloat16', got str 'fp8'",
        ),
        (MODEL + 'cut_layers = [1]\n', r"key 'model.cut_layers': expected 2 items"),
        (MODEL + 'cut_layers = [1, "x"]\n', r"'model.cut_layers\[1\]': expected int"),
        (MODEL + '[train]\nsteps = 1.5\n', r"'train.steps': expected int, got float 1.5"),
        (MODEL + '[train]\nsteps = true\n', r"'train.steps': expected int, got bool"),
        (MODEL + '[train]\nshuffle = 1\n', r"'train.shuffle': expected bool, got int 1"),
        (MODEL + '[train]\nwarmup = "5"\n', r"'train.warmup': expected int \| None, got str"),
        (MODEL + '[train]\nextra = {a = "x"}\n', r"'train.extra.a': expected float, got str"),
        ('model = 3\n', r"key 'model': expected a table for ModelConfig, got int 3"),
        ('mode = "async"\n' + MODEL, r"'mode': expected one of 'split', 'central', got str"),
    ],
)
def test_type_errors_name_the_key_expected_and_got(tmp_path: Path, toml: str, message: str) -> None:
    path = _write(tmp_path, toml)

    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, path)


def test_post_init_errors_surface_with_their_location(tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\nname = "m"\n[train]\nlr = -1.0\n')

    expected = r"run.toml: \[train\] TrainConfig: lr: expected > 0, got -1.0"
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(RunConfig, path)

    assert isinstance(caught.value.__cause__, ValueError)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[model\n")

    with pytest.raises(ConfigError, match=r"run.toml: expected valid TOML"):
        load_config(RunConfig, path)


def test_overrides_are_parsed_as_toml_literals_or_text(tmp_path: Path) -> None:
    # Arrange
    path = _write(tmp_path, '[model]\nname = "m"\n[train]\nlr = 0.1\nsteps = 3\n')
    overrides = [
        "train.lr=2e-4",
        "train.steps = 7",
        "train.shuffle=false",
        "model.name=123",  # a str field keeps the text
        "model.cut_layers=[4, 5]",
        "train.data=runs/x.jsonl",  # not TOML: plain text
        "train.extra.clip=0.5",
        "seed=9",
        "mode=central",
    ]

    # Act
    config = load_config(RunConfig, path, overrides)

    # Assert
    assert config.train == TrainConfig(
        lr=2e-4, steps=7, shuffle=False, data=Path("runs/x.jsonl"), extra={"clip": 0.5}
    )
    assert config.model.name == "123" and config.model.cut_layers == (4, 5)
    assert config.seed == 9 and config.mode is Mode.CENTRAL


def test_overrides_without_a_file_and_none_for_optional() -> None:
    config = load_config(RunConfig, None, ["model.name=m", "train.warmup=none"])

    assert config.model.name == "m" and config.train.warmup is None


def test_table_override_merges_into_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[model]\nname = "m"\n[train]\nlr = 0.1\nsteps = 3\n')

    config = load_config(RunConfig, path, ["train={steps = 8}"])

    assert (config.train.lr, config.train.steps) == (0.1, 8)


def test_unknown_override_key_lists_the_valid_keys() -> None:
    expected = r"override 'train.lrr=1': unknown key 'train.lrr'; valid keys in \[train\]: lr, "
    with pytest.raises(ConfigError, match=expected):
        load_config(RunConfig, None, ["model.name=m", "train.lrr=1"])


def test_bad_override_value_names_the_override() -> None:
    expected = r"override 'train.steps=many': key 'train.steps': expected int, got str 'many'"
    with pytest.raises(ConfigError, match=expected):
        load_config(RunConfig, None, ["model.name=m", "train.steps=many"])


def test_post_init_error_from_an_override_names_it() -> None:
    expected = r"with overrides \['train.lr=-3'\]: \[train\] TrainConfig: lr: expected > 0"
    with pytest.raises(ConfigError, match=expected):
        load_config(RunConfig, None, ["model.name=m", "train.lr=-3"])


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=3", "seed.x=1"])
def test_malformed_overrides_are_rejected(override: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        load_config(RunConfig, None, ["model.name=m", override])


def test_dump_then_load_gives_an_equal_object(tmp_path: Path) -> None:
    # Arrange
    original = RunConfig(
        model=ModelConfig(
            name='tiny "quoted" \\ name\n',
            dtype="bfloat16",
            cut_layers=(2, 5),
            lora_targets=["c_attn"],
        ),
        train=TrainConfig(
            lr=3e-5,
            steps=100,
            shuffle=False,
            data=Path("/tmp/d ata.jsonl"),
            warmup=None,
            extra={"a.b": 1.0, "inf": float("inf")},
        ),
        mode=Mode.CENTRAL,
        seed=42,
        tags=("x", "y"),
    )

    # Act
    text = dump_config(original)
    path = _write(tmp_path, text)
    loaded = load_config(RunConfig, path)

    # Assert
    assert loaded == original
    assert tomllib.loads(text)["model"]["cut_layers"] == [2, 5]


def test_dump_writes_top_level_keys_before_sections() -> None:
    text = dump_config(RunConfig(model=ModelConfig(name="m")))

    assert text.index("seed = 0") < text.index("[model]") < text.index("[train]")
    assert 'mode = "split"' in text
    assert "warmup" not in text  # None is omitted: its default is None


def test_dump_refuses_a_none_that_would_not_round_trip() -> None:
    @dataclass
    class WithDefault:
        steps: int | None = 5

    expected = r"key 'steps': cannot write None to TOML; omitting it would load the default \(5\)"
    with pytest.raises(ConfigError, match=expected):
        dump_config(WithDefault(steps=None))


def test_config_to_dict_gives_plain_data() -> None:
    config = RunConfig(model=ModelConfig(name="m"), train=TrainConfig(data=Path("d.jsonl")))

    data = config_to_dict(config)

    assert data["model"] == {
        "name": "m",
        "dtype": "float32",
        "cut_layers": [1, 1],
        "lora_targets": ["q_proj", "v_proj"],
    }
    assert data["train"]["data"] == "d.jsonl" and data["train"]["warmup"] is None
    assert data["mode"] == "split" and data["tags"] == []


def test_non_dataclass_inputs_are_type_errors() -> None:
    with pytest.raises(TypeError, match="expected a dataclass type"):
        load_config(dict, None)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="expected a dataclass instance"):
        config_to_dict({"a": 1})
