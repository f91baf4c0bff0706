"""The input rules every entry point shares: integers, ports, engine names, durations."""

import pytest

from sage_nb.controlplane import BadRequest
from sage_nb.controlplane.validation import clean_name, duration, engine_name, integer, is_engine_name, port


@pytest.mark.parametrize("text,name", [
    ("org/model:latest", "model-latest"), ("/models/Qwen2.5-7B-Instruct/", "Qwen2.5-7B-Instruct"),
    ("ünïcode mödel", "n-code-m-del"), ("...", "engine"), ("", "engine"), ("a" * 80, "a" * 48),
])
def test_clean_names_are_engine_names(text, name):
    assert clean_name(text) == name and is_engine_name(name)


@pytest.mark.parametrize("value,ok", [(1, True), (0, False), (True, False), ("2", False), (2.0, False)])
def test_integer(value, ok):
    if ok:
        assert integer("n", value) == value
    else:
        with pytest.raises(BadRequest, match="n must be"):
            integer("n", value)


def test_port_and_name():
    assert port(None) is None and port(80) == 80
    for bad in (0, 65536, "80", False):
        with pytest.raises(BadRequest):
            port(bad)
    assert engine_name("a.b_c-1") == "a.b_c-1"
    for bad in ("-a", "a b", "a/b", "x" * 65, None):
        with pytest.raises(BadRequest, match="invalid engine name"):
            engine_name(bad)


@pytest.mark.parametrize("value,seconds", [
    (0, 0.0), (15, 15.0), (2.5, 2.5), ("90", 90.0), ("45s", 45.0), ("10m", 600.0), ("1h", 3600.0),
    ("1h30m", 5400.0), (" 2D ", 172800.0), ("0.5m", 30.0), (None, None), (-1, None), ("-1", None),
    ("forever", None),
])
def test_durations(value, seconds):
    assert duration("keep_alive", value) == seconds


@pytest.mark.parametrize("value,why", [
    ("abc", "duration such as"), (-5, "at least 0"), (1e99, "at most 366 days"), ("400d", "at most"),
    (float("nan"), "at least 0"), (float("inf"), "at most"), (True, "seconds or"), ("10 m", "duration such as"),
    ("m", "duration such as"), ("-5m", "duration such as"), ([10], "seconds or"), ("", "duration such as"),
])
def test_bad_durations_name_the_value(value, why):
    with pytest.raises(BadRequest, match=why) as exc:
        duration("keep_alive", value)
    assert "keep_alive" in exc.value.message
