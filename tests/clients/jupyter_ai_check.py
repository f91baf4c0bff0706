"""Run in a side venv with jupyter-ai-magics (tests/clients/test_jupyter_ai.py): the cells given as
a JSON list on stdin run one by one in an IPython shell, as a notebook runs them. Prints one JSON
list: for each cell, whether it succeeded, its error, its result as text and what it printed."""

from __future__ import annotations

import json
import sys

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output


def run(cells: list[str]) -> list[dict]:
    shell = InteractiveShell.instance()
    results = []
    for cell in cells:
        with capture_output() as captured:
            result = shell.run_cell(cell, store_history=True)
        value, text = result.result, None
        if value is not None:
            bundle = shell.display_formatter.format(value)[0]
            text = bundle.get("text/markdown") or bundle.get("text/plain")
        error = result.error_in_exec or result.error_before_exec
        results.append({"success": result.success, "type": type(value).__name__, "text": text,
                        "error": f"{type(error).__name__}: {error}" if error else None,
                        "stdout": captured.stdout, "stderr": captured.stderr})
    return results


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.stdin.read()))))
