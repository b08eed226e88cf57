"""Durable server state in SQLite: domains, ingest jobs, adapter versions, accuracy, feedback.

One writer (the controller) owns the database; every mutation is one transaction, so a crash leaves
either the old or the new state. A version, its accuracy row, its domain and its job's move to
``swapping`` are written together (:meth:`StateDB.record_version`), which is what lets a restart tell
exactly where an interrupted job stood.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, domain TEXT NOT NULL, method TEXT NOT NULL, hyper TEXT NOT NULL,
  status TEXT NOT NULL, step INTEGER DEFAULT 0, total INTEGER DEFAULT 0, loss REAL,
  error TEXT, idempotency_key TEXT UNIQUE, created REAL NOT NULL, updated REAL NOT NULL,
  timings TEXT NOT NULL DEFAULT '{}', version INTEGER, n_train INTEGER, n_heldout INTEGER);
CREATE TABLE IF NOT EXISTS domains (
  name TEXT PRIMARY KEY, job_id TEXT NOT NULL, samples INTEGER NOT NULL, heldout INTEGER NOT NULL,
  learned_version INTEGER NOT NULL, acc_learned REAL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
  version INTEGER PRIMARY KEY, name TEXT NOT NULL, parent INTEGER, method TEXT NOT NULL,
  domains TEXT NOT NULL, created REAL NOT NULL, metrics TEXT NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accuracy (
  version INTEGER NOT NULL, domain TEXT NOT NULL, acc REAL NOT NULL, PRIMARY KEY (version, domain));
CREATE TABLE IF NOT EXISTS predictions (
  request_id TEXT PRIMARY KEY, domain TEXT, label TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created);
CREATE TABLE IF NOT EXISTS feedback (
  domain TEXT PRIMARY KEY, correct INTEGER NOT NULL, total INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback_given (
  request_id TEXT PRIMARY KEY, label TEXT NOT NULL, correct INTEGER NOT NULL, domain TEXT NOT NULL,
  version INTEGER, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_given_created ON feedback_given (created);
"""
#: columns added after the first release: (table, column, declaration); added on open when missing.
MIGRATIONS = [
    ("jobs", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "request_hash", "TEXT"),
    ("jobs", "gate", "TEXT"),
    ("jobs", "source", "TEXT"),
    ("domains", "buffer_size", "INTEGER NOT NULL DEFAULT 0"),
    ("adapters", "coefficients", "TEXT NOT NULL DEFAULT '{}'"),
    ("jobs", "history", "TEXT NOT NULL DEFAULT '[]'"),  # attempts that did not finish: [{attempt, cause, at}]
    ("predictions", "version", "INTEGER"),  # the adapter version that answered (NULL: recorded before 0.3)
]

ACTIVE = ("queued", "training", "merging", "swapping")
JSON_COLUMNS = ("hyper", "timings", "gate", "domains", "metrics", "coefficients", "history")


class StateDB:
    """Thin wrapper around one SQLite file."""

    def __init__(self, path: str) -> None:
        # autocommit mode + explicit BEGIN IMMEDIATE in tx(): `with connection:` alone would not group
        # statements into one transaction. One lock: the controller touches the file from threads too.
        self.lock = threading.RLock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        for table, col, decl in MIGRATIONS:
            if col not in {r["name"] for r in self._all(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: every statement inside commits together or not at all."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _tx(self, sql: str, args: tuple = ()) -> None:
        with self.tx() as db:
            db.execute(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    # --- key/value -----------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(row["value"]) if row else default

    def put(self, key: str, value: Any) -> None:
        self._tx("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    # --- jobs ----------------------------------------------------------------------------------
    def add_job(self, job_id: str, domain: str, method: str, hyper: dict, key: str | None, request_hash: str,
                n_train: int, n_heldout: int, source: str | None = None) -> None:
        now = time.time()
        self._tx(
            "INSERT INTO jobs (id, domain, method, hyper, status, idempotency_key, request_hash, created, updated,"
            " n_train, n_heldout, source) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
            (job_id, domain, method, json.dumps(hyper), key, request_hash, now, now, n_train, n_heldout, source),
        )

    def update_job(self, job_id: str, **fields: Any) -> None:
        for k in ("timings", "gate", "history"):
            if k in fields and fields[k] is not None:
                fields[k] = json.dumps(fields[k])
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        self._tx(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))

    def job(self, job_id: str) -> dict | None:
        row = self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _row(row) if row else None

    def job_by_key(self, key: str) -> dict | None:
        row = self._one("SELECT * FROM jobs WHERE idempotency_key=?", (key,))
        return _row(row) if row else None

    def active_job_for(self, domain: str) -> dict | None:
        q = f"SELECT * FROM jobs WHERE domain=? AND status IN ({','.join('?' * len(ACTIVE))})"
        row = self._one(q, (domain, *ACTIVE))
        return _row(row) if row else None

    def jobs(self, status: tuple[str, ...] = ACTIVE) -> list[dict]:
        """Jobs with one of ``status``, in submission order."""
        q = f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(status))}) ORDER BY created, rowid"
        return [_row(r) for r in self._all(q, status)]

    def job_page(self, limit: int, before: tuple[float, str] | None = None) -> list[dict]:
        """Up to ``limit`` jobs, newest first, strictly after ``before`` = ``(created, id)`` in that order."""
        if before is None:
            rows = self._all("SELECT * FROM jobs ORDER BY created DESC, id DESC LIMIT ?", (limit,))
        else:
            rows = self._all("SELECT * FROM jobs WHERE created < ? OR (created = ? AND id < ?) "
                             "ORDER BY created DESC, id DESC LIMIT ?", (before[0], before[0], before[1], limit))
        return [_row(r) for r in rows]

    # --- adapters, domains, accuracy -----------------------------------------------------------
    def record_version(self, job: dict | None, version: int, name: str, parent: int | None, method: str,
                       domains: list[str], metrics: dict, sha256: str, accuracy: dict[str, float],
                       coefficients: dict[str, float] | None = None, buffer_size: int = 0,
                       learned: bool = True) -> None:
        """One transaction: the version, its accuracy row and (for a job) its domain and job status.

        ``learned=False`` records a version the activation gate rejected: the domain stays unlearned.
        """
        now = time.time()
        with self.tx():
            self.db.execute(
                "INSERT INTO adapters (version, name, parent, method, domains, created, metrics, sha256, coefficients)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (version, name, parent, method, json.dumps(domains), now, json.dumps(metrics), sha256,
                 json.dumps(coefficients or {})),
            )
            self.db.executemany("INSERT OR REPLACE INTO accuracy VALUES (?, ?, ?)",
                                [(version, d, a) for d, a in accuracy.items()])
            if job is not None and learned:
                self.db.execute(
                    "INSERT INTO domains (name, job_id, samples, heldout, learned_version, acc_learned, created,"
                    " buffer_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (job["domain"], job["id"], job["n_train"], job["n_heldout"], version, accuracy[job["domain"]],
                     now, buffer_size),
                )
                self.db.execute("UPDATE jobs SET status='swapping', version=?, updated=? WHERE id=?",
                                (version, now, job["id"]))

    def delete_version(self, version: int, domains: list[str]) -> None:
        """One transaction: a version's row, its accuracy, and the domains listed (learned by it alone)."""
        with self.tx():
            self.db.execute("DELETE FROM adapters WHERE version=?", (version,))
            self.db.execute("DELETE FROM accuracy WHERE version=?", (version,))
            self.db.executemany("DELETE FROM domains WHERE name=?", [(d,) for d in domains])

    def set_accuracy(self, version: int, accuracy: dict[str, float]) -> None:
        with self.tx():
            self.db.executemany("INSERT OR REPLACE INTO accuracy VALUES (?, ?, ?)",
                                [(version, d, a) for d, a in accuracy.items()])

    def versions(self) -> list[dict]:
        return [_row(r) for r in self._all("SELECT * FROM adapters ORDER BY version")]

    def version_page(self, limit: int, after: int | None = None) -> list[dict]:
        """Up to ``limit`` versions in ascending order, strictly above ``after``."""
        rows = self._all("SELECT * FROM adapters WHERE version > ? ORDER BY version LIMIT ?",
                         (-1 if after is None else after, limit))
        return [_row(r) for r in rows]

    def version(self, v: int) -> dict | None:
        row = self._one("SELECT * FROM adapters WHERE version=?", (v,))
        return _row(row) if row else None

    def max_version(self) -> int:
        return self._one("SELECT COALESCE(MAX(version), -1) FROM adapters")[0]

    def accuracy(self, version: int) -> dict[str, float]:
        return {r["domain"]: r["acc"] for r in self._all("SELECT * FROM accuracy WHERE version=?", (version,))}

    def domains(self) -> list[dict]:
        return [dict(r) for r in self._all("SELECT * FROM domains ORDER BY created")]

    def domain_page(self, limit: int, after: tuple[float, str] | None = None) -> list[dict]:
        """Up to ``limit`` domains in learning order, strictly after ``after`` = ``(created, name)``."""
        if after is None:
            return [dict(r) for r in self._all("SELECT * FROM domains ORDER BY created, name LIMIT ?", (limit,))]
        rows = self._all("SELECT * FROM domains WHERE created > ? OR (created = ? AND name > ?) "
                         "ORDER BY created, name LIMIT ?", (after[0], after[0], after[1], limit))
        return [dict(r) for r in rows]

    def domain_names(self) -> set[str]:
        return {r[0] for r in self._all("SELECT name FROM domains")}

    # --- live feedback -------------------------------------------------------------------------
    def remember_predictions(self, rows: list[tuple], keep: int, ttl_s: float) -> int:
        """Store predictions ``(request_id, domain, label[, version])`` for delayed feedback; keeps at most
        ``keep`` rows, none older than ``ttl_s`` (feedback already given is kept as long, so that a retry
        within that time is recognised).

        Trimming is by rowid range and an index on ``created``, so its cost follows the rows removed,
        not the table size. A row SQLite refuses is dropped alone. Returns how many rows were dropped.
        """
        now, dropped = time.time(), 0
        data = [(r[0], r[1], r[2], now, r[3] if len(r) > 3 else None) for r in rows]
        insert = ("INSERT OR REPLACE INTO predictions (request_id, domain, label, created, version)"
                  " VALUES (?, ?, ?, ?, ?)")
        try:
            with self.tx():
                self.db.executemany(insert, data)
        except (sqlite3.Error, ValueError):
            for row in data:
                try:
                    self._tx(insert, row)
                except (sqlite3.Error, ValueError):
                    dropped += 1
        with self.tx():
            for table in ("predictions", "feedback_given"):
                top = self._one(f"SELECT MAX(rowid) FROM {table}")[0] or 0
                self.db.execute(f"DELETE FROM {table} WHERE rowid <= ?", (top - keep,))
                self.db.execute(f"DELETE FROM {table} WHERE created < ?", (now - ttl_s,))
        return dropped

    def count_predictions(self) -> int:
        return self._one("SELECT COUNT(*) FROM predictions")[0]

    def prediction(self, request_id: str) -> dict | None:
        row = self._one("SELECT * FROM predictions WHERE request_id=?", (request_id,))
        return dict(row) if row else None

    def add_feedback(self, domain: str, correct: bool, request_id: str | None = None, label: str | None = None,
                     version: int | None = None) -> dict:
        """Count one piece of feedback, once per ``request_id``; returns the domain's running counts.

        Returns:
            ``{"correct", "total"}`` of the domain, and ``replayed`` (feedback for this ``request_id`` was
            counted before: nothing is counted again) with the first feedback's ``label``, ``correct`` and
            ``version`` when replayed.
        """
        with self.tx():
            prior = None if request_id is None else self.db.execute(
                "SELECT * FROM feedback_given WHERE request_id=?", (request_id,)).fetchone()
            if prior is None:
                if request_id is not None:
                    self.db.execute("INSERT INTO feedback_given VALUES (?, ?, ?, ?, ?, ?)",
                                    (request_id, label or "", int(correct), domain, version, time.time()))
                self.db.execute("INSERT INTO feedback VALUES (?, 0, 0) ON CONFLICT(domain) DO NOTHING", (domain,))
                self.db.execute("UPDATE feedback SET correct=correct+?, total=total+1 WHERE domain=?",
                                (int(correct), domain))
            r = self.db.execute("SELECT * FROM feedback WHERE domain=?", (prior["domain"] if prior else domain,))
            counts = dict(r.fetchone())
        first = {} if prior is None else {"label": prior["label"], "correct": bool(prior["correct"]),
                                          "version": prior["version"], "domain": prior["domain"]}
        return {"correct": counts["correct"], "total": counts["total"], "replayed": prior is not None, "first": first}

    def feedback(self) -> dict[str, float]:
        return {r["domain"]: r["correct"] / r["total"] for r in self._all("SELECT * FROM feedback") if r["total"]}

    def feedback_by_version(self, since: float, version: int) -> dict[str, tuple[int, int]]:
        """``{domain: (correct, total)}`` of the feedback given since ``since`` on answers of ``version``."""
        rows = self._all("SELECT domain, SUM(correct) AS ok, COUNT(*) AS n FROM feedback_given"
                         " WHERE created >= ? AND version = ? GROUP BY domain", (since, version))
        return {r["domain"]: (int(r["ok"]), int(r["n"])) for r in rows}


def _row(row: sqlite3.Row) -> dict:
    d = dict(row)
    for k in JSON_COLUMNS:
        if k in d and isinstance(d[k], str):
            d[k] = json.loads(d[k])
    return d
