"""The config base: nested frozen dataclasses, validation naming the field, overrides."""

import dataclasses
from typing import Literal

import pytest

from jaxsql.cli import main
from jaxsql.config import apply_overrides, from_dict, load_config, require, to_dict
from jaxsql.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    warmup: int = 0

    def __post_init__(self):
        require(self.lr > 0, "Optim", "lr", "must be > 0")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str = "run"
    mode: Literal["grpo", "sft"] = "grpo"
    optim: Optim = Optim()
    tags: tuple[str, ...] = ()
    seed: int | None = None


def test_defaults_and_nested():
    cfg = from_dict(Run, {"optim": {"lr": 0.5}, "tags": ["a", "b"]})
    assert cfg.optim == Optim(lr=0.5, warmup=0)
    assert cfg.tags == ("a", "b")
    assert to_dict(cfg) == {"name": "run", "mode": "grpo", "optim": {"lr": 0.5, "warmup": 0},
                            "tags": ["a", "b"], "seed": None}
    hash(cfg)  # frozen configs can be static jit arguments


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optim": {"lr": -1.0}}, "Optim.lr: must be > 0"),
        ({"optim": {"lr": "fast"}}, "Run.optim.lr: expected a number"),
        ({"optim": {"warmup": 1.5}}, "Run.optim.warmup: expected an integer"),
        ({"mode": "ppo"}, "Run.mode: must be one of"),
        ({"optimizer": {}}, "Run: unknown key(s) ['optimizer']"),
        ({"optim": {"beta": 1}}, "Run.optim: unknown key(s) ['beta']"),
        ({"tags": "a"}, "Run.tags: expected a list"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Run, data)
    assert message in str(e.value)


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: base\noptim:\n  lr: 0.1\n")
    cfg = load_config(Run, path, ["optim.warmup=10", "seed=3", "tags=[x]"])
    assert cfg == Run(name="base", optim=Optim(lr=0.1, warmup=10), seed=3, tags=("x",))
    # YAML 1.1 reads 1e-5 as the string "1e-5": still a number for a float field.
    assert load_config(Run, path, ["optim.lr=1e-5"]).optim.lr == 1e-5
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Run, path, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Run, tmp_path / "bad.yaml")


def test_cli_without_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: jaxsql" in capsys.readouterr().err


def test_saved_settings_are_read_and_compared(tmp_path):
    from jaxsql.config import changed_settings, read_saved_settings
    from jaxsql.errors import JaxsqlError

    good = tmp_path / "meta.json"
    good.write_text('{"a": 1, "b": 2}')
    saved = read_saved_settings(good, "label settings")
    assert changed_settings(saved, {"a": 1, "b": 3, "c": 0}) == ["b", "c"]
    assert changed_settings(saved, {"a": 1, "b": 3, "c": 0}, keys=["a", "c"]) == ["c"]
    assert changed_settings(saved, {"a": 1, "b": 2}) == []
    for text in ("{not json", "[1, 2]", "\xff"):
        bad = tmp_path / "bad.json"
        bad.write_bytes(text.encode("latin-1"))
        with pytest.raises(JaxsqlError, match=r"bad\.json: unreadable label settings .*choose another --out"):
            read_saved_settings(bad, "label settings")
