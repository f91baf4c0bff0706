"""The report: ``latest.json`` (everything, raw cycles included) and ``latest.md`` (the table)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import Figure

TITLES = {"gateway": "1. Gateway overhead (fast stub upstream)", "engines": "2. Through real engines (CPU vLLM)",
          "launch": "3. Launch overhead", "refusal": "4. Refusal of a launch that fits no GPU",
          "rediscovery": "5. Rediscovery after a server restart", "scale": "6. Control-plane scale (1,000 records)",
          "rag": "7. RAG search and embedding throughput", "dashboard": "8. Dashboard cost",
          "placement": "10. Placement over nodes (16 × 8 GPUs)"}


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    a = abs(x)
    text = f"{x:.4g}" if a >= 100 or a == 0 else f"{x:.3g}" if a >= 0.01 else f"{x:.2e}"
    return f"{text} {unit}".strip()


def compared(f: dict) -> str:
    if f["compared"] is None:
        return "—"
    if f["mode"] == "diff":
        return ("+" if f["compared"] >= 0 else "") + fmt(f["compared"], f["unit"])
    return fmt(f["compared"]) + "×"


def markdown(meta: dict, results: dict) -> str:
    lines = ["# sage_nb benchmarks", "",
             f"`{meta['command']}` — {meta['started']} — {meta['mode']} mode, {meta['cycles']} interleaved "
             f"cycles, {meta['total_s']:.0f} s in all.", "",
             f"Machine: {meta['machine']}. Load average before / after: {meta['load_before']} / "
             f"{meta['load_after']}.", "",
             "Every figure is measured against a baseline taken in the same run, interleaved with it "
             "(medians over the cycles): Δ is value − baseline, × is value / baseline.", "",
             "| figure | value | baseline | Δ or × | goal | met |", "|---|---|---|---|---|---|"]
    notes = []
    for name, res in sorted(results.items(), key=lambda kv: list(TITLES).index(kv[0]) if kv[0] in TITLES else 99):
        lines.append(f"| **{TITLES.get(name, name)}** | | | | | |")
        if res.get("error"):
            lines.append(f"| failed: {res['error'][:200]} | | | | | |")
        for f in res.get("figures", []):
            met = {True: "yes", False: "**no**", None: ""}[f["met"]]
            base = f"{fmt(f['baseline'], f['unit'])} ({f['baseline_name']})" if f["baseline_name"] else fmt(
                f["baseline"], f["unit"])
            lines.append(f"| {f['name']} | {fmt(f['value'], f['unit'])} | {base} | {compared(f)} | "
                         f"{f['goal']} | {met} |")
            if f["note"]:
                notes.append(f"- {f['name']}: {f['note']}")
        for what, why in (res.get("raw") or {}).get("skipped", {}).items():
            notes.append(f"- {TITLES.get(name, name)}: {what} skipped: {why}")
    if notes:
        lines += ["", "Notes:", "", *notes]
    missed = [f["name"] for r in results.values() for f in r.get("figures", []) if f["met"] is False]
    lines += ["", "Goals missed: " + (", ".join(missed) if missed else "none"), ""]
    return "\n".join(lines)


def write(out_dir: Path, meta: dict, results: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for res in results.values():
        res["figures"] = [f.to_json() if isinstance(f, Figure) else f for f in res.get("figures", [])]
    js, md = out_dir / "latest.json", out_dir / "latest.md"
    js.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    md.write_text(markdown(meta, results))
    return md, js


def write_results(out: Path, meta: dict, name: str, figs: list[Figure], raw: dict, title: str) -> str:
    """A one-part benchmark's ``OUT.json`` and ``OUT.md`` (under ``title``); returns the markdown."""
    results = {name: {"figures": [f.to_json() for f in figs], "raw": raw, "seconds": meta["total_s"]}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    text = markdown(meta, results).replace("# sage_nb benchmarks", f"# sage_nb: {title}", 1)
    out.with_suffix(".md").write_text(text)
    return text
