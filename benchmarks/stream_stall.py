"""32 concurrent ``AsyncOpenAI`` streams to the tiny Llama, direct and through the gateway, with the
server's garbage-collection freeze on and off (the issue-11 stall: rounds of 1.2 s through the
gateway against 0.28 s direct).

    .venv/bin/python -m benchmarks.stream_stall [--rounds 5]

Prints each round's wall time per target; not part of ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from sage_nb.controlplane import ControlPlane

from .jserver import TOKEN, JServer


async def round_s(base_url: str, key: str, n: int = 32) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=key)

    async def one() -> None:
        stream = await client.chat.completions.create(model="tiny", stream=True, max_tokens=32, temperature=1,
                                                      messages=[{"role": "user", "content": "hi"}])
        async for _ in stream:
            pass

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    await client.close()
    return time.perf_counter() - t0


def main() -> None:
    from .bench_engines import tiny_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--freeze-last", action="store_true", help="the server without the freeze first")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sage-stall-"))
    cp = ControlPlane(state_dir=work / "state", port_range=(19800, 19899), use_nvml=False, fake_gpus=None,
                      adopt_unrecorded=False)
    try:
        engine = cp.start_engine(tiny_model(), name="tiny", max_model_len=2048)
        direct = (f"http://127.0.0.1:{engine['port']}/v1", cp.api_key("tiny"))
        for freeze in (False, True) if args.freeze_last else (True, False):
            server = JServer(work / f"server-{freeze}", work / "state", (f"--SageNBApp.freeze_gc={freeze}",))
            server.start()
            try:
                server.wait_backends({"tiny"}, timeout=120)
                targets = {"direct": direct, "gateway": (server.url + "sage_nb/v1", TOKEN)}
                asyncio.run(round_s(*targets["gateway"]))  # warm-up
                for name, (url, key) in targets.items():
                    rounds = [asyncio.run(round_s(url, key)) for _ in range(args.rounds)]
                    print(f"freeze_gc={freeze} {name}: " + " ".join(f"{r:.2f}" for r in rounds) + " s", flush=True)
            finally:
                server.stop()
    finally:
        cp.stop_all()
        cp.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
