"""Typed configuration: defaults, validation and one-line errors naming the field."""

from __future__ import annotations

import pytest

from nasforge.config import Params, load_params, params_from_dict, params_from_json
from nasforge.errors import ConfigError


def test_repo_params_yaml_is_valid():
    from tests.conftest import REPO

    p = load_params(REPO / "params.yaml")
    assert p.targets == ["onnxruntime-cpu", "openvino-cpu"]
    assert p.data.source == "digits"


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError) as e:
        params_from_dict({"search": {"trials": "many"}}, "params.yaml")
    msg = str(e.value)
    assert "search.trials" in msg and "many" in msg and "\n" not in msg


def test_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown field"):
        params_from_dict({"train": {"epochz": 3}})


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"prune\.channel_ratio"):
        params_from_dict({"prune": {"channel_ratio": 1.5}})


def test_dvc_candidates_must_fit_max_candidates():
    with pytest.raises(ConfigError, match="dvc_candidates"):
        params_from_dict({"search": {"max_candidates": 2}, "dvc_candidates": [0, 2]})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(listy)


def test_json_round_trip():
    p = params_from_dict({"search": {"trials": 7}, "targets": ["openvino-cpu"]})
    q = params_from_json(p.to_json())
    assert q == p and isinstance(q, Params)


@pytest.mark.parametrize(
    ("tune", "match"),
    [
        ({"lr": [0.1, 0.01]}, "train.tune.lr"),
        ({"weight_decay": [0, 0.1]}, "train.tune.weight_decay"),
        ({"epochs": [0, 3]}, "train.tune.epochs"),
        ({"sampler": "random"}, "train.tune.sampler"),
    ],
)
def test_bad_tuning_ranges_name_the_field(tune, match):
    from nasforge.config import params_from_dict

    with pytest.raises(ConfigError, match=match):
        params_from_dict({"train": {"tune": tune}}, "p.yaml")


def test_darts_prior_needs_the_hybrid_strategy():
    from nasforge.config import params_from_dict

    with pytest.raises(ConfigError, match="search.prior.*only the 'hybrid' strategy"):
        params_from_dict({"search": {"strategy": "regevo", "prior": "darts"}}, "p.yaml")
    assert params_from_dict({"search": {"prior": "darts"}}).search.strategy == "hybrid"  # default
    ok = params_from_dict({"search": {"strategy": "hybrid", "prior": "darts"}}, "p.yaml")
    assert ok.search.prior == "darts"
