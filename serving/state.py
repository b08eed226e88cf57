"""Durable server state in SQLite: domains, ingest jobs, adapter versions, accuracy, feedback.

One writer (the controller actor) owns the database; every mutation is one transaction, so a crash
leaves either the old or the new state.
"""

from __future__ import annotations

import json
import sqlite3
import time
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
CREATE TABLE IF NOT EXISTS feedback (
  domain TEXT PRIMARY KEY, correct INTEGER NOT NULL, total INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

ACTIVE = ("queued", "training", "merging", "evaluating", "swapping")


class StateDB:
    """Thin wrapper around one SQLite file."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def _tx(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self.db:
            return self.db.execute(sql, args)

    # --- key/value -----------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def put(self, key: str, value: Any) -> None:
        self._tx("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    # --- jobs ----------------------------------------------------------------------------------
    def add_job(
        self, job_id: str, domain: str, method: str, hyper: dict, key: str | None, n_train: int, n_heldout: int
    ) -> None:
        now = time.time()
        self._tx(
            "INSERT INTO jobs (id, domain, method, hyper, status, idempotency_key, created, updated, n_train,"
            " n_heldout) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
            (job_id, domain, method, json.dumps(hyper), key, now, now, n_train, n_heldout),
        )

    def update_job(self, job_id: str, **fields: Any) -> None:
        if "timings" in fields:
            fields["timings"] = json.dumps(fields["timings"])
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        self._tx(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))

    def job(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def job_by_key(self, key: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE idempotency_key=?", (key,)).fetchone()
        return _job(row) if row else None

    def active_job_for(self, domain: str) -> dict | None:
        q = f"SELECT * FROM jobs WHERE domain=? AND status IN ({','.join('?' * len(ACTIVE))})"
        row = self.db.execute(q, (domain, *ACTIVE)).fetchone()
        return _job(row) if row else None

    def jobs(self, status: tuple[str, ...] = ACTIVE) -> list[dict]:
        q = f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(status))}) ORDER BY created"
        return [_job(r) for r in self.db.execute(q, status)]

    def count_jobs(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self.db.execute("SELECT status, COUNT(*) n FROM jobs GROUP BY status")}

    # --- adapters, domains, accuracy -----------------------------------------------------------
    def add_version(
        self,
        version: int,
        name: str,
        parent: int | None,
        method: str,
        domains: list[str],
        metrics: dict,
        sha256: str,
        accuracy: dict[str, float],
    ) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (version, name, parent, method, json.dumps(domains), time.time(), json.dumps(metrics), sha256),
            )
            for d, a in accuracy.items():
                self.db.execute("INSERT OR REPLACE INTO accuracy VALUES (?, ?, ?)", (version, d, a))

    def versions(self) -> list[dict]:
        return [_version(r) for r in self.db.execute("SELECT * FROM adapters ORDER BY version")]

    def version(self, v: int) -> dict | None:
        row = self.db.execute("SELECT * FROM adapters WHERE version=?", (v,)).fetchone()
        return _version(row) if row else None

    def accuracy(self, version: int) -> dict[str, float]:
        return {r["domain"]: r["acc"] for r in self.db.execute("SELECT * FROM accuracy WHERE version=?", (version,))}

    def add_domain(self, name: str, job_id: str, samples: int, heldout: int, version: int, acc: float) -> None:
        self._tx(
            "INSERT INTO domains VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, job_id, samples, heldout, version, acc, time.time()),
        )

    def domains(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM domains ORDER BY created")]

    # --- live feedback -------------------------------------------------------------------------
    def remember_predictions(self, rows: list[tuple[str, str | None, str]], keep: int = 100_000) -> None:
        """Store predictions for delayed feedback; bounded to the most recent ``keep``."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?)", [(r, d, lab, now) for r, d, lab in rows]
            )
            self.db.execute(
                "DELETE FROM predictions WHERE request_id IN (SELECT request_id FROM predictions "
                "ORDER BY created DESC LIMIT -1 OFFSET ?)",
                (keep,),
            )

    def prediction(self, request_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM predictions WHERE request_id=?", (request_id,)).fetchone()
        return dict(row) if row else None

    def add_feedback(self, domain: str, correct: bool) -> tuple[int, int]:
        with self.db:
            self.db.execute("INSERT INTO feedback VALUES (?, 0, 0) ON CONFLICT(domain) DO NOTHING", (domain,))
            self.db.execute(
                "UPDATE feedback SET correct=correct+?, total=total+1 WHERE domain=?", (int(correct), domain)
            )
        r = self.db.execute("SELECT * FROM feedback WHERE domain=?", (domain,)).fetchone()
        return r["correct"], r["total"]

    def feedback(self) -> dict[str, float]:
        return {r["domain"]: r["correct"] / r["total"] for r in self.db.execute("SELECT * FROM feedback") if r["total"]}


def _version(row: sqlite3.Row) -> dict:
    return {**dict(row), "domains": json.loads(row["domains"]), "metrics": json.loads(row["metrics"])}


def _job(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["hyper"] = json.loads(d["hyper"])
    d["timings"] = json.loads(d["timings"])
    return d
