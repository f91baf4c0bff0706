"""The input rules every entry point shares: integers, ports, engine names."""

import pytest

from sage_nb.controlplane import BadRequest
from sage_nb.controlplane.validation import clean_name, engine_name, integer, is_engine_name, port


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
