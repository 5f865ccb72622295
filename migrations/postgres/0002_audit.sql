-- Audit events: who called which RPC on which credential, and how it ended. Never values
-- or tokens.
CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    request_id  TEXT NOT NULL,
    token_id    TEXT NOT NULL,
    token_name  TEXT NOT NULL,
    rpc         TEXT NOT NULL,
    credential  TEXT,
    version     BIGINT,
    code        TEXT NOT NULL,
    latency_us  BIGINT NOT NULL,
    peer        TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
