-- Several nodes on one database (see the PostgreSQL migration; one SQLite file has one
-- serving node, but the tables are the same so the code is).
CREATE TABLE attempt_counters (
    key        TEXT PRIMARY KEY,
    events     INTEGER NOT NULL,
    window_end INTEGER NOT NULL
);
CREATE INDEX attempt_counters_window_end ON attempt_counters (window_end);

CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
