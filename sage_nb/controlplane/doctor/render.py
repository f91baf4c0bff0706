"""The GPU doctor's report and launch steps as tables: ``(title, columns, rows, footer)`` sections that the
command line prints as aligned text (:func:`text`) and ``%llm doctor --gpu`` shows as HTML tables."""

from __future__ import annotations

import time

Section = tuple[str, list[str], list[list[str]], str | None]


def _mib(value) -> str:
    return "" if value is None else f"{value:,}"


def device_label(row: dict) -> str:
    """``0``; ``GPU1 (MIG mode)``; ``2 (MIG of GPU1)``."""
    if row["kind"] == "mig-gpu":
        return f"GPU{row['gpu_index']} (MIG mode)"
    return f"{row['index']} (MIG of GPU{row['gpu_index']})" if row["kind"] == "mig" else str(row["index"])


def _torch_cell(row: dict) -> str:
    t = row.get("torch")
    if not t:
        return ""
    return f"{_mib(t['free_mib'])} vs {_mib(t['nvml_free_mib'])} ({t['diff_mib']:+,}{'' if t['agrees'] else ' !'})"


def _holder(h: dict, me: str) -> str:
    if h["kind"] == "engine":
        whose = f"yours ({me})" if h["mine"] else f"{h['user']}'s"
        return f"engine {h['engine']}, {whose}, booked {_mib(h['booked_mib'])} MiB"
    if h["kind"] == "process":
        return f"process {h['command']} (pid {h['pid']}) of {h['user']}"
    return "not accounted for by any listed process"


def sections(model: dict) -> list[Section]:
    """The report's tables: the checks, the devices (MiB), and who holds each device's memory."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(model["time"]))
    problems = model["problems"]
    verdict = "all good (exit status 0)" if not problems else \
        f"{problems} problem(s): see the WARN and FAIL lines (exit status 1)"
    out: list[Section] = [(f"sage_nb GPU doctor on {model['host']} ({when}, as {model['user']})",
                           ["status", "check", "detail"],
                           [[c["status"], c["check"], c["detail"]] for c in model["checks"]], verdict)]
    if model["devices"]:
        rows = [[device_label(r), r["uuid"], r["name"], _mib(r["total_mib"]), _mib(r["used_mib"]),
                 _mib(r["free_mib"]), "yes" if r["usable"] else "no", _torch_cell(r)] for r in model["devices"]]
        tol = model["tolerance"]["text"]
        out.append((f"GPU devices ({'fake inventory' if model['source'] == 'fake' else 'NVML'}; MiB)",
                    ["device", "uuid", "name", "total", "used", "free", "this server", "free: torch vs NVML (diff)"],
                    rows,
                    f"free: torch vs NVML: torch.cuda.mem_get_info and NVML read at the same moment (the probe's CUDA "
                    f"context counted in both); ! marks a difference beyond {tol}"))
        held = [[device_label(r), _mib(h["used_mib"]), _holder(h, model["user"])]
                for r in model["devices"] for h in r["holders"]]
        out.append(("who holds the GPU memory (as %llm gpus attributes it)", ["device", "MiB", "held by"], held,
                    None))
    else:
        why = "no NVIDIA GPU on this machine" if model["nvml"]["no_driver"] else "none that sage_nb can read"
        out.append((f"GPU devices: {why}; engines run on the CPU", [], [], None))
    return out


def launch_section(steps: list[dict]) -> Section:
    """The launch check's steps (PASS, FAIL or SKIP each, with its figures)."""
    failed = sum(s["status"] == "FAIL" for s in steps)
    footer = "launch check passed" if not failed else f"launch check: {failed} step(s) FAILED"
    return ("launch check: a stand-in CUDA engine through the Supervisor, placement and GPU ledger",
            ["status", "step", "detail"], [[s["status"], s["step"], s["detail"]] for s in steps], footer)


def table(section: Section) -> str:
    """One section as aligned text."""
    title, columns, rows, footer = section
    lines = [title]
    if not columns:
        pass
    elif rows:
        widths = [max(len(c), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
        widths[-1] = len(columns[-1])  # the last column runs on: no padding to its longest cell
        lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    else:
        lines.append("  (none)")
    if footer:
        lines.append(footer)
    return "\n".join(lines)


def text(model: dict) -> str:
    """The whole report as text."""
    return "\n\n".join(table(s) for s in sections(model))
