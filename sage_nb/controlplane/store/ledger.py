"""The machine-wide GPU ledger (opt-in): every user's GPU bookings on a shared box in one SQLite file.

Each user's registry stays private (0600: keys, logs, engine records); the ledger holds only what
others may see: owner (uid and name), engine id and name, GPU uuid, MiB, and the engine's pid and
process start time, by which any reader can tell a stale booking (its process is gone) and reap it.

SQLite in WAL mode across uids has traps: the ``-wal`` and ``-shm`` files are created by whoever
opens the database first, with that user's ownership and umask. So the ledger lives in a setgid
directory of a group every user is in (files inherit the group), every file is group-writable
(the database is created 0660, and SQLite gives its -wal and -shm the same mode), and :func:`check`
says what is wrong, in words, before SQLite would say "attempt to write a readonly database". NFS
breaks WAL's shared memory: the ledger must be on local disk. ``python -m sage_nb.admin init-shared
DIR --group GROUP`` sets it up.
"""

from __future__ import annotations

import grp
import os
import pwd
import sqlite3
import stat
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..engines import process
from ..errors import StateError
from .caps import check_cap

LEDGER_FILE = "ledger.sqlite3"
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "lustre", "gpfs", "ceph")
SCHEMA = """
CREATE TABLE IF NOT EXISTS bookings (
    engine_id TEXT NOT NULL,
    gpu_uuid TEXT NOT NULL,
    gpu_index INTEGER NOT NULL,
    mib INTEGER NOT NULL,
    owner_uid INTEGER NOT NULL,
    owner TEXT NOT NULL,
    engine_name TEXT NOT NULL,
    pid INTEGER,
    start_time REAL,
    booked_at REAL NOT NULL,
    PRIMARY KEY (engine_id, gpu_uuid)
);
"""
COLUMNS = ("engine_id", "gpu_uuid", "gpu_index", "mib", "owner_uid", "owner", "engine_name", "pid",
           "start_time", "booked_at")


class LedgerError(StateError):
    """The shared ledger cannot be used as it is set up (503); the message says what to fix."""


def fix_hint(directory: Path) -> str:
    return (f"an admin sets it up with: python -m sage_nb.admin init-shared {directory} --group <group of "
            "the GPU users>")


def _who(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def filesystem(path: Path) -> str | None:
    """The type of the file system ``path`` is on (from /proc/mounts), or ``None`` if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")) \
                and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def create_mode(path: Path, mode: int) -> None:
    """Create the SQLite file ``path`` with exactly ``mode`` if it does not exist yet. SQLite gives the
    ``-wal`` and ``-shm`` files the database file's mode, but would make the file itself 0644 less
    the umask. The umask is not touched: it is the whole process's, and a server's other threads
    would create their files under it (changing it for a moment, from several threads, can leave it
    changed for good)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, mode)  # the umask took bits off
    finally:
        os.close(fd)


def check(directory: str | os.PathLike) -> list[str]:
    """What stops the users of the group from sharing the ledger in ``directory`` (empty: nothing)."""
    directory = Path(directory)
    try:
        st = directory.stat()
    except FileNotFoundError:
        return [f"{directory} does not exist"]
    except OSError as e:
        return [f"{directory} cannot be read: {e.strerror}"]
    if not stat.S_ISDIR(st.st_mode):
        return [f"{directory} is not a directory"]
    problems = []
    mode = stat.S_IMODE(st.st_mode)
    if not mode & stat.S_ISGID:
        problems.append(f"{directory} lacks the setgid bit (mode {mode:04o}): files others create there "
                        f"would not get its group {_group(st.st_gid)!r}")
    if mode & 0o070 != 0o070:
        problems.append(f"{directory} is not readable, writable and searchable by its group "
                        f"{_group(st.st_gid)!r} (mode {mode:04o})")
    fs = filesystem(directory)
    if fs in NETWORK_FS:
        problems.append(f"{directory} is on {fs}: SQLite's WAL needs local disk (put the ledger under /var/lib)")
    for name in (LEDGER_FILE, LEDGER_FILE + "-wal", LEDGER_FILE + "-shm"):
        path = directory / name
        try:
            fst = path.stat()
        except FileNotFoundError:
            continue
        fmode = stat.S_IMODE(fst.st_mode)
        if fmode & 0o060 != 0o060 or fst.st_gid != st.st_gid:
            problems.append(f"{path} belongs to {_who(fst.st_uid)}:{_group(fst.st_gid)} with mode {fmode:04o}: "
                            f"it must be readable and writable by the group {_group(st.st_gid)!r} (0660)")
    return problems


class SharedLedger:
    """The ledger in ``directory``; :class:`LedgerError` with what to fix when it cannot be used."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LEDGER_FILE
        problems = check(self.directory)
        if problems:
            raise LedgerError(f"the shared GPU ledger {self.directory} cannot be used: {'; '.join(problems)}. "
                              f"{fix_hint(self.directory)}")
        self._local = threading.local()  # one connection per thread, as the registry has
        with self.transaction() as conn:
            conn.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                create_mode(self.path, 0o660)
                conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
                conn.execute("PRAGMA busy_timeout=30000")
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
            except (sqlite3.Error, OSError) as e:
                raise self._explain(e) from None
            self._local.conn = conn
        return conn

    def _explain(self, error: Exception) -> LedgerError:
        problems = check(self.directory)
        why = "; ".join(problems) if problems else f"{error} (as {_who(os.getuid())})"
        return LedgerError(f"the shared GPU ledger {self.path} cannot be written: {why}. {fix_hint(self.directory)}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): exclusive against every user's writers."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._explain(e) from None
        try:
            yield conn
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise self._explain(e) from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ bookings
    @staticmethod
    def rows(conn: sqlite3.Connection) -> list[dict]:
        """Every booking, as dicts of :data:`COLUMNS`."""
        return [dict(zip(COLUMNS, row, strict=True))
                for row in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM bookings ORDER BY booked_at")]

    def bookings(self) -> list[dict]:
        """Every user's bookings now (stale ones reaped first)."""
        with self.transaction() as conn:
            reap(conn)
            return self.rows(conn)

    @staticmethod
    def book(conn: sqlite3.Connection, *, engine_id: str, engine_name: str, gpu_uuid: str, gpu_index: int,
             mib: int, pid: int | None = None, start_time: float | None = None) -> None:
        """Book ``mib`` on a GPU for one engine of this user (inside :meth:`transaction`); a
        :class:`~..errors.Conflict` when it would take the user over the memory cap the box service's
        admin set (:mod:`.caps`)."""
        uid = os.getuid()
        check_cap(conn, _who(uid), uid, engine_id, gpu_uuid, mib)
        conn.execute(f"INSERT OR REPLACE INTO bookings ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                     (engine_id, gpu_uuid, gpu_index, mib, uid, _who(uid), engine_name, pid, start_time, time.time()))

    @staticmethod
    def release(conn: sqlite3.Connection, engine_id: str) -> None:
        """Release this user's bookings of one engine."""
        conn.execute("DELETE FROM bookings WHERE engine_id = ? AND owner_uid = ?", (engine_id, os.getuid()))


def reap(conn: sqlite3.Connection, grace_s: float = 60.0, remote: Collection[str] = ()) -> list[dict]:
    """Release the bookings whose process is gone (by pid and start time), whoever made them; a
    booking without a pid yet is kept for ``grace_s`` (its engine is being launched). Bookings of the
    ``remote`` GPU uuids (other nodes of a Ray cluster: their pids are not this machine's) are kept:
    their engines' supervisors release them."""
    now, gone = time.time(), []
    for row in SharedLedger.rows(conn):
        if row["gpu_uuid"] in remote:
            continue
        if row["pid"] is None:
            stale = now - row["booked_at"] > grace_s
        else:
            stale = not process.is_alive(row["pid"], row["start_time"])
        if stale:
            gone.append(row)
            conn.execute("DELETE FROM bookings WHERE engine_id = ? AND gpu_uuid = ?",
                         (row["engine_id"], row["gpu_uuid"]))
    return gone
