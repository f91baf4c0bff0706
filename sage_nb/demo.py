"""The main job until JupyterLab arrives: start an LLM and an embedding engine, show the backends,
send one chat and one embedding request, then stop (``--keep`` leaves the engines running).

``python -m sage_nb.demo [--llm MODEL] [--embedding MODEL] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sage_nb.controlplane import ControlPlane, ControlPlaneError


def main(argv: list[str] | None = None) -> int:
    from sage_nb.tinymodel import default_models_dir, make_tiny_llama, minilm_path

    parser = argparse.ArgumentParser(prog="python -m sage_nb.demo", description=__doc__)
    parser.add_argument("--llm", help="LLM model (default: the tiny Llama made locally)")
    parser.add_argument("--embedding", help="embedding model (default: the packaged MiniLM)")
    parser.add_argument("--keep", action="store_true", help="leave the engines running")
    args = parser.parse_args(argv)

    llm_model = args.llm or str(make_tiny_llama(default_models_dir() / "tiny-llama"))
    emb_model = args.embedding or str(minilm_path())
    cp = ControlPlane()
    print(f"sage_nb: registry {cp.settings.db_path}; GPUs: {cp.inventory.source}")
    report = cp.discover()
    if report["reattached"] or report["adopted"]:
        print(f"sage_nb: found running engines: {report['reattached'] + report['adopted']}")
    t0 = time.monotonic()
    try:
        llm = cp.start_engine(llm_model, kind="llm", wait=False)
        emb = cp.start_engine(emb_model, kind="embedding", wait=False)
        print(f"sage_nb: starting {llm['name']} (llm) and {emb['name']} (embedding) ...", flush=True)
        llm, emb = cp.wait_ready(llm["id"]), cp.wait_ready(emb["id"])
    except ControlPlaneError as e:
        print(f"sage_nb: {e.message}", file=sys.stderr)
        return 1
    print(f"sage_nb: both ready in {time.monotonic() - t0:.0f} s")
    backends = cp.backends()
    print(json.dumps({k: [{"name": b["name"], "model": b["served_model_name"], "url": b["base_url"]}
                          for b in v] for k, v in backends.items()}, indent=2))

    import openai

    chat = openai.OpenAI(base_url=llm["base_url"], api_key=cp.api_key(llm["id"]))
    answer = chat.chat.completions.create(model=llm["served_model_name"], max_tokens=16,
                                          messages=[{"role": "user", "content": "Say hello."}])
    print(f"chat: {answer.choices[0].message.content!r}")
    embed = openai.OpenAI(base_url=emb["base_url"], api_key=cp.api_key(emb["id"]))
    vec = embed.embeddings.create(model=emb["served_model_name"], input=["hello"]).data[0].embedding
    print(f"embedding: {len(vec)} dimensions")
    if not args.keep:
        for engine in (llm, emb):
            cp.stop_engine(engine["id"])
        print(f"sage_nb: stopped; pruned {cp.prune()}")
    cp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
