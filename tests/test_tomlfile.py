"""fleetcore.tomlfile writes what tomllib reads back, characters outside the BMP included.

A home, state or store directory named with an emoji ("📦", U+1F4E6) or a rare CJK character
("𠀋", U+2000B) ends up in the configs written there; each of those must load again.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from control_plane import cli as control_plane_cli
from control_plane.config import ControlPlaneConfig
from control_plane.services.broker import MqttSettings
from edge_agent.state import AgentConfig, StateDir
from fleetcore import operator_config, tomlfile
from tests.trainer_support import write_pipeline
from trainer.config import Pipeline
from trainer.store import FeatureStore

ASTRAL = "📦𠀋"  # both outside the Basic Multilingual Plane (surrogate pairs in JSON)


def test_round_trip_of_characters_outside_the_bmp(tmp_path: Path) -> None:
    doc = {
        "path": f"/srv/{ASTRAL}/home",
        f"key {ASTRAL}": "plain",
        "list": ["📦", "𠀋", "a\"quote", "tab\tnewline\n"],
        "n": 3, "x": 0.5, "flag": True,
        "table": {"name": f"倉庫 {ASTRAL}", "inner": {"deep": "𠀋"}},
    }
    text = tomlfile.dumps(doc)
    assert tomllib.loads(text) == doc
    assert "📦" in text  # written as the character, not as a JSON surrogate-pair escape
    tomlfile.write(tmp_path / "a.toml", doc)
    assert tomlfile.load(tmp_path / "a.toml") == doc


def test_values_toml_cannot_hold_are_refused() -> None:
    with pytest.raises(TypeError):
        tomlfile.dumps({"x": object()})


def test_control_plane_home_under_an_astral_directory(tmp_path: Path) -> None:
    home = tmp_path / f"homes-{ASTRAL}" / "cp"
    assert control_plane_cli.main(["init", "--home", str(home)]) == 0
    cfg = ControlPlaneConfig.load(home)
    assert cfg.home == home.resolve()
    assert [p.read_bytes()[:26] for p in cfg.publisher_keys] == [b"-----BEGIN PUBLIC KEY-----"]
    fleet = operator_config.load(home / "operators" / "admin" / "fleet.toml")
    assert fleet.cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    # The broker config holds an absolute path: the directory name itself is written.
    out = tmp_path / f"broker-{ASTRAL}"
    assert control_plane_cli.main(["mqtt-config", "--home", str(home), "--out", str(out),
                                   "--port", "18883"]) == 0
    settings = MqttSettings.load(home.resolve())
    assert settings is not None and settings.out == out.resolve() and settings.port == 18883


def test_agent_config_under_an_astral_state_dir(tmp_path: Path) -> None:
    state = StateDir(tmp_path / f"state-{ASTRAL}")
    state.root.mkdir()
    state.key.write_bytes(b"key")  # is_enrolled() looks for the files, load() reads the config
    state.cert.write_bytes(b"cert")
    cfg = AgentConfig(device_id="dev-1", api_address="cp.example:7443",
                      mqtt_url="mqtts://broker.example:8883", transport="mqtt",
                      labels={"site": f"倉庫 {ASTRAL}", "shelf": "𠀋", f"{ASTRAL}": "x"})
    cfg.save(state)
    loaded = AgentConfig.load(state)
    assert loaded.labels == cfg.labels
    assert (loaded.device_id, loaded.transport) == ("dev-1", "mqtt")


def test_trainer_pipeline_and_store_under_an_astral_directory(tmp_path: Path) -> None:
    base = tmp_path / f"train-{ASTRAL}"
    pipeline = Pipeline.load(write_pipeline(base, store=str(base / "store")))
    assert pipeline.store.path == str(base / "store")
    with FeatureStore(base / "store", allowed_regions=["eu-west"]) as store:
        assert store.allowed_regions == ["eu-west"]
    with FeatureStore(base / "store", allowed_regions=["eu-west"]) as store:  # policy.toml read
        assert store.allowed_regions == ["eu-west"]
