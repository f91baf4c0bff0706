"""``python -m sage_nb.admin``: what an admin of a shared GPU box runs (as root).

- ``init-shared DIR --group GROUP``: create the machine-wide GPU ledger: DIR owned by root and GROUP,
  mode 2770 (setgid, so every file made there gets GROUP), the database 0660 in WAL mode; then check.
- ``check DIR``: say what stops the group's users from sharing the ledger, or that nothing does.
- ``release DIR [--engine ID] [--user NAME] [--stale]``: remove bookings (any user's). ``--stale``
  judges only the bookings of this machine's GPUs by their pids; those of GPUs it does not have (the
  other nodes of a Ray cluster, where those pids live) are kept, and said so.
"""

from __future__ import annotations

import argparse
import grp
import os
import sys
from pathlib import Path

from sage_nb.controlplane.gpus.inventory import GpuInventory
from sage_nb.controlplane.settings import ENV_PREFIX, parse_fake_gpus
from sage_nb.controlplane.store import ledger


def init_shared(directory: Path, group: str) -> list[str]:
    """Create (or repair) the ledger in ``directory`` for ``group``; returns :func:`ledger.check`'s problems."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SystemExit(f"sage_nb admin: no group {group!r} (create it: groupadd {group}; add users: "
                         f"usermod -aG {group} USER)") from None
    directory.mkdir(parents=True, exist_ok=True)
    os.chown(directory, 0 if os.getuid() == 0 else -1, gid)
    os.chmod(directory, 0o2770)
    for name in (ledger.LEDGER_FILE, ledger.LEDGER_FILE + "-wal", ledger.LEDGER_FILE + "-shm"):
        path = directory / name
        if path.exists():  # repair what an earlier set-up (or a user) left
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
    problems = ledger.check(directory)
    if not problems:
        ledger.SharedLedger(directory)  # creates the database and its WAL files, group read-write
    return ledger.check(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sage_nb.admin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init-shared", help="create the machine-wide GPU ledger")
    init.add_argument("directory", type=Path)
    init.add_argument("--group", required=True, help="the group every GPU user is in")
    chk = sub.add_parser("check", help="say what is wrong with a ledger directory")
    chk.add_argument("directory", type=Path)
    rel = sub.add_parser("release", help="remove bookings of any user")
    rel.add_argument("directory", type=Path)
    rel.add_argument("--engine", help="this engine's bookings")
    rel.add_argument("--user", help="every booking of this user")
    rel.add_argument("--stale", action="store_true", help="those whose process is gone")
    args = parser.parse_args(argv)
    if args.command == "init-shared":
        problems = init_shared(args.directory, args.group)
    elif args.command == "check":
        problems = ledger.check(args.directory)
    else:
        return release(args)
    for problem in problems:
        print(f"sage_nb admin: {problem}", file=sys.stderr)
    if not problems:
        print(f"sage_nb admin: {args.directory} is ready: a GPU ledger every user of its group can share")
    return 1 if problems else 0


def this_machines_gpus() -> set[str]:
    """The uuids of this machine's GPUs (NVML, or the fake inventory in ``$SAGE_NB_FAKE_GPUS``; a fake
    GPU with a ``node`` is another node's)."""
    inventory = GpuInventory(parse_fake_gpus(os.environ.get(ENV_PREFIX + "FAKE_GPUS")))
    return {d.uuid for d in inventory.all_devices() if not d.node}


def release(args) -> int:
    if not (args.engine or args.user or args.stale):
        raise SystemExit("sage_nb admin: say which: --engine ID, --user NAME or --stale")
    shared = ledger.SharedLedger(args.directory)
    kept: list[dict] = []
    with shared.transaction() as conn:
        removed = []
        if args.stale:  # as a server's reaper does: pids on other machines are not judged here
            local = this_machines_gpus()
            kept = [r for r in shared.rows(conn) if r["gpu_uuid"] not in local]
            removed = ledger.reap(conn, remote={r["gpu_uuid"] for r in kept})
        for column, value in (("engine_id", args.engine), ("owner", args.user)):
            if value:
                removed += [r for r in shared.rows(conn) if r[column] == value]
                conn.execute(f"DELETE FROM bookings WHERE {column} = ?", (value,))
    for row in removed:
        print(f"released {row['mib']} MiB on {row['gpu_uuid']}: {row['owner']}'s engine {row['engine_name']} "
              f"({row['engine_id']})")
    if kept:
        gpus = ", ".join(sorted({r["gpu_uuid"] for r in kept}))
        print(f"kept {len(kept)} booking(s) of GPUs this machine does not have ({gpus}): their processes run "
              "elsewhere (another node of a Ray cluster), where their owners' servers release them; "
              "release them with --engine or --user")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ledger.LedgerError as e:
        sys.exit(f"sage_nb admin: {e.message}")
