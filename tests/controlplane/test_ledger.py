"""The machine-wide GPU ledger's set-up and its permission traps, with real Unix groups and users
(CI runs as root): ``python -m sage_nb.admin init-shared``, a directory without the setgid bit, a
database another user created 0644, and stale bookings reaped by any reader."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from sage_nb import admin
from sage_nb.controlplane.store import ledger
from sage_nb.controlplane.store.ledger import LedgerError, SharedLedger

# these create Unix users and groups: they run as root, as CI does


@pytest.fixture
def group():
    name = f"sagegpu{secrets.token_hex(3)}"
    subprocess.run(["groupadd", name], check=True)
    yield name
    subprocess.run(["groupdel", name], check=False)


@pytest.fixture
def other_user(group):
    name = f"sageu{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "-G", group, name], check=True)
    yield name
    subprocess.run(["userdel", name], check=False)


@pytest.fixture
def reachable_tmp():
    """A directory other users can reach (pytest's own tmp dirs are 0700 root)."""
    path = tempfile.mkdtemp(prefix="sage-ledger-", dir="/tmp")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_shared_makes_a_group_ledger(tmp_path, group, capsys):
    directory = tmp_path / "sage_nb"
    assert admin.main(["init-shared", str(directory), "--group", group]) == 0
    assert "is ready: a GPU ledger every user of its group can share" in capsys.readouterr().out
    gid = __import__("grp").getgrnam(group).gr_gid
    assert mode(directory) == 0o2770 and os.stat(directory).st_gid == gid
    for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
        path = directory / name
        if path.exists():  # -wal/-shm exist while a connection is open
            assert mode(path) & 0o060 == 0o060 and os.stat(path).st_gid == gid, name
    assert (directory / "ledger.sqlite3").exists() and ledger.check(directory) == []
    assert admin.main(["check", str(directory)]) == 0


def test_a_directory_without_the_setgid_bit_is_a_clear_error(tmp_path, group, capsys):
    directory = tmp_path / "ledger"
    admin.init_shared(directory, group)
    os.chmod(directory, 0o770)
    with pytest.raises(LedgerError, match=r"lacks the setgid bit \(mode 0770\).*python -m sage_nb.admin init-shared"):
        SharedLedger(directory)
    assert admin.main(["check", str(directory)]) == 1
    assert "lacks the setgid bit" in capsys.readouterr().err
    assert admin.init_shared(directory, group) == [] and mode(directory) == 0o2770  # repaired


def test_a_database_another_user_created_0644_is_a_clear_error(reachable_tmp, group, other_user):
    directory = reachable_tmp / "ledger"
    directory.mkdir()
    os.chown(directory, 0, __import__("grp").getgrnam(group).gr_gid)
    os.chmod(directory, 0o2770)
    # the other user creates it first with a usual umask (an empty file is an empty SQLite database)
    subprocess.run(["runuser", "-u", other_user, "--", "sh", "-c", "umask 022 && touch ledger.sqlite3"],
                   cwd=directory, check=True)
    db = directory / "ledger.sqlite3"
    assert mode(db) == 0o644 and psutil.Process().username() != other_user
    with pytest.raises(LedgerError) as info:
        SharedLedger(directory)
    message = info.value.message
    assert f"belongs to {other_user}:{group} with mode 0644" in message and "(0660)" in message
    assert "readonly" not in message and "init-shared" in message
    assert admin.init_shared(directory, group) == [] and mode(db) == 0o660  # the admin command repairs it


def test_stale_bookings_are_reaped_by_any_reader(tmp_path, group, capsys):
    directory = tmp_path / "ledger"
    admin.init_shared(directory, group)
    shared = SharedLedger(directory)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_start = psutil.Process(gone.pid).create_time()
    gone.wait()
    me = psutil.Process()
    with shared.transaction() as conn:
        SharedLedger.book(conn, engine_id="dead", engine_name="killed", gpu_uuid="GPU-0", gpu_index=0, mib=40960,
                          pid=gone.pid, start_time=gone_start)
        SharedLedger.book(conn, engine_id="live", engine_name="mine", gpu_uuid="GPU-0", gpu_index=0, mib=8192,
                          pid=me.pid, start_time=me.create_time())
        SharedLedger.book(conn, engine_id="launching", engine_name="new", gpu_uuid="GPU-1", gpu_index=1, mib=1024)
    rows = SharedLedger(directory).bookings()  # another reader: reaps the dead one
    assert sorted(r["engine_id"] for r in rows) == ["launching", "live"]
    assert {r["owner"] for r in rows} == {me.username()} and rows[0]["owner_uid"] == os.getuid()
    assert admin.main(["release", str(directory), "--engine", "launching"]) == 0
    assert "released 1024 MiB on GPU-1" in capsys.readouterr().out
    assert [r["engine_id"] for r in shared.bookings()] == ["live"]


def test_admin_release_stale_judges_only_this_machines_gpus(tmp_path, group, capsys, monkeypatch):
    """``release --stale`` keeps the bookings of GPUs this machine does not have (a Ray cluster's
    other nodes: their pids are not this machine's), as a server's reaper does, and says so."""
    monkeypatch.setenv("SAGE_NB_FAKE_GPUS", '[{"total_mib": 81920, "uuid": "GPU-here"}, '
                       '{"total_mib": 81920, "uuid": "GPU-there", "node": "n2"}]')
    directory = tmp_path / "ledger"
    admin.init_shared(directory, group)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_start = psutil.Process(gone.pid).create_time()
    gone.wait()
    with SharedLedger(directory).transaction() as conn:
        for engine_id, uuid in (("dead-here", "GPU-here"), ("on-node", "GPU-there"), ("on-other-box", "GPU-x")):
            SharedLedger.book(conn, engine_id=engine_id, engine_name=engine_id, gpu_uuid=uuid, gpu_index=0,
                              mib=1024, pid=gone.pid, start_time=gone_start)
    assert admin.main(["release", str(directory), "--stale"]) == 0
    out = capsys.readouterr().out
    assert "released 1024 MiB on GPU-here" in out and "kept 2 booking(s)" in out and "GPU-x" in out, out
    with SharedLedger(directory).transaction() as conn:
        assert sorted(r["engine_id"] for r in SharedLedger.rows(conn)) == ["on-node", "on-other-box"]


def test_files_get_their_modes_under_any_umask_and_the_umask_is_left_alone(tmp_path, group, monkeypatch):
    """The process's umask is shared by every thread of a server: changing it for a moment, from
    several threads, once left it at 077 for good (and every file the server made after private)."""
    from sage_nb.controlplane.store.registry import Registry

    directory = tmp_path / "ledger"
    directory.mkdir()
    os.chown(directory, 0, __import__("grp").getgrnam(group).gr_gid)
    os.chmod(directory, 0o2770)
    changes, umask = [], os.umask
    monkeypatch.setattr(os, "umask", lambda m: changes.append(m) or umask(m))
    old = umask(0o077)  # a private umask would make the ledger unusable for the group
    try:
        shared = SharedLedger(directory)
        threads = [threading.Thread(target=shared.bookings) for _ in range(8)]  # a connection each
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        umask(0)  # an open umask must not make a registry (with the engines' keys) readable to others
        registry = Registry(tmp_path / "state" / "registry.sqlite3")
        with registry.transaction():
            pass
        assert umask(0o022) == 0
    finally:
        umask(old)
    assert changes == []
    for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
        assert mode(directory / name) == 0o660, name
    for suffix in ("", "-wal", "-shm"):
        assert mode(tmp_path / "state" / f"registry.sqlite3{suffix}") == 0o600, suffix
