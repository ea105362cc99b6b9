"""Every bad input is one line and exit 2, generated from the code rather than listed by hand:
every key of a configuration file (a value of the wrong type, and a word outside its choices),
and every option of every subcommand that takes a typed value or a choice."""

from __future__ import annotations

import argparse
import types
import typing

import pytest
import yaml

from dessilbi.cli.main import build_parser, main
from dessilbi.training.config import flat_fields

_CHOICE_KEYS = ("model", "dataset", "optimizer", "group_norm", "conv_penalty", "linear_penalty",
                "schedule", "device", "amp", "pull")


def _wrong_value(tp: typing.Any) -> typing.Any:
    """A value of the wrong type for a field of type ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return "not-a-list"
    return {bool: "maybe", int: "abc", float: "abc", str: [1, 2]}[tp]


CONFIG_CASES = [(f.key, _wrong_value(f.type)) for f in flat_fields()]
CONFIG_CASES += [(key, "bogus") for key in _CHOICE_KEYS]
CONFIG_CASES += [("milestones", [1, "a"]), ("synthetic_size", [1, 2])]


@pytest.mark.parametrize("key, value", CONFIG_CASES, ids=[f"{k}={v!r}" for k, v in CONFIG_CASES])
def test_every_config_key_with_a_bad_value(tmp_path, monkeypatch, capsys, key, value):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"dataset": "digits", "epochs": 1, key: value}))
    assert main(["train", "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"invalid {key}=" in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # nothing was written


def _typed_options() -> list[tuple[str, str, str]]:
    """(subcommand, option, bad value) for every option taking a typed value or a choice."""
    root = build_parser()
    (sub,) = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
    cases = []
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:
                continue
            if action.choices is not None:
                cases.append((name, action.option_strings[0], "bogus"))
            elif action.type not in (None, str):
                cases.append((name, action.option_strings[0], "abc"))
    return cases


OPTION_CASES = _typed_options()


def test_the_option_table_covers_every_subcommand():
    assert {name for name, _, _ in OPTION_CASES} >= {
        "train", "sweep", "mask", "path", "prune", "lottery", "imp", "grow", "reproduce"}
    assert len(OPTION_CASES) > 60


@pytest.mark.parametrize("command, option, value", OPTION_CASES,
                         ids=[f"{c} {o}" for c, o, _ in OPTION_CASES])
def test_every_typed_option_with_a_bad_value(capsys, command, option, value):
    with pytest.raises(SystemExit) as stop:
        main([command, option, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0] and repr(value) in err[0], err
