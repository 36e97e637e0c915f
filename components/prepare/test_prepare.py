"""The prepare component: the pipeline's parameters round-trip to the run's configuration, each party's item
names its own Secret and carries what its extraction depends on (not the method), bad input is refused before
anything runs; and the component itself as a kfp.local task."""

from __future__ import annotations

import dataclasses
import json

import pytest

from components.conftest import SYNTH
from components.kfp_components import (
    CONFIG_PARAMETERS,
    NOT_PARAMETERS,
    config_from_parameters,
    config_to_parameters,
)
from components.prepare.component import prepare_step
from fedmedclip.config import TrainConfig
from fedmedclip.errors import ConfigError
from mlops.sites import SERVER_SECRET_NAME, site_secret_name


def _params(cache, **over) -> dict:
    cfg = TrainConfig(
        **{"sites": 2, "rounds": 2, "cache_dir": str(cache), "synthetic": SYNTH, "out": "", **over}
    )
    return config_to_parameters(cfg.validate())


def test_every_configuration_field_is_a_pipeline_parameter_and_round_trips():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    mapped = {field for _, field, _ in CONFIG_PARAMETERS}
    assert fields - mapped == set(NOT_PARAMETERS), (
        "a TrainConfig field is neither a pipeline parameter nor excluded"
    )
    cfg = TrainConfig(
        partition="dirichlet",
        alpha=0.5,
        split_ratio=(0.7, 0.2, 0.1),
        classes=["a", "b"],
        method_options={"local_epochs": 2},
        synthetic=SYNTH,
        codec_up="int8-zlib",
        transductive=True,
        secure_aggregation=True,
        secagg_threshold=3,
        out="",
    ).validate()
    params = config_to_parameters(cfg)
    assert all(isinstance(v, (str, int, float, bool)) for v in params.values())  # KFP parameter types
    assert config_from_parameters(params).to_json() == cfg.to_json()
    with pytest.raises(ConfigError, match="unknown method"):
        config_from_parameters({**params, "method": "nope"})
    with pytest.raises(ConfigError, match="unknown option"):
        config_from_parameters({**params, "method_options": '{"nope": 1}'})
    with pytest.raises(ConfigError, match="three numbers"):
        config_from_parameters({**params, "split": "0.8,0.2"})


def test_prepare_names_each_partys_secret_and_refuses_bad_input(tmp_path):
    parties = prepare_step(_params(tmp_path / "cache"), "", str(tmp_path / "mailbox"))
    assert [(p["role"], p["party"], p["index"], p["secret"]) for p in parties] == [
        ("server", "server", -1, SERVER_SECRET_NAME),
        ("site", "site_0", 0, site_secret_name(0)),
        ("site", "site_1", 1, site_secret_name(1)),
    ]
    # Only the server's item names the MLflow user's Secret.
    assert [p["tracking_secret"] == p["secret"] for p in parties] == [False, True, True]
    extraction = json.loads(parties[0]["extraction"])
    assert "method" not in extraction and "rounds" not in extraction and "codec_up" not in extraction
    assert extraction["preprocessing"]  # resolved from the method: its cache key does not name the method
    with pytest.raises(ConfigError, match="not the partition's sites"):
        prepare_step(_params(tmp_path / "cache"), "a,b", str(tmp_path / "mailbox"))
    with pytest.raises(ConfigError, match="no mailbox"):
        prepare_step(_params(tmp_path / "cache"), "", "")


def test_the_prepare_component_on_kfp_local(kfp_local, tmp_path):
    from components.kfp_components import components_for

    params = _params(tmp_path / "cache", rounds=3)
    task = components_for().prepare(
        **params, site_names="", mailbox=str(tmp_path / "mailbox"), local_stack=""
    )
    parties = task.output
    assert [p["party"] for p in parties] == ["server", "site_0", "site_1"]
    assert json.loads(parties[1]["config"])["rounds"] == 3 and parties[1]["mailbox"] == str(
        tmp_path / "mailbox"
    )
