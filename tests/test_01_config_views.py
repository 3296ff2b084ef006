"""The one flat config and its typed views (issue 17 item 1): every view is a frozen subset of
Hyperparameters' fields by name and type, built by name; every choice is declared on its field."""

import dataclasses
import typing

import pytest

import train_gpt as tg

VIEWS = (tg.ModelConfig, tg.QuantSpec, tg.DocTTTConfig)


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.__name__)
def test_a_view_is_a_frozen_subset_of_the_fields_by_name_and_type(view):
    hints, mine = tg.field_hints(), typing.get_type_hints(view)
    fields = dataclasses.fields(view)
    assert fields and all(f.default is dataclasses.MISSING for f in fields)  # no second set of defaults
    for f in fields:
        assert mine[f.name] == hints[f.name], f.name
    h = tg.Hyperparameters.from_env({"PRESET": "frontier"})
    v = view.of(h)
    assert all(getattr(v, f.name) == getattr(h, f.name) for f in fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(v, fields[0].name, None)


def test_the_declared_choices_are_the_codes_tables():
    hints = tg.field_hints()
    def choices(name):
        assert typing.get_origin(hints[name]) is typing.Literal, name
        return typing.get_args(hints[name])
    assert choices("train_loader") == tuple(tg.TRAIN_LOADERS)
    assert choices("compile_mode") == tg.COMPILE_MODES
    assert set(choices("preset")) == {"", *tg.PRESETS}
    assert set(choices("quant_compressor")) == {*tg.COMPRESSORS, "pergroup", "auto"}
    # every default and every preset value is one of its field's choices
    literal = {n: typing.get_args(t) for n, t in hints.items() if typing.get_origin(t) is typing.Literal}
    assert len(literal) >= 18
    for f in dataclasses.fields(tg.Hyperparameters):
        if f.name in literal:
            assert f.default in literal[f.name], f.name
            assert all(p.get(f.name, f.default) in literal[f.name] for p in tg.PRESETS.values()), f.name


@pytest.mark.parametrize("var,raw", [("DEVICE", "tpu"), ("EVAL_MODE", "window"), ("PREFLIGHT", "2")])
def test_a_value_outside_the_choices_is_one_error_naming_them(var, raw):
    allowed = typing.get_args(tg.field_hints()[var.lower()])
    with pytest.raises(tg.ConfigError, match=f"^{var}={raw}: must be one of " + repr(allowed).replace("(", r"\(")
                       .replace(")", r"\)") + "$"):
        tg.Hyperparameters.from_env({var: raw})


@pytest.mark.parametrize("var,ok,bad", [("VAL_LOSS_EVERY", "0", "4000"), ("PARALLEL_FINAL_LANE", "mean", "sum")])
def test_records_one_value_knobs_are_accepted_at_that_value_only(var, ok, bad):
    assert tg.Hyperparameters.from_env({var: ok}) == tg.Hyperparameters()
    with pytest.raises(tg.ConfigError, match=f"^{var}={bad}: must be {ok}: "):
        tg.Hyperparameters.from_env({var: bad})
