"""EntropyKVConfig validation: every bad value names the field, the value and what is accepted."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from entropykv_fx import ConfigError, EntropyKVConfig
from entropykv_fx.policies import POLICIES

# (field, invalid value, a fragment of what the message must say is accepted)
BAD = [
    ("policy", "nope", "one of ["), ("policy", "", "one of ["), ("policy", "Entropy", "one of ["),
    ("policy", ["entropy"], "one of ["),
    ("budget", 0.0, "(0, 1]"), ("budget", -0.25, "(0, 1]"), ("budget", 1.5, "(0, 1]"), ("budget", 1.0000001, "(0, 1]"),
    ("budget", math.nan, "(0, 1]"), ("budget", math.inf, "(0, 1]"),
    ("budget", 0, "int >= 1"), ("budget", -3, "int >= 1"),
    ("budget", "0.25", "float in (0, 1]"), ("budget", None, "float in (0, 1]"), ("budget", True, "float in (0, 1]"),
    ("budget", 10, "at least window + sink_tokens = 36"), ("budget", 35, "at least window + sink_tokens = 36"),
    ("window", 0, "int >= 1"), ("window", -1, "int >= 1"), ("window", 2.0, "int >= 1"), ("window", True, "int >= 1"),
    ("window", None, "int >= 1"),
    ("sink_tokens", -1, "int >= 0"), ("sink_tokens", 1.0, "int >= 0"), ("sink_tokens", False, "int >= 0"),
    ("sink_tokens", "4", "int >= 0"),
    ("pooling", "median", "one of ('max', 'avg', 'none')"), ("pooling", "MAX", "one of"), ("pooling", None, "one of"),
    ("pool_kernel", 4, "odd int >= 1"), ("pool_kernel", 0, "odd int >= 1"), ("pool_kernel", -3, "odd int >= 1"),
    ("pool_kernel", 3.0, "odd int >= 1"), ("pool_kernel", True, "odd int >= 1"),
    ("min_layer_budget", 1.5, "[0, 1]"), ("min_layer_budget", -0.1, "[0, 1]"), ("min_layer_budget", math.nan, "[0, 1]"),
    ("min_layer_budget", "0.5", "[0, 1]"), ("min_layer_budget", True, "[0, 1]"),
    ("max_layer_budget", 0.5, ">= 1"), ("max_layer_budget", 0, ">= 1"), ("max_layer_budget", math.nan, ">= 1"),
    ("max_layer_budget", math.inf, "finite number >= 1"), ("max_layer_budget", "2", ">= 1"),
    ("max_layer_budget", True, ">= 1"),
    ("budget_source", "static", "one of ('dynamic', 'calibrated')"), ("budget_source", None, "one of"),
    ("calibration_file", "x.json", "None unless budget_source='calibrated'"),
]


@pytest.mark.parametrize("field,value,accepted", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_invalid_value_names_field_value_and_accepted(field, value, accepted):
    with pytest.raises(ConfigError) as err:
        EntropyKVConfig(**{field: value})
    msg = str(err.value)
    assert f"EntropyKVConfig.{field}={value!r}" in msg, msg
    assert "expected" in msg and accepted in msg, msg


def test_policy_error_lists_every_policy():
    with pytest.raises(ConfigError) as err:
        EntropyKVConfig(policy="snapkv2")
    assert all(repr(name) in str(err.value) for name in POLICIES)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        EntropyKVConfig(window=0)


def test_int_budget_floor_follows_window_and_sinks():
    with pytest.raises(ConfigError, match=r"budget=9 .*window \+ sink_tokens = 10"):
        EntropyKVConfig(budget=9, window=8, sink_tokens=2)
    assert EntropyKVConfig(budget=10, window=8, sink_tokens=2).budget == 10


VALID = [
    dict(budget=1.0), dict(budget=1e-9), dict(budget=0.5), dict(budget=36), dict(budget=10**9),
    dict(budget=1, window=1, sink_tokens=0), dict(budget=10, window=8, sink_tokens=2), dict(window=1),
    dict(sink_tokens=0), dict(pool_kernel=1), dict(pool_kernel=3), dict(pool_kernel=101),
    dict(pooling="max"), dict(pooling="avg"), dict(pooling="none"),
    dict(min_layer_budget=0.0), dict(min_layer_budget=0), dict(min_layer_budget=1.0), dict(min_layer_budget=1),
    dict(max_layer_budget=1.0), dict(max_layer_budget=1), dict(max_layer_budget=1e6),
    dict(policy="entropy"), dict(policy="uniform"), dict(policy="full"), dict(budget_source="dynamic"),
]


@pytest.mark.parametrize("kw", VALID, ids=[repr(kw) for kw in VALID])
def test_valid_edges_are_accepted(kw):
    cfg = EntropyKVConfig(**kw)
    assert all(getattr(cfg, k) == v and type(getattr(cfg, k)) is type(v) for k, v in kw.items())


def test_defaults():
    cfg = EntropyKVConfig()
    assert (cfg.policy, cfg.budget, cfg.window, cfg.sink_tokens, cfg.pooling, cfg.pool_kernel,
            cfg.budget_source, cfg.calibration_file, cfg.scorer) == ("cache_topk", 0.25, 32, 4, "max", 7, "dynamic", None,
                                                                     "reconstruct")


def test_each_policy_brings_its_own_scorer_unless_one_is_named():
    assert (EntropyKVConfig(policy="snapkv").scorer, EntropyKVConfig(policy="cache_topk_layer").scorer) == (
        "window", "reconstruct")
    assert EntropyKVConfig().replace(policy="uniform").scorer == "window", "the new policy's own"
    assert EntropyKVConfig(scorer="last_query").replace(policy="adakv").scorer == "last_query", "named: kept"
    assert EntropyKVConfig(policy="uniform").replace(budget=0.5).policy == "uniform", "named: kept"


def test_an_unnamed_policy_follows_the_calibration_file(tmp_path):
    recorded = tmp_path / "entropy.json"
    recorded.write_text(json.dumps({"layer_fractions": [0.5, 0.5], "policy": "entropy"}))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"layer_fractions": [0.5, 0.5]}))
    calibrated = EntropyKVConfig(budget_source="calibrated", calibration_file=str(recorded))
    assert (calibrated.policy, calibrated.scorer) == ("entropy", "window")
    assert EntropyKVConfig(budget_source="calibrated", calibration_file=str(bare)).policy == "uniform"
    assert calibrated.replace(budget_source="dynamic", calibration_file=None).policy == "cache_topk"


def test_config_is_frozen():
    cfg = EntropyKVConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.budget = 0.5  # type: ignore[misc]


def test_replace_rejects_unknown_fields_and_revalidates():
    cfg = EntropyKVConfig()
    new = cfg.replace(budget=0.5, pooling="avg")
    assert (new.budget, new.pooling) == (0.5, "avg") and (cfg.budget, cfg.pooling) == (0.25, "max")  # a new object
    with pytest.raises(ConfigError) as err:
        cfg.replace(windw=3, budgett=0.5)
    msg = str(err.value)
    assert "['budgett', 'windw']" in msg and "'window'" in msg and "'budget'" in msg  # unknown names + accepted ones
    with pytest.raises(ConfigError, match=r"EntropyKVConfig\.window=-2"):
        cfg.replace(window=-2)
    with pytest.raises(ConfigError, match=r"budget=20 .*= 36"):
        cfg.replace(budget=20)  # int budget revalidated against the unchanged window + sinks
    assert cfg.replace(budget=20, window=16).budget == 20


def test_calibrated_source_requires_an_existing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"calibration_file=None .*a path to a calibration JSON"):
        EntropyKVConfig(budget_source="calibrated")
    with pytest.raises(ConfigError, match=r"calibration_file=5 .*a path"):
        EntropyKVConfig(budget_source="calibrated", calibration_file=5)
    missing = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError) as err:
        EntropyKVConfig(budget_source="calibrated", calibration_file=missing)
    assert f"calibration_file={missing!r}" in str(err.value) and "existing calibration JSON file" in str(err.value)
    with pytest.raises(ConfigError, match="existing calibration JSON file"):
        EntropyKVConfig(budget_source="calibrated", calibration_file=str(tmp_path))  # a directory is not a file
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"layer_fractions": [0.5]}))
    cfg = EntropyKVConfig(budget_source="calibrated", calibration_file=str(path))
    assert cfg.calibration_file == str(path)
    assert EntropyKVConfig(budget_source="calibrated", calibration_file=path).layer_fractions(1) == [0.5]  # a Path too
    with pytest.raises(ConfigError, match="None unless"):
        EntropyKVConfig(budget_source="dynamic", calibration_file=str(path))


def _calibrated(tmp_path, content) -> EntropyKVConfig:
    path = tmp_path / "cal.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return EntropyKVConfig(budget_source="calibrated", calibration_file=str(path))


def test_layer_fractions_valid(tmp_path):
    cfg = _calibrated(tmp_path, {"layer_fractions": [0.5, 0.25, 1, 1e-3], "extra": "ignored"})
    fractions = cfg.layer_fractions(4)
    assert fractions == [0.5, 0.25, 1.0, 1e-3] and all(type(f) is float for f in fractions)


BAD_FILES = {
    "too short": {"layer_fractions": [0.5, 0.5]},
    "too long": {"layer_fractions": [0.5, 0.5, 0.5, 0.5]},
    "above one": {"layer_fractions": [0.5, 1.5, 0.5]},
    "zero": {"layer_fractions": [0.5, 0, 0.5]},
    "negative": {"layer_fractions": [0.5, -0.1, 0.5]},
    "string": {"layer_fractions": [0.5, "0.5", 0.5]},
    "null": {"layer_fractions": [0.5, None, 0.5]},
    "bool": {"layer_fractions": [0.5, True, 0.5]},
    "nan": '{"layer_fractions": [0.5, NaN, 0.5]}',
    "not a list": {"layer_fractions": 0.5},
    "missing key": {"fractions": [0.5, 0.5, 0.5]},
    "top-level list": [0.5, 0.5, 0.5],
    "empty object": {},
    "malformed": '{"layer_fractions": [0.5, 0.5,',
    "empty file": "",
}


@pytest.mark.parametrize("content", list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_layer_fractions_rejects_bad_json(tmp_path, content):
    """A damaged file fails when the config is built (it is read once, then); one for another layer count when the
    fractions are asked for a model (optimize() does, before any prefill)."""
    with pytest.raises(ConfigError) as err:
        _calibrated(tmp_path, content).layer_fractions(3)
    msg = str(err.value)
    assert str(tmp_path / "cal.json") in msg and "layer_fractions" in msg and "(0, 1]" in msg, msg
