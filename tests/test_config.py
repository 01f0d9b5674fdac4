"""EntropyKVConfig validation: every bad value names the field, the value and what is accepted."""

from __future__ import annotations

import json

import pytest

from entropykv_fx import ConfigError, EntropyKVConfig

BAD = [
    ("policy", "nope", "one of"), ("budget", 0.0, "(0, 1]"), ("budget", 1.5, "(0, 1]"), ("budget", float("nan"), "(0, 1]"),
    ("budget", 0, "int >= 1"), ("budget", "0.25", "float in (0, 1]"), ("budget", True, "float in (0, 1]"),
    ("budget", 10, "at least window + sink_tokens = 36"), ("window", 0, "int >= 1"), ("window", 2.0, "int >= 1"),
    ("sink_tokens", -1, "int >= 0"), ("pooling", "median", "one of"), ("pool_kernel", 4, "odd int"),
    ("pool_kernel", 0, "odd int"), ("min_layer_budget", 1.5, "[0, 1]"), ("max_layer_budget", 0.5, ">= 1"),
    ("budget_source", "static", "one of"), ("calibration_file", "x.json", "None unless"),
]


@pytest.mark.parametrize("field,value,accepted", BAD)
def test_invalid_value_names_field_value_and_accepted(field, value, accepted):
    with pytest.raises(ConfigError) as err:
        EntropyKVConfig(**{field: value})
    msg = str(err.value)
    assert f"EntropyKVConfig.{field}={value!r}" in msg and accepted in msg


@pytest.mark.parametrize("kw", [dict(budget=1.0), dict(budget=36), dict(budget=1, window=1, sink_tokens=0),
                                dict(pool_kernel=1), dict(pooling="none"), dict(min_layer_budget=0.0),
                                dict(max_layer_budget=1.0), dict(policy="full"), dict(policy="uniform")])
def test_valid_edges_are_accepted(kw):
    cfg = EntropyKVConfig(**kw)
    assert all(getattr(cfg, k) == v for k, v in kw.items())


def test_replace_rejects_unknown_fields_and_revalidates():
    cfg = EntropyKVConfig()
    assert cfg.replace(budget=0.5).budget == 0.5 and cfg.budget == 0.25  # frozen: a new object
    with pytest.raises(ConfigError, match=r"unknown EntropyKVConfig field\(s\) \['windw'\]"):
        cfg.replace(windw=3)
    with pytest.raises(ConfigError, match="window"):
        cfg.replace(window=-2)


def test_calibrated_source_needs_an_existing_valid_file(tmp_path):
    with pytest.raises(ConfigError, match="calibration_file=None"):
        EntropyKVConfig(budget_source="calibrated")
    with pytest.raises(ConfigError, match="existing calibration JSON"):
        EntropyKVConfig(budget_source="calibrated", calibration_file=str(tmp_path / "missing.json"))
    path = tmp_path / "cal.json"
    cfg_for = lambda data: (path.write_text(json.dumps(data)),
                            EntropyKVConfig(budget_source="calibrated", calibration_file=str(path)))[1]
    assert cfg_for({"layer_fractions": [0.5, 0.25]}).layer_fractions(2) == [0.5, 0.25]
    for bad in ({"layer_fractions": [0.5]}, {"layer_fractions": [0.5, 1.5]}, {"layer_fractions": [0.5, 0]}, [0.5, 0.5]):
        with pytest.raises(ConfigError, match="2 numbers in \\(0, 1\\]"):
            cfg_for(bad).layer_fractions(2)
