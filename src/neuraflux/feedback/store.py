"""Human feedback on served answers, kept in SQLite: the completions the server produced and the votes on them.

    neuraflux serve --model M feedback_db=feedback.sqlite        # collect
    neuraflux feedback export feedback.sqlite --format preference --out pairs.jsonl

Three kinds of vote, each naming completions by the id the server gave them: `thumbs` (one completion, up or down,
with an optional comment), `compare` (two completions of one prompt: a, b, tie or both_bad) and `edit` (a better
answer written for one completion). An annotator's second vote on the same completion (or pair) replaces the first.

The database is one file in WAL mode (readers, such as an export, never block the server's writes); its schema
version is a row of `meta`, and a file written by a newer version is refused by name. Every write is one
transaction. A completion is remembered in memory first (`remember`, never blocks) and written with the next
write, so a vote that follows its answer always finds it, and a database locked for longer than the timeout loses
nothing: the failed write raises `FeedbackUnavailable` and the completions wait for the next one.

No web stack here: the server (`neuraflux.serve.feedback`) calls this from worker threads, the CLI directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
RATINGS = ("up", "down")
CHOICES = ("a", "b", "tie", "both_bad")
WILSON_Z = 1.959963984540054  # the normal quantile for a two-sided 95 % interval

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model TEXT NOT NULL,            -- sha256 of the weights that wrote it
    model_name TEXT,                -- the name it was served under (not shown to a compare-mode client)
    prompt TEXT NOT NULL,           -- the last user turn, or a raw completion's prompt
    messages TEXT,                  -- JSON [{role, content}]: the conversation; null for a raw completion
    sources TEXT NOT NULL,          -- JSON [{id, text, score}]: the retrieved documents in the prompt
    text TEXT NOT NULL,             -- the answer as sent
    sampling TEXT NOT NULL,         -- JSON {temperature, top_k, top_p, max_new_tokens}
    finish_reason TEXT,
    pair TEXT                       -- the other completion of a compare-mode request, else null
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('thumbs', 'compare', 'edit')),
    target TEXT NOT NULL,           -- the completion's id; for compare both ids, sorted, joined by a space
    annotator TEXT,                 -- the API key's name when keys are in use, else null
    completion_a TEXT NOT NULL REFERENCES completions (id),
    completion_b TEXT REFERENCES completions (id),
    rating TEXT CHECK (rating IN ('up', 'down')),
    choice TEXT CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    comment TEXT,
    text TEXT,                      -- an edit's better answer
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_vote ON votes (kind, target, ifnull(annotator, ''));
"""


class FeedbackUnavailable(Exception):
    """The database cannot be used now: locked past the timeout, not a database, unreadable, or of a newer schema."""


class UnknownCompletion(KeyError):
    """A vote names a completion this database does not hold."""

    def __init__(self, completion_id: str):
        super().__init__(completion_id)
        self.completion_id = completion_id

    def __str__(self) -> str:
        return f"no completion with id {self.completion_id!r} (feedback names the id the server gave an answer)"


@dataclass(frozen=True)
class Completion:
    """One answer the server sent, as it is stored."""

    id: str
    model: str  # weights_sha256 of the model that wrote it
    prompt: str
    messages: list[dict] | None  # [{role, content}] (roles user, assistant, context); None for a raw completion
    sources: list[dict]
    text: str
    sampling: dict
    model_name: str | None = None
    finish_reason: str | None = None
    pair: str | None = None
    created: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Thumbs:
    id: str
    rating: str  # up | down
    comment: str | None = None


@dataclass(frozen=True)
class Compare:
    ids: tuple[str, str]  # as the annotator saw them: `choice` a is ids[0]
    choice: str  # a | b | tie | both_bad
    comment: str | None = None


@dataclass(frozen=True)
class Edit:
    id: str
    text: str  # the better answer
    comment: str | None = None


Vote = Thumbs | Compare | Edit


@dataclass(frozen=True)
class Stored:
    vote_id: int
    replaced: bool  # the annotator had voted on this completion (pair) before; that vote is gone


@dataclass(frozen=True)
class WinRate:
    """A model's share of the decisive (a or b) compare votes between it and another model, with a 95 % Wilson
    score interval."""

    wins: int
    decisive: int
    rate: float
    low: float
    high: float


def wilson_interval(wins: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (Wilson 1927; Agresti & Coull 1998, eq. 2):
    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def weights_sha256(model) -> str:
    """sha256 over a torch module's state_dict (names, dtypes, shapes and bytes, in name order): the identity of
    the weights a completion came from. Computed once, when the server starts. A tensor subclass (torchao's int8
    weights, model/quantize.py) is hashed through the plain tensors it is made of."""
    import torch

    def plain(value: torch.Tensor) -> list[torch.Tensor]:
        if type(value) in (torch.Tensor, torch.nn.Parameter):
            return [value]
        names, _ = value.__tensor_flatten__()
        return [t for n in names for t in plain(getattr(value, n))]

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if not isinstance(value, torch.Tensor):
            digest.update(repr(value).encode())
            continue
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        for part in plain(value):
            digest.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def annotator_of(api_key: str | None) -> str | None:
    """The name votes are recorded under: null without a key; with one, `key-` and the first 12 hex digits of its
    sha256, which names the key without revealing it."""
    return None if api_key is None else "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


def _target(vote: Vote) -> str:
    return " ".join(sorted(vote.ids)) if isinstance(vote, Compare) else vote.id


def _fail(path: Path, err: sqlite3.Error) -> FeedbackUnavailable:
    reason = str(err)
    if "locked" in reason or "busy" in reason:
        reason += " (another process holds a write lock past the timeout; nothing was stored, try again)"
    elif isinstance(err, sqlite3.DatabaseError) and not isinstance(err, sqlite3.OperationalError):
        reason += " (the file is damaged or is not a feedback database)"
    return FeedbackUnavailable(f"feedback database {path}: {reason}")


class FeedbackStore:
    """The feedback database at `path`, created on first use. Thread-safe: one connection, one writer at a time;
    `timeout_s` is how long a write waits for another process's lock. `readonly` opens an existing file for export.

    Opening is lazy and retried: a file that is locked, damaged or of a newer schema makes each call raise
    FeedbackUnavailable (naming the file and why) until it is fixed, and never stops the caller."""

    def __init__(self, path: str | Path, timeout_s: float = 5.0, readonly: bool = False):
        self.path = Path(path)
        self.timeout_s, self.readonly = timeout_s, readonly
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one statement sequence on the connection at a time
        self._pending: list[Completion] = []  # remembered, not yet written
        self._pending_lock = threading.Lock()  # held only to touch the list: `remember` never waits on the disk

    # ---- opening ----------------------------------------------------------------------------------------------
    def open(self) -> FeedbackStore:
        """Open (creating the file and tables if needed) and check the schema version; FeedbackUnavailable if not."""
        with self._lock:
            self._connect()
        return self

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self.readonly and not self.path.is_file():
            raise FeedbackUnavailable(f"feedback database {self.path}: no such file")
        target = f"file:{self.path}?mode=ro" if self.readonly else str(self.path)
        conn = None
        try:
            conn = sqlite3.connect(
                target, timeout=self.timeout_s, isolation_level=None, check_same_thread=False, uri=self.readonly
            )
            conn.execute("PRAGMA foreign_keys = ON")
            if not self.readonly:
                conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";\n"):  # one by one: executescript would commit first
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # sqlite may have rolled back already (a full disk, an I/O error)
                        conn.execute("ROLLBACK")
                    raise
            self._check_version(conn)
        except sqlite3.Error as err:
            if conn is not None:
                conn.close()
            raise _fail(self.path, err) from None
        except FeedbackUnavailable:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _check_version(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
        if version is None:
            raise FeedbackUnavailable(f"feedback database {self.path}: no schema_version in its meta table")
        if version > SCHEMA_VERSION:
            raise FeedbackUnavailable(
                f"feedback database {self.path}: schema version {version} is newer than this neuraflux's "
                f"({SCHEMA_VERSION}): upgrade neuraflux, or give another feedback_db"
            )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _write(self, work) -> object:
        """`work(conn)` inside one immediate transaction, after the pending completions; all or nothing."""
        with self._lock:
            conn = self._connect()
            with self._pending_lock:
                pending = list(self._pending)
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for completion in pending:
                        self._insert_completion(conn, completion)
                    result = work(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # sqlite may have rolled back already (a full disk, an I/O error)
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as err:
                raise _fail(self.path, err) from None
            with self._pending_lock:
                del self._pending[: len(pending)]  # only these were written; others arrived meanwhile
            return result

    def _read(self, work) -> object:
        with self._lock:
            conn = self._connect()
            try:
                return work(conn)
            except sqlite3.Error as err:
                raise _fail(self.path, err) from None

    # ---- completions ------------------------------------------------------------------------------------------
    def remember(self, completion: Completion) -> None:
        """Hold a completion for the next write; no disk work, so an event loop may call it."""
        with self._pending_lock:
            self._pending.append(completion)

    @property
    def pending(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    def flush(self) -> int:
        """Write the remembered completions; how many there were. FeedbackUnavailable keeps them for next time."""
        count = self.pending
        self._write(lambda conn: None)
        return count

    def add_completion(self, completion: Completion) -> None:
        self.remember(completion)
        self.flush()

    @staticmethod
    def _insert_completion(conn: sqlite3.Connection, c: Completion) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                c.id, c.created, c.model, c.model_name, c.prompt,
                None if c.messages is None else json.dumps(c.messages, ensure_ascii=False),
                json.dumps(c.sources, ensure_ascii=False), c.text, json.dumps(c.sampling), c.finish_reason, c.pair,
            ),
        )  # fmt: skip

    def completion(self, completion_id: str) -> Completion:
        """A stored (or remembered) completion; UnknownCompletion if there is none."""
        with self._pending_lock:
            for c in self._pending:
                if c.id == completion_id:
                    return c
        row = self._read(
            lambda conn: conn.execute("SELECT * FROM completions WHERE id = ?", (completion_id,)).fetchone()
        )
        if row is None:
            raise UnknownCompletion(completion_id)
        return _completion_from_row(row)

    # ---- votes ------------------------------------------------------------------------------------------------
    def vote(self, vote: Vote, annotator: str | None = None) -> Stored:
        """Store a vote, replacing the annotator's earlier vote of the same kind on the same completion (pair).
        UnknownCompletion when an id names no completion; FeedbackUnavailable when the database cannot take it."""

        def work(conn: sqlite3.Connection) -> Stored:
            ids = list(vote.ids) if isinstance(vote, Compare) else [vote.id]
            for completion_id in ids:
                if conn.execute("SELECT 1 FROM completions WHERE id = ?", (completion_id,)).fetchone() is None:
                    raise UnknownCompletion(completion_id)
            kind = {Thumbs: "thumbs", Compare: "compare", Edit: "edit"}[type(vote)]
            target = _target(vote)
            now = time.time()
            values = {
                "completion_a": ids[0],
                "completion_b": ids[1] if len(ids) > 1 else None,
                "rating": getattr(vote, "rating", None),
                "choice": getattr(vote, "choice", None),
                "comment": vote.comment,
                "text": getattr(vote, "text", None),
            }
            old = conn.execute(
                "SELECT id FROM votes WHERE kind = ? AND target = ? AND annotator IS ?", (kind, target, annotator)
            ).fetchone()
            if old is not None:
                sets = ", ".join(f"{k} = ?" for k in values)
                conn.execute(f"UPDATE votes SET {sets}, updated = ? WHERE id = ?", (*values.values(), now, old[0]))
                return Stored(old[0], replaced=True)
            cursor = conn.execute(
                "INSERT INTO votes (kind, target, annotator, completion_a, completion_b, rating, choice, comment, "
                "text, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, target, annotator, *values.values(), now, now),
            )
            return Stored(cursor.lastrowid, replaced=False)

        return self._write(work)

    def votes(self) -> list[dict]:
        """Every vote with its completions (`a`, and `b` for compare) as Completion objects, oldest first."""

        def work(conn: sqlite3.Connection) -> list[dict]:
            conn.row_factory = sqlite3.Row
            try:
                rows = conn.execute("SELECT * FROM votes ORDER BY id").fetchall()
                cache: dict[str, Completion] = {}
                out = []
                for row in rows:
                    vote = dict(row)
                    for side in ("a", "b"):
                        cid = vote[f"completion_{side}"]
                        if cid is not None and cid not in cache:
                            found = conn.execute("SELECT * FROM completions WHERE id = ?", (cid,)).fetchone()
                            cache[cid] = _completion_from_row(tuple(found))
                        vote[side] = cache.get(cid) if cid is not None else None
                    out.append(vote)
                return out
            finally:
                conn.row_factory = None

        return self._read(work)

    def stats(self) -> dict:
        """Counts per kind (thumbs split by rating, compare by choice), per model (by weights hash), and each
        model's compare win rate against other models: wins over decisive (a or b) votes, with a 95 % Wilson
        interval. Ties, both_bad, and pairs of one model's own samples are counted but not in a win rate."""
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT v.kind, v.rating, v.choice, a.model, a.model_name, b.model, b.model_name FROM votes v "
                "JOIN completions a ON a.id = v.completion_a LEFT JOIN completions b ON b.id = v.completion_b"
            ).fetchall()
        )
        kinds: dict[str, dict] = {
            "thumbs": {"total": 0, "up": 0, "down": 0},
            "compare": {"total": 0, **dict.fromkeys(CHOICES, 0)},
            "edit": {"total": 0},
        }
        models: dict[str, dict] = {}
        wins: dict[str, list[int]] = {}  # model -> [wins, decisive]

        def model_entry(sha: str, name: str | None) -> dict:
            entry = models.setdefault(sha, {"name": name, "thumbs": 0, "up": 0, "down": 0, "compare": 0, "edit": 0})
            return entry

        for kind, rating, choice, model_a, name_a, model_b, name_b in rows:
            kinds[kind]["total"] += 1
            if kind == "thumbs":
                kinds[kind][rating] += 1
                entry = model_entry(model_a, name_a)
                entry["thumbs"] += 1
                entry[rating] += 1
            elif kind == "edit":
                model_entry(model_a, name_a)["edit"] += 1
            else:
                kinds[kind][choice] += 1
                for sha, name in {model_a: name_a, model_b: name_b}.items():
                    model_entry(sha, name)["compare"] += 1
                if model_a != model_b and choice in ("a", "b"):
                    winner = model_a if choice == "a" else model_b
                    for sha in (model_a, model_b):
                        tally = wins.setdefault(sha, [0, 0])
                        tally[0] += sha == winner
                        tally[1] += 1
        for sha, (won, n) in wins.items():
            low, high = wilson_interval(won, n)
            rate = WinRate(won, n, won / n, low, high)
            models[sha]["win_rate"] = {k: getattr(rate, k) for k in ("wins", "decisive", "rate", "low", "high")}
        return {"kinds": kinds, "models": models}


def _completion_from_row(row: tuple) -> Completion:
    cid, created, model, model_name, prompt, messages, sources, text, sampling, finish, pair = row
    return Completion(
        id=cid,
        model=model,
        prompt=prompt,
        messages=None if messages is None else json.loads(messages),
        sources=json.loads(sources),
        text=text,
        sampling=json.loads(sampling),
        model_name=model_name,
        finish_reason=finish,
        pair=pair,
        created=created,
    )
