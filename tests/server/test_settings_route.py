"""Every control-plane setting is a ``c.SageNBApp`` trait derived from its one declaration, and the
server reports its effective settings (what ``%llm doctor`` checks in server mode)."""

from dataclasses import fields

import pytest

from sage_nb.controlplane import Settings
from sage_nb.server.app import SageNBApp

from .test_rest import call


@pytest.fixture
def jp_server_config(jp_server_config):
    jp_server_config["SageNBApp"].update(probe_timeout=3.5, stop_grace=4.0, cpu_kvcache_gib=2, use_nvml=False)
    return jp_server_config


def test_every_setting_is_a_trait_with_its_help():
    traits = SageNBApp.class_traits(config=True)
    for f in fields(Settings):
        assert f.name in traits, f.name
        assert f.metadata["help"] in traits[f.name].help and f"SAGE_NB_{f.name.upper()}" in traits[f.name].help


def test_unset_traits_leave_settings_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAGE_NB_HEALTH_FAILURES", "7")
    settings = SageNBApp(state_dir=str(tmp_path), health_interval=0.5).control_plane_settings()
    assert (settings.state_dir, settings.health_interval, settings.health_failures) == (tmp_path, 0.5, 7)


async def test_settings_route_reports_the_servers_settings(jp_fetch, state_dir):
    code, model = await call(jp_fetch, "api", "settings")
    assert code == 200
    assert model["db_path"] == str(state_dir / "registry.sqlite3") and model["port_range"] == [18800, 18899]
    # settings that c.SageNBApp could not set before reach the control plane
    assert (model["probe_timeout"], model["stop_grace"], model["cpu_kvcache_gib"], model["use_nvml"]) == (
        3.5, 4.0, 2, False)
    assert model["engine_env"] == ["PYTHONPATH"]  # names only: values may be secrets
