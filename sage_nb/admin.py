"""``python -m sage_nb.admin``: what an admin of a shared GPU box runs (as root).

- ``init-shared DIR --group GROUP``: create the machine-wide GPU ledger: DIR owned by root and GROUP,
  mode 2770 (setgid, so every file made there gets GROUP), the database 0660 in WAL mode; then check.
- ``check DIR``: say what stops the group's users from sharing the ledger, or that nothing does.
- ``add-key USER --service-dir DIR [--key-file PATH]``: issue USER a key for a standalone box service: its
  hash goes to the service's key store (DIR, the service's state directory), the key to USER's key file
  (default ``/etc/sage_nb/keys/USER``: USER's own, 0400, in a root-owned folder nobody may list).
- ``revoke-key USER --service-dir DIR``: revoke every key of USER (refused from the next request on)
  and remove their key file.
- ``list-keys --service-dir DIR``: the users with keys.
- ``release DIR [--engine ID] [--user NAME] [--stale]``: remove bookings (any user's). ``--stale``
  judges only the bookings of this machine's GPUs by their pids; those of GPUs it does not have (the
  other nodes of a Ray cluster, where those pids live) are kept, and said so.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import sys
from pathlib import Path

from sage_nb.controlplane.gpus.inventory import GpuInventory
from sage_nb.controlplane.settings import ENV_PREFIX, parse_fake_gpus
from sage_nb.controlplane.store import keys, ledger


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
    for name, text in (("add-key", "issue a user a key for a standalone box service"),
                       ("revoke-key", "revoke every key of a user"), ("list-keys", "the users with keys")):
        cmd = sub.add_parser(name, help=text)
        if name != "list-keys":
            cmd.add_argument("user")
        cmd.add_argument("--service-dir", type=Path, required=True, help="the box service's state directory")
        if name != "list-keys":
            cmd.add_argument("--key-file", type=Path, help="the user's key file (default /etc/sage_nb/keys/USER)")
    args = parser.parse_args(argv)
    if args.command in ("add-key", "revoke-key", "list-keys"):
        return box_keys(args)
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


def box_keys(args) -> int:
    """``add-key``, ``revoke-key`` and ``list-keys``."""
    service_dir = args.service_dir
    if not service_dir.is_dir():
        raise SystemExit(f"sage_nb admin: no box service state directory {service_dir} (the service's --state-dir)")
    store = keys.KeyStore(service_dir)
    owner = service_dir.stat().st_uid  # the key store stays the service user's own
    if args.command == "list-keys":
        for user, count in sorted(store.users().items()):
            print(f"{user}\t{count} key(s)")
        return 0
    try:
        entry = pwd.getpwnam(args.user)
    except KeyError:
        raise SystemExit(f"sage_nb admin: no user {args.user!r} on this machine") from None
    key_file = args.key_file or keys.DEFAULT_KEY_DIR / args.user
    if args.command == "revoke-key":
        count = store.revoke(args.user, owner)
        key_file.unlink(missing_ok=True)
        print(f"revoked {count} key(s) of {args.user}; removed {key_file}")
        return 0
    key = store.issue(args.user, owner)
    keys.write_key_file(key_file, key, entry.pw_uid, entry.pw_gid)
    print(f"issued {args.user} a key: {key_file} (theirs alone, 0400); their server reads it there"
          + ("" if key_file == keys.DEFAULT_KEY_DIR / args.user else f" once box_key_file = {key_file}"))
    return 0


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
    except (ledger.LedgerError, keys.KeyStoreError) as e:
        sys.exit(f"sage_nb admin: {e.message}")
