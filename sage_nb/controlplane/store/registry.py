"""The one registry: engines, port leases and GPU bookings in SQLite (WAL).

Every process of the user (the Jupyter server and each kernel) opens the same
file; each change runs in one ``BEGIN IMMEDIATE`` transaction, so two processes
can never lease the same port or book the same GPU memory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import NotFound, StateError
from ..public import public_model
from ..state import EngineState, check_transition
from .ledger import SharedLedger, create_mode

SCHEMA = """
CREATE TABLE IF NOT EXISTS engines (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS port_leases (
    port INTEGER PRIMARY KEY,
    engine_id TEXT NOT NULL,
    leased_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_bookings (
    engine_id TEXT NOT NULL,
    gpu_index INTEGER NOT NULL,
    gpu_uuid TEXT NOT NULL,
    mib INTEGER NOT NULL,
    PRIMARY KEY (engine_id, gpu_uuid)
);
"""

log = logging.getLogger(__name__)


def _corrupt(error: sqlite3.DatabaseError) -> bool:
    text = str(error).lower()
    return "not a database" in text or "malformed" in text or "corrupt" in text


@dataclass
class Engine:
    """One engine record. :meth:`to_model` is the public JSON model (no secrets)."""

    id: str
    name: str
    model: str
    served_model_name: str
    kind: str
    state: str = EngineState.STARTING.value
    pid: int | None = None
    create_time: float | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    api_key: str = ""
    gpu_ids: list[int] = field(default_factory=list)
    node: str | None = None  # the node its GPUs are on (None: this machine)
    booked_mib: int = 0
    device: str = "cpu"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    dtype: str | None = None
    extra_args: list[str] = field(default_factory=list)
    adopted: bool = False
    port_requested: bool = False
    launch_attempts: int = 0
    note: str | None = None
    created_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    stopped_at: float | None = None
    error: str | None = None
    log_path: str | None = None
    health_failures: int = 0
    launch_env: dict[str, str] = field(default_factory=dict)
    # idle engines: keep-alive in seconds (None: forever), the last request, how it sleeps
    keep_alive: float | None = None
    last_used_at: float | None = None
    launched_at: float | None = None  # the latest launch (a relaunch after unloading too)
    sleep_mode: bool = False  # launched with vLLM's --enable-sleep-mode
    sleep_level: int | None = None
    dormant_since: float | None = None  # went sleeping or unloaded
    wake_started_at: float | None = None  # a wake is under way (a request waits for it)
    weights_mib: int = 0
    host_mib: int = 0  # on a machine without GPUs: the host memory it was sized to take
    request: dict = field(default_factory=dict)  # the launch request, to launch it again when unloaded
    # who started it, and an engine tied to its kernel (scope "kernel": see engines/scope.py)
    kernel_id: str | None = None
    notebook: str | None = None  # the notebook's path as Jupyter knows it
    scope: str = "server"
    kernel_pid: int | None = None  # the kernel's process (with its start time), where it is local
    kernel_started: float | None = None
    kernel_server: str | None = None  # "<pid>:<start time>" of the server whose kernel manager knows it
    publisher: str | None = None  # a shared engine of the box service: the user who published it
    # LoRA (controlplane/adapters): {"max_loras", "max_lora_rank"} when started with --enable-lora, and the
    # adapters it holds ({"name", "path", "rank", "owner", "users", "loaded_at", "error"}), loaded again
    # wherever it comes back
    lora: dict | None = None
    adapters: list[dict] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def to_model(self) -> dict:
        """The public JSON model (see :func:`public_model`)."""
        return public_model({name: getattr(self, name) for name in FIELD_NAMES})  # shallow: cheaper than asdict

    @classmethod
    def from_json(cls, text: str) -> Engine:
        data = json.loads(text)
        if data.keys() <= ALL_FIELDS:
            return cls(**data)
        return cls(**{k: v for k, v in data.items() if k in ALL_FIELDS})

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in FIELD_NAMES})


FIELD_NAMES = tuple(f.name for f in fields(Engine))
ALL_FIELDS = frozenset(FIELD_NAMES)


class Txn:
    """Operations inside one write transaction (see :meth:`Registry.transaction`). With a shared
    ledger (``ledger``: its connection, in its own transaction), every change of a GPU booking is
    made there too, so the bookings of every user of the box meet in one place."""

    def __init__(self, conn: sqlite3.Connection, ledger: sqlite3.Connection | None = None) -> None:
        self.conn = conn
        self.ledger = ledger

    # engines -------------------------------------------------------------
    def engines(self) -> list[Engine]:
        rows = self.conn.execute("SELECT data FROM engines ORDER BY rowid").fetchall()
        return [Engine.from_json(r[0]) for r in rows]

    def models(self) -> list[dict]:
        """Every engine's public JSON model, straight from the stored JSON (the fast listing path)."""
        return [public_model(json.loads(text))
                for (text,) in self.conn.execute("SELECT data FROM engines ORDER BY rowid")]

    def get(self, engine_id: str) -> Engine:
        row = self.conn.execute("SELECT data FROM engines WHERE id = ?", (engine_id,)).fetchone()
        if row is None:
            raise NotFound(f"no engine with id {engine_id!r}")
        return Engine.from_json(row[0])

    def find(self, id_or_name: str) -> Engine:
        row = self.conn.execute(
            "SELECT data FROM engines WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
            (id_or_name, id_or_name, id_or_name)).fetchone()
        if row is None:
            raise NotFound(f"no engine with id or name {id_or_name!r}")
        return Engine.from_json(row[0])

    def name_taken(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM engines WHERE name = ?", (name,)).fetchone() is not None

    def unique_name(self, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``… whichever no engine has yet."""
        name, n = base, 1
        while self.name_taken(name):
            n += 1
            name = f"{base}-{n}"
        return name

    def insert(self, engine: Engine) -> None:
        self.conn.execute("INSERT INTO engines (id, name, data) VALUES (?, ?, ?)",
                          (engine.id, engine.name, engine.to_json()))

    def save(self, engine: Engine) -> None:
        self.conn.execute("UPDATE engines SET name = ?, data = ? WHERE id = ?",
                          (engine.name, engine.to_json(), engine.id))

    def update(self, engine_id: str, **changes) -> Engine:
        engine = self.get(engine_id)
        if "state" in changes:
            changes["state"] = check_transition(engine.state, changes["state"]).value
        for key, value in changes.items():
            setattr(engine, key, value)
        self.save(engine)
        if self.ledger is not None and ("pid" in changes or "create_time" in changes):
            self.ledger.execute("UPDATE bookings SET pid = ?, start_time = ? WHERE engine_id = ? AND owner_uid = ?",
                                (engine.pid, engine.create_time, engine_id, os.getuid()))
        return engine

    def delete(self, engine_id: str) -> None:
        self.conn.execute("DELETE FROM engines WHERE id = ?", (engine_id,))

    # port leases ---------------------------------------------------------
    def leases(self) -> dict[int, str]:
        return dict(self.conn.execute("SELECT port, engine_id FROM port_leases").fetchall())

    def lease_port(self, port: int, engine_id: str) -> None:
        self.conn.execute("INSERT INTO port_leases (port, engine_id, leased_at) VALUES (?, ?, ?)",
                          (port, engine_id, time.time()))

    def release_ports(self, engine_id: str) -> None:
        self.conn.execute("DELETE FROM port_leases WHERE engine_id = ?", (engine_id,))

    # GPU bookings --------------------------------------------------------
    def bookings(self) -> list[tuple[str, int, str, int]]:
        """Rows of ``(engine_id, gpu_index, gpu_uuid, mib)``."""
        return self.conn.execute(
            "SELECT engine_id, gpu_index, gpu_uuid, mib FROM gpu_bookings").fetchall()

    def book(self, engine_id: str, gpu_index: int, gpu_uuid: str, mib: int) -> None:
        self.conn.execute(
            "INSERT INTO gpu_bookings (engine_id, gpu_index, gpu_uuid, mib) VALUES (?, ?, ?, ?)",
            (engine_id, gpu_index, gpu_uuid, mib))
        if self.ledger is not None:
            engine = self.get(engine_id)
            ledger_book(self.ledger, engine_id=engine_id, engine_name=engine.name, gpu_uuid=gpu_uuid,
                        gpu_index=gpu_index, mib=mib, pid=engine.pid, start_time=engine.create_time)

    def resize_bookings(self, engine_id: str, mib_per_gpu: int) -> None:
        """Set each of the engine's GPU bookings to ``mib_per_gpu`` (sleeping keeps a residual)."""
        self.conn.execute("UPDATE gpu_bookings SET mib = ? WHERE engine_id = ?", (mib_per_gpu, engine_id))
        if self.ledger is not None:
            self.ledger.execute("UPDATE bookings SET mib = ? WHERE engine_id = ? AND owner_uid = ?",
                                (mib_per_gpu, engine_id, os.getuid()))

    def release_bookings(self, engine_id: str) -> None:
        self.conn.execute("DELETE FROM gpu_bookings WHERE engine_id = ?", (engine_id,))
        if self.ledger is not None:
            ledger_release(self.ledger, engine_id)

    def foreign_bookings(self) -> list[dict]:
        """The shared ledger's bookings of engines this registry does not hold (other users', or
        another registry's of this user); [] without a shared ledger."""
        if self.ledger is None:
            return []
        mine = {row[0] for row in self.conn.execute("SELECT id FROM engines")}
        uid = os.getuid()
        return [row for row in ledger_rows(self.ledger) if row["engine_id"] not in mine or row["owner_uid"] != uid]

    def release_all(self, engine_id: str) -> None:
        """Free the port lease and GPU booking of an engine."""
        self.release_ports(engine_id)
        self.release_bookings(engine_id)


class Registry:
    """The SQLite registry shared by every process of the user."""

    def __init__(self, path: str | os.PathLike, ledger: SharedLedger | None = None) -> None:
        self.path = Path(path)
        self.ledger = ledger  # the machine-wide GPU ledger, when configured
        self._local = threading.local()
        self._commits = 0
        self.recovered_from: Path | None = None  # where a corrupt registry was moved aside
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Switching to WAL takes an exclusive lock that does not wait on busy peers, so the
            # processes that open the registry for the first time do it one after another.
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StateError(f"sage_nb cannot use its state dir {self.path.parent}: {e.strerror}. Make it "
                             "writable or set SAGE_NB_STATE_DIR (c.SageNBApp.state_dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._open_schema()
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError) and not _corrupt(e):
                    raise StateError(f"sage_nb cannot open its registry {self.path}: {e}") from None
                self._move_aside(e)
                self._open_schema()
        finally:
            os.close(fd)

    def _open_schema(self) -> None:
        conn = self._conn()
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        os.chmod(self.path, 0o600)

    def _move_aside(self, error: Exception) -> None:
        """A corrupt registry is kept for inspection and replaced by an empty one; discovery then
        re-adopts the running engines (they carry their registry path and id)."""
        self.close()
        self.recovered_from = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            old = Path(str(self.path) + suffix)
            if old.exists():
                old.rename(str(self.recovered_from) + suffix)
        log.warning("sage_nb: registry %s was unreadable (%s); moved to %s and started afresh",
                    self.path, error, self.recovered_from)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            create_mode(self.path, 0o600)  # private: the engine keys are in it
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        """One write transaction: all or nothing, exclusive against other writers. With a shared
        ledger, inside one of the ledger's (always taken first: no two processes wait on each other)."""
        if self.ledger is None:
            with self._transaction(None) as txn:
                yield txn
        else:
            with self.ledger.transaction() as ledger, self._transaction(ledger) as txn:
                yield txn

    @contextmanager
    def _transaction(self, ledger: sqlite3.Connection | None) -> Iterator[Txn]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StateError(f"sage_nb registry {self.path} is not writable: {e}") from None
        try:
            yield Txn(conn, ledger)
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:  # disk full, read-only file system, I/O error
            conn.execute("ROLLBACK")
            raise StateError(f"sage_nb could not write its registry {self.path}: {e}") from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._commits += 1

    @property
    def commits(self) -> int:
        """Commits made through this object (by any of its threads) so far."""
        return self._commits

    def version(self) -> tuple[int, int]:
        """Changes whenever any process commits to the registry (cheap: no table is read)."""
        return self._conn().execute("PRAGMA data_version").fetchone()[0], self._commits

    @contextmanager
    def snapshot(self) -> Iterator[Txn]:
        """A consistent read-only view (a deferred transaction)."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield Txn(conn)
        finally:
            conn.execute("COMMIT")

    # Convenience reads ------------------------------------------------------
    def engines(self) -> list[Engine]:
        with self.snapshot() as txn:
            return txn.engines()

    def models(self) -> list[dict]:
        with self.snapshot() as txn:
            return txn.models()

    def find(self, id_or_name: str) -> Engine:
        with self.snapshot() as txn:
            return txn.find(id_or_name)

    def update(self, engine_id: str, **changes) -> Engine:
        with self.transaction() as txn:
            return txn.update(engine_id, **changes)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


ledger_book, ledger_release, ledger_rows = SharedLedger.book, SharedLedger.release, SharedLedger.rows
