"""The config engine (megatron_lopd/config.py): one set of rules for files and overrides.

Cases marked "was:" are where the training and pipeline parsers used to read the same
input differently; the engine's answer is asserted.
"""

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from megatron_lopd.config import apply_overrides, from_dict, load_file, to_dict
from megatron_lopd.errors import ConfigError


@dataclass
class Inner:
    ratio: float = 0.5
    name: str = "x"
    tags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Quoted:  # string annotations, as under `from __future__ import annotations`
    count: "int" = 1
    limit: "int | None" = None


@dataclass
class Root:  # real annotations and Optional[X], as nemo-run needs them
    steps: int = 10
    flag: bool = False
    label: str = "auto"
    lr: Optional[float] = None
    thinking: Optional[str] = None
    sizes: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    tuned: Inner = field(default_factory=lambda: Inner(name="tuned"))
    quoted: Quoted = field(default_factory=Quoted)


def _get(config: Root, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize(
    "override, key, expected",
    [
        *[(f"flag={word}", "flag", True) for word in ("true", "TRUE", "yes", "on", "1")],  # was: pipeline only true/false
        *[(f"flag={word}", "flag", False) for word in ("false", "no", "Off", "0")],
        ("steps=7", "steps", 7),
        ("steps=1e3", "steps", 1000),  # was: pipeline refused 1e3 for an int
        ("steps=+5", "steps", 5),
        ("steps=12345678901234567891", "steps", 12345678901234567891),  # exact, not through a float
        ("lr=1e-5", "lr", 1e-5),
        ("lr=3", "lr", 3.0),
        *[(f"lr={word}", "lr", None) for word in ("none", "null", "NULL", "")],  # was: training had no Optional; pipeline refused empty
        ("thinking=off", "thinking", "off"),
        ("thinking=none", "thinking", None),
        ("label=none", "label", "none"),  # a plain str keeps its text (checkpoint.resume=none is a value)
        ("label=null", "label", "null"),
        ("label=", "label", ""),
        ("label=123", "label", "123"),  # was: pipeline made it the int 123, then refused it
        ("label=a=b", "label", "a=b"),
        ("sizes=[1, 2e0]", "sizes", [1, 2]),
        ("sizes=[]", "sizes", []),
        ('inner.tags=["a", "b,c"]', "inner.tags", ["a", "b,c"]),
        ("inner.env.NCCL_DEBUG=INFO", "inner.env", {"NCCL_DEBUG": "INFO"}),
        ("inner.env.N=1", "inner.env", {"N": "1"}),  # was: pipeline stored the int 1 in a dict[str, str]
        ('inner.env={"A": "1"}', "inner.env", {"A": "1"}),
        ("extra.data.seq_length=4096", "extra", {"data.seq_length": "4096"}),  # was: pipeline nested {"data": {...}}
        ("quoted.count=1e2", "quoted.count", 100),
        ("quoted.limit=null", "quoted.limit", None),
        ("quoted.limit=3", "quoted.limit", 3),
        ("tuned.ratio=0.25", "tuned.name", "tuned"),
    ],
)
def test_override_values(override, key, expected):
    value = _get(apply_overrides(Root(), [override]), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=1.5", r"steps='1.5' is not an integer"),
        ("steps=true", "steps='true' is not an integer"),
        ("steps=", "steps='' is not an integer"),
        ("flag=maybe", "flag='maybe' is not a boolean"),
        ("lr=fast", "lr='fast' is not a number"),
        ("inner.ratioo=1", r"unknown config key 'inner.ratioo' \(fix: did you mean ratio\?\)"),  # was: pipeline named no close key
        ("zzz=1", "unknown config key 'zzz' .*known keys: steps, flag"),
        ("inner=3", r"inner is a section, not a value \(fix: set one of its fields: inner.FIELD=VALUE\)"),
        ("steps.x=1", "steps is a value, not a section"),
        ("steps", "not key=value"),
        ("=3", "not key=value"),
        ("sizes=1,2", r"sizes='1,2' is not a list \(fix: write it in JSON"),
        ("sizes=[1.5]", r"sizes\[0\]=1.5 is not an integer"),
        ("inner.env={bad", "inner.env='{bad' is not a dict"),
        ("quoted.count=x", "quoted.count='x' is not an integer"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        apply_overrides(Root(), [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "data, key, expected",
    [
        ({"steps": 1000.0}, "steps", 1000),  # was: pipeline refused 1000.0 for an int
        ({"steps": "1e3"}, "steps", 1000),  # a file's text reads as an override's
        ({"flag": 1}, "flag", True),
        ({"flag": "off"}, "flag", False),
        ({"label": True}, "label", "true"),  # was: training made it "True"; pipeline refused it
        ({"label": 3}, "label", "3"),
        ({"label": None}, "label", ""),  # YAML's `label:`; was: pipeline refused it
        ({"lr": None}, "lr", None),
        ({"lr": 1}, "lr", 1.0),
        ({"inner": {"name": "y"}}, "inner.ratio", 0.5),
        ({"tuned": {"ratio": 1}}, "tuned.name", "tuned"),  # was: pipeline took the class default ("x")
        ({"inner": {"env": {"K": 1}}}, "inner.env", {"K": "1"}),
        ({"quoted": {"limit": 4.0}}, "quoted.limit", 4),
    ],
)
def test_file_values(data, key, expected):
    value = _get(from_dict(Root, data), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": 2.5}, "steps=2.5 is not an integer"),
        ({"steps": True}, "steps=True is not an integer"),
        ({"flag": 2}, "flag=2 is not a boolean"),
        ({"label": 1.10}, "label=1.1 is not a string"),  # YAML would have dropped the 0 of 1.10
        ({"label": ["a"]}, "is not a string"),
        ({"sizes": "3"}, "sizes='3' is not a list"),
        ({"inner": 3}, "inner is a section, got 3"),
        ({"inner": {"nme": 1}}, r"unknown config key 'inner.nme' \(fix: did you mean name\?\)"),  # was: pipeline: "unknown key(s) ['nme']"
    ],
)
def test_file_value_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Root, data)


def test_where_starts_errors_and_base_fills_missing_keys():
    with pytest.raises(ConfigError, match=r"^f.json: unknown config key 'x'"):
        from_dict(Root, {"x": 1}, where="f.json")
    with pytest.raises(ConfigError, match="f.json: the top level must be a mapping"):
        from_dict(Root, [1], where="f.json")
    base = Root(steps=3, inner=Inner(name="b", tags=["t"]))
    config = from_dict(Root, {"inner": {"ratio": 2}}, base=base)
    assert (config.steps, config.inner.name, config.inner.ratio, config.inner.tags) == (3, "b", 2.0, ["t"])
    config.inner.tags.append("u")
    assert base.inner.tags == ["t"]  # copied, not shared


def test_overrides_leave_the_input_alone_and_round_trip():
    base = Root()
    config = apply_overrides(base, ["steps=3", "inner.env.A=1", "inner.env.B=2", "sizes=[4]", "lr=1e-6"])
    assert base == Root()
    assert config.inner.env == {"A": "1", "B": "2"}  # entries add up
    assert from_dict(Root, json.loads(json.dumps(to_dict(config)))) == config


def test_files_json_yaml_toml(tmp_path):
    expected = {"steps": 3, "inner": {"name": "y", "tags": ["a"]}}
    (tmp_path / "c.json").write_text(json.dumps(expected))
    (tmp_path / "c.yaml").write_text("steps: 3\ninner:\n  name: y\n  tags: [a]\n")
    (tmp_path / "c.yml").write_text("{steps: 3, inner: {name: y, tags: [a]}}\n")
    (tmp_path / "c.toml").write_text('steps = 3\n[inner]\nname = "y"\ntags = ["a"]\n')
    for name in ("c.json", "c.yaml", "c.yml", "c.toml"):
        assert load_file(tmp_path / name) == expected, name
    (tmp_path / "empty.yaml").write_text("")
    assert load_file(tmp_path / "empty.yaml") == {}


def test_file_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    (tmp_path / "broken.toml").write_text("a = \n")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "c.ini").write_text("")
    cases = [
        ("broken.yaml", "broken.yaml: cannot parse"),
        ("broken.toml", "broken.toml: cannot parse"),
        ("list.json", "list.json: the top level must be a mapping"),
        ("missing.json", "missing.json: config file not found"),
        ("c.ini", "unknown config format '.ini'"),  # was: pipeline read any other suffix as JSON
    ]
    for name, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            load_file(tmp_path / name)
        assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    with pytest.raises(ConfigError, match="needs PyYAML"):
        load_file(tmp_path / "broken.yaml")
