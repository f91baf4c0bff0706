"""One GPU's memory as a bar of who holds it, with a legend: the dashboard's GPU rows.

With the control plane's ``parts`` (see ``controlplane/gpus/attribution.py``) the bar has a segment per
engine of this user (shades of blue, by name), per engine of another sage_nb user (shades of
orange, "user: engine"), per other process NVML lists (shades of purple, "user: command"), then
what nothing accounts for (grey) and free (light green); what an engine has booked but does not
use yet is hatched in that engine's colour. Without ``parts`` (an older server) the bar has the
three parts it always had: used by others, booked by sage_nb, free. On a Ray cluster the bars are
grouped under a heading per node (``gpu_rows_html``). Every name is HTML-escaped.
"""

from __future__ import annotations

import html

COLORS = {"other": "#9e9e9e", "booked": "#1f77b4", "free": "#d9ead3"}  # the bar without parts
SHADES = {"mine": ("#1f77b4", "#6baed6", "#08519c", "#9ecae1"),      # this user's engines: blues
          "others": ("#e6550d", "#fd8d3c", "#a63603", "#fdae6b"),    # other sage_nb users: oranges
          "process": ("#756bb1", "#9e9ac8", "#54278f", "#bcbddc")}   # other processes: purples
BAR = "class='sage-nb-bar' style='display:flex;height:14px;border:1px solid #888;width:100%'"
UNACCOUNTED, FREE, UNUSED = "#9e9e9e", "#d9ead3", "#607d8b"
GROUPS = {"mine": "your engines", "others": "other sage_nb users", "process": "other processes"}


def hatch(color: str) -> str:
    """The background of a booked-but-not-yet-used part: stripes of ``color`` on white."""
    return f"repeating-linear-gradient(135deg,{color} 0 3px,#ffffff 3px 6px)"


def node_label(node: str | None, nodes: dict | None = None) -> str:
    """A node's short name: its id's first 8 hex digits and, when known, its address."""
    if not node:
        return "this machine"
    address = ((nodes or {}).get(node) or {}).get("address")
    return f"node {node[:8]}" + (f" ({address})" if address else "")


def by_node(devices: list[dict]) -> list[tuple[str | None, list[dict]]]:
    """The devices grouped by their ``node``, nodes in the order they first appear; one group
    with node None when no device has a node (one machine)."""
    groups: dict[str | None, list[dict]] = {}
    for d in devices:
        groups.setdefault(d.get("node"), []).append(d)
    return list(groups.items())


def gpu_rows_html(report: dict) -> list[str]:
    """The GPU report's bars; on a cluster (any device has a node) each node's bars under a heading."""
    devices = [{**g, "source": report["source"]} for g in report["devices"]]
    if not any(d.get("node") for d in devices):
        return [gpu_bar_html(d) for d in devices]
    rows = []
    for node, group in by_node(devices):
        rows.append(f"<div class='sage-nb-node' data-node='{_e(node or '')}' style='font-weight:bold;"
                    f"margin:6px 0 2px 0'>{_e(node_label(node, report.get('nodes')))} — "
                    f"{len(group)} GPU{'s' if len(group) != 1 else ''}</div>")
        rows += [gpu_bar_html(d) for d in group]
    return rows


def gpu_bar_html(gpu: dict) -> str:
    """One GPU as a bar: its ``parts`` with a legend when the server sends them, else
    used by others, booked by sage_nb and free."""
    parts = gpu.get("parts")
    if not parts:
        return _plain_bar(gpu)
    segs, legend = _attributed(parts)
    total = max(1, gpu["total_mib"])
    scale = max(total, sum(mib for _, mib, _, _ in segs))  # never wider than the bar
    bar = "".join(f"<div class='sage-nb-seg sage-nb-{cls}' data-mib='{mib}' title='{_e(tip)}: {mib} MiB' "
                  f"style='width:{100 * mib / scale:.2f}%;background:{bg}'></div>"
                  for cls, mib, tip, bg in segs if mib > 0)
    yours = sum(max(e["booked_mib"], e["used_mib"]) for e in parts["mine"])
    others = (sum(max(e["booked_mib"], e["used_mib"]) for e in parts["others"]) + parts["unaccounted_mib"]
              + sum(p["used_mib"] for p in parts["processes"]))
    return (f"<div class='sage-nb-gpu'><b>GPU{gpu['index']}</b> {_e(gpu['name'])} — "
            f"{yours} MiB your engines, {others} MiB others, {parts['free_mib']} MiB free of {total} MiB"
            f"{_util(gpu)}<div {BAR}>{bar}</div>"
            f"<div class='sage-nb-legend' style='display:flex;flex-wrap:wrap;gap:2px 14px;"
            f"font-size:85%;margin:2px 0 6px 0'>{legend}</div></div>")


def _attributed(parts: dict) -> tuple[list[tuple[str, int, str, str]], str]:
    """The bar's segments (class, MiB, tooltip, background) and the legend's HTML."""
    segs: list[tuple[str, int, str, str]] = []
    groups: dict[str, list[str]] = {"mine": [], "others": [], "process": []}
    unused_seen = 0
    for group, entries in (("mine", parts["mine"]), ("others", parts["others"])):
        for i, e in enumerate(entries):
            color = SHADES[group][i % len(SHADES[group])]
            label = e["name"] if group == "mine" else f"{e['user']}: {e['name']}"
            unused = max(0, e["booked_mib"] - e["used_mib"])
            unused_seen += unused
            segs.append((group, e["used_mib"], f"{label} (in use)", color))
            segs.append((f"{group}-unused sage-nb-unused", unused, f"{label} (booked, not yet used)", hatch(color)))
            more = f" + {unused} booked" if unused else ""
            groups[group].append(_key(color, f"{label} {e['used_mib']} MiB used{more}", group))
    for i, p in enumerate(parts["processes"]):
        color = SHADES["process"][i % len(SHADES["process"])]
        label = f"{p['user']}: {p['command']}"
        segs.append(("process", p["used_mib"], f"{label} (pid {p['pid']})", color))
        groups["process"].append(_key(color, f"{label} {p['used_mib']} MiB", "process", f"pid {p['pid']}"))
    rest = max(0, parts["booked_unused_mib"] - unused_seen)  # bookings of no engine listed here
    segs += [("unaccounted", parts["unaccounted_mib"], "used, accounted for by nothing listed", UNACCOUNTED),
             ("unused", rest, "booked, not yet used", hatch(UNUSED)), ("free", parts["free_mib"], "free", FREE)]
    legend = [f"<span class='sage-nb-legend-group'><b>{GROUPS[g]}</b> {' '.join(keys)}</span>"
              for g, keys in groups.items() if keys]
    if parts["unaccounted_mib"]:
        legend.append(_key(UNACCOUNTED, f"unaccounted {parts['unaccounted_mib']} MiB", "unaccounted",
                           "used memory that no engine or listed process accounts for"))
    if parts["booked_unused_mib"]:
        legend.append(_key(hatch(UNUSED), f"booked, not yet used {parts['booked_unused_mib']} MiB", "unused",
                           "hatched: booked by an engine that does not use it yet (loading)"))
    legend.append(_key(FREE, f"free {parts['free_mib']} MiB", "free", "free for new engines"))
    return segs, "".join(legend)


def _key(background: str, text: str, cls: str, tip: str = "") -> str:
    """A legend entry: a colour swatch and its text."""
    title = f" title='{_e(tip)}'" if tip else ""
    return (f"<span class='sage-nb-key sage-nb-key-{cls}'{title} style='white-space:nowrap'>"
            f"<span style='display:inline-block;width:10px;height:10px;margin-right:3px;"
            f"vertical-align:middle;border:1px solid #888;background:{background}'></span>{_e(text)}</span>")


def _plain_bar(gpu: dict) -> str:
    """The bar of a server that does not attribute memory: used by others, booked, free."""
    total = max(1, gpu["total_mib"])
    booked = min(gpu["booked_mib"], gpu["total_mib"])
    other = max(0, gpu["used_mib"] - booked) if gpu.get("source") == "nvml" else gpu["used_mib"]
    free = max(0, total - other - booked)
    parts = [("other", other, "used by others"), ("booked", booked, "booked by sage_nb"), ("free", free, "free")]
    segs = "".join(f"<div title='{label}: {mib} MiB' style='width:{100 * mib / total:.2f}%;"
                   f"background:{COLORS[key]}' class='sage-nb-seg sage-nb-{key}'></div>"
                   for key, mib, label in parts if mib > 0)
    return (f"<div class='sage-nb-gpu'><b>GPU{gpu['index']}</b> {_e(gpu['name'])} — "
            f"{other} MiB others, {booked} MiB booked, {free} MiB free of {total} MiB{_util(gpu)}"
            f"<div {BAR}>{segs}</div></div>")


def _util(gpu: dict) -> str:
    return "" if gpu.get("utilization") is None else f" · util {gpu['utilization']}%"


def _e(text) -> str:
    return html.escape(str(text), quote=True)
