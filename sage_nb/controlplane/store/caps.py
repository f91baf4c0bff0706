"""Memory caps in the machine-wide ledger: the box service's admin caps the GPU memory a user's own
private engines may book (``gpu_mib`` in its limits file); the service publishes the caps into the
ledger (:func:`publish_caps`) and every user's server checks each booking against them
(:func:`check_cap`). A user's cap is their own entry, else the most generous of their Unix groups',
else the default (:func:`pick`, the one resolution the limits file uses too)."""

from __future__ import annotations

import grp
import pwd
import sqlite3
import time
from collections.abc import Iterable, Mapping

from ..errors import Conflict

GROUPS_TTL = 10.0  # seconds a user's Unix groups are reused (reading /etc/group each request cost 50 us)
_groups: dict[str, tuple[float, frozenset[str]]] = {}
CAPS_SCHEMA = """
CREATE TABLE IF NOT EXISTS caps (
    scope TEXT NOT NULL,
    name TEXT NOT NULL,
    gpu_mib INTEGER,
    PRIMARY KEY (scope, name)
);
"""
Table = Mapping[str, Mapping[str, int]]


def pick(name: str, user: str, groups: Iterable[str], *, users: Table, groups_table: Table,
         default: Mapping[str, int]) -> tuple[int, str] | None:
    """``(value, where it comes from)`` of the limit ``name`` for ``user``: their own entry, else the most
    generous of their groups', else the default; None when none sets it."""
    own = users.get(user, {})
    if name in own:
        return own[name], "user"
    in_groups = [(g, groups_table[g][name]) for g in sorted(groups) if name in groups_table.get(g, {})]
    if in_groups:
        g, value = max(in_groups, key=lambda gv: gv[1])
        return value, f"group {g}"
    if name in default:
        return default[name], "default"
    return None


def unix_groups(user: str) -> frozenset[str]:
    """The Unix groups of ``user`` (its primary group too), cached ``GROUPS_TTL`` s; empty for a name the
    system does not know."""
    now = time.monotonic()
    hit = _groups.get(user)
    if hit is None or now - hit[0] > GROUPS_TTL:
        hit = _groups[user] = (now, frozenset(_read_groups(user)))
    return hit[1]


def _read_groups(user: str) -> set[str]:
    try:
        primary = pwd.getpwnam(user).pw_gid
    except KeyError:
        return set()
    names = {g.gr_name for g in grp.getgrall() if user in g.gr_mem}
    try:
        names.add(grp.getgrgid(primary).gr_name)
    except KeyError:
        pass
    return names


def publish_caps(conn: sqlite3.Connection, *, default: Mapping[str, int], groups: Table, users: Table,
                 exempt: str) -> None:
    """Write the memory caps (the ``gpu_mib`` of each limits entry) into the ledger, inside its
    transaction. ``exempt``: the service's own user (its shared engines are no one's own)."""
    conn.execute(CAPS_SCHEMA)
    conn.execute("DELETE FROM caps")
    rows: list[tuple[str, str, int | None]] = [("exempt", exempt, None)]
    if "gpu_mib" in default:
        rows.append(("default", "", default["gpu_mib"]))
    rows += [("group", g, e["gpu_mib"]) for g, e in groups.items() if "gpu_mib" in e]
    rows += [("user", u, e["gpu_mib"]) for u, e in users.items() if "gpu_mib" in e]
    conn.executemany("INSERT INTO caps (scope, name, gpu_mib) VALUES (?, ?, ?)", rows)


def cap_for(conn: sqlite3.Connection, user: str) -> tuple[int, str] | None:
    """``(MiB, where it comes from)`` that ``user``'s own engines may book, from the ledger; None: no cap."""
    try:
        rows = conn.execute("SELECT scope, name, gpu_mib FROM caps").fetchall()
    except sqlite3.OperationalError:  # no box service has published caps
        return None
    caps: dict[str, dict[str, dict[str, int]]] = {"default": {}, "group": {}, "user": {}, "exempt": {}}
    for scope, name, mib in rows:
        caps.setdefault(scope, {})[name] = {"gpu_mib": mib}
    if user in caps["exempt"]:
        return None
    return pick("gpu_mib", user, unix_groups(user), users=caps["user"], groups_table=caps["group"],
                default=caps["default"].get("", {}))


def check_cap(conn: sqlite3.Connection, user: str, uid: int, engine_id: str, gpu_uuid: str, mib: int) -> None:
    """A :class:`Conflict` (409) with the numbers when booking ``mib`` for ``engine_id`` on ``gpu_uuid``
    would take ``user``'s own engines over their memory cap."""
    cap = cap_for(conn, user)
    if cap is None:
        return
    limit, source = cap
    held = conn.execute("SELECT COALESCE(SUM(mib), 0) FROM bookings WHERE owner_uid = ? "
                        "AND NOT (engine_id = ? AND gpu_uuid = ?)", (uid, engine_id, gpu_uuid)).fetchone()[0]
    if held + mib > limit:
        raise Conflict(f"{user}'s own engines may book {limit:,} MiB of GPU memory on this box ({source} limit "
                       f"set by the admin); they hold {held:,} MiB and this needs {mib:,} MiB more. Stop "
                       f"an engine (%llm stop), use a shared one (%llm engines), or ask an admin")
