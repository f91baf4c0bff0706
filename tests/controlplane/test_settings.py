"""Settings: each declared once with its default, help and SAGE_NB_* environment variable."""

import json
from dataclasses import fields

import pytest

from sage_nb.controlplane import BadRequest, ControlPlane, Settings
from sage_nb.controlplane.settings import PARSE_ENV


def test_settings_reject_bad_values(state_dir):
    with pytest.raises(BadRequest):
        ControlPlane(state_dir=state_dir, port_range=(10, 5))
    with pytest.raises(BadRequest):
        ControlPlane(state_dir=state_dir, fake_gpus="[{]")


def test_each_setting_is_declared_once_with_help_and_environment(monkeypatch, tmp_path):
    for f in fields(Settings):
        assert f.metadata["help"] and f.metadata["type"] in PARSE_ENV, f.name
    monkeypatch.setenv("SAGE_NB_STATE_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("SAGE_NB_PROBE_TIMEOUT", "4.5")
    monkeypatch.setenv("SAGE_NB_PORT_RANGE", "19000-19010")
    monkeypatch.setenv("SAGE_NB_ADOPT_UNRECORDED", "false")
    monkeypatch.setenv("SAGE_NB_ENGINE_ENV", '{"A": "b"}')
    s = Settings()
    assert (s.state_dir, s.probe_timeout, s.port_range, s.adopt_unrecorded, s.engine_env) == (
        tmp_path / "from-env", 4.5, (19000, 19010), False, {"A": "b"})
    assert Settings(probe_timeout=1.0).probe_timeout == 1.0  # an argument wins over the environment
    monkeypatch.setenv("SAGE_NB_HEALTH_FAILURES", "many")
    with pytest.raises(BadRequest, match="SAGE_NB_HEALTH_FAILURES"):
        Settings()


def test_settings_model_shows_no_engine_env_values(tmp_path):
    model = Settings(state_dir=tmp_path, engine_env={"HF_TOKEN": "secret"}).to_model()
    assert model["engine_env"] == ["HF_TOKEN"] and "secret" not in json.dumps(model)
    assert model["db_path"] == str(tmp_path / "registry.sqlite3")
