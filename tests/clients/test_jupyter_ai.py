"""jupyter-ai's ``%%ai`` (jupyter-ai-magics 2.x, in a side venv) answers through the gateway with
the lines ``%llm backends`` prints, the Jupyter token as ``OPENAI_API_KEY``."""

from __future__ import annotations

import json
import time

import openai
import pytest

from sage_nb.kernel.integrations import jupyter_ai_lines

from . import sidevenv

pytestmark = pytest.mark.vllm

SCRIPT = str(sidevenv.REQUIREMENTS / "jupyter_ai_check.py")
PROMPT = "Write a short note about the notebook kernel."
SAMPLING = {"temperature": 1, "seed": 7, "max_tokens": 12}


@pytest.mark.parametrize("venv", ["jupyter-ai"], indirect=True)
def test_ai_magic_answers_through_the_gateway(venv, gateway, tmp_path):
    gateway_url = gateway.url + "sage_nb/v1"
    lines = jupyter_ai_lines(gateway_url, [gateway.engines["llm"]])
    assert "  %env OPENAI_API_KEY=<your Jupyter token>" in lines and "  %load_ext jupyter_ai_magics" in lines
    (magic,) = [line.strip() for line in lines if line.strip().startswith("%%ai")]
    assert magic == f'%%ai openai-chat-custom:tiny -m {{"openai_api_base":"{gateway_url}"}}'
    # the same cell, seeded and of a fixed length, to compare with the engine's own answer (the tiny
    # Llama's greedy answer is only newlines)
    params = {"openai_api_base": gateway_url, **SAMPLING, "extra_body": {"ignore_eos": True}}
    seeded = f"%%ai openai-chat-custom:tiny -f text -m {json.dumps(params, separators=(',', ':'))}"
    cells = ["%load_ext jupyter_ai_magics", f"{magic}\n{PROMPT}", f"{seeded}\n{PROMPT}",
             "import os; os.environ['OPENAI_API_KEY'] = 'not-the-token'", f"{magic}\n{PROMPT}"]

    t0 = time.monotonic()
    env = venv.env(OPENAI_API_KEY=gateway.token, IPYTHONDIR=str(tmp_path / "ipython"))
    for name in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "SAGE_NB_SERVER_URL", "SAGE_NB_TOKEN"):
        env.pop(name, None)  # only the cell's JSON says where the gateway is
    done = venv.run([SCRIPT], env=env, input=json.dumps(cells))
    assert done.returncode == 0, done.stderr[-4000:]
    load, plain, fixed, _, wrong_key = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"jupyter-ai cells: {time.monotonic() - t0:.1f} s; answers {plain['text']!r}, {fixed['text']!r}")

    assert load["success"] and not load["stderr"], load
    assert plain["success"] and plain["error"] is None and plain["type"] == "Markdown", plain
    assert plain["text"] is not None and not plain["stderr"], plain
    assert fixed["success"] and fixed["type"] == "TextWithMetadata", fixed
    direct = openai.OpenAI(base_url=gateway_url, api_key=gateway.token, max_retries=0).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], **SAMPLING, extra_body={"ignore_eos": True})
    assert direct.usage.completion_tokens == 12 and direct.choices[0].message.content.strip()
    assert fixed["text"] == direct.choices[0].message.content

    # the key really is checked: the Jupyter token, not any string
    assert not wrong_key["success"] and "PermissionDeniedError" in wrong_key["error"], wrong_key
    assert "Jupyter token is missing or wrong" in wrong_key["error"]
