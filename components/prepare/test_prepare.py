"""The prepare component: the pipeline's settings round-trip to the run's configuration, each party's item
names its own Secret and carries what its extraction depends on (not the method), bad input is refused before
anything runs; and the component itself as a kfp.local task."""

from __future__ import annotations

import json

import pytest

from components.conftest import SYNTH
from components.kfp_components import pipeline_settings, settings_from_parameters
from components.prepare.component import prepare_step
from fedmedclip.config import TrainConfig
from fedmedclip.errors import ConfigError
from fedmedclip.federation.server import ServerOptions
from mlops.sites import SERVER_SECRET_NAME, site_secret_name


def _params(cache, **over) -> dict:
    cfg = TrainConfig(
        **{"sites": 2, "rounds": 2, "cache_dir": str(cache), "synthetic": SYNTH, "out": "", **over}
    )
    return pipeline_settings(cfg.validate())


def test_the_pipeline_settings_round_trip_through_kfps_types():
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
        aggregator="mean",
        duplicates="keep",
        out="",
    ).validate()
    options = ServerOptions(quorum=2, round_timeout=30.0, norm_factor=0.0, max_update_norm=5.0)
    settings = pipeline_settings(cfg, options)
    assert "federation" not in settings and "out" not in settings  # the pipeline sets them itself
    assert "stall_every" not in settings  # a server-run-only option
    # KFP hands a structured parameter back through JSON with every number a float.
    as_kfp = json.loads(json.dumps(settings), parse_int=float)
    got_cfg, got_options = settings_from_parameters(as_kfp)
    # compared as text: 2 == 2.0 in Python, but config.json and the resume key would differ
    assert json.dumps(got_cfg.to_json()) == json.dumps({**cfg.to_json(), "federation": "federated"})
    assert (got_options.quorum, got_options.round_timeout, got_options.max_update_norm) == (2, 30.0, 5.0)
    assert isinstance(got_cfg.sites, int) and isinstance(got_options.quorum, int)
    with pytest.raises(ConfigError, match="unknown method"):
        settings_from_parameters({**settings, "method": "nope"})
    with pytest.raises(ConfigError, match="unknown option"):
        settings_from_parameters({**settings, "method_options": {"nope": 1}})
    with pytest.raises(ConfigError, match="three numbers"):
        settings_from_parameters({**settings, "split_ratio": "0.8,0.2"})
    with pytest.raises(ConfigError, match="unknown key.* federation, nope"):
        settings_from_parameters({**settings, "nope": 1, "federation": "local"})
    with pytest.raises(ConfigError, match="sites must be a number"):
        settings_from_parameters({**settings, "sites": "3"})


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
        settings=params, site_names="", mailbox=str(tmp_path / "mailbox"), local_stack=""
    )
    parties = task.output
    assert [p["party"] for p in parties] == ["server", "site_0", "site_1"]
    assert json.loads(parties[1]["config"])["rounds"] == 3 and parties[1]["mailbox"] == str(
        tmp_path / "mailbox"
    )
