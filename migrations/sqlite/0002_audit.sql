CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    request_id  TEXT NOT NULL,
    token_id    TEXT NOT NULL,
    token_name  TEXT NOT NULL,
    rpc         TEXT NOT NULL,
    credential  TEXT,
    version     INTEGER,
    code        TEXT NOT NULL,
    latency_us  INTEGER NOT NULL,
    peer        TEXT NOT NULL
) STRICT;
CREATE INDEX audit_log_at ON audit_log (at);
