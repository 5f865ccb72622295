-- Workload identities (the URI SAN or subject CN of a verified mTLS client certificate)
-- bound to policies, so a workload with a certificate needs no bearer token.
CREATE TABLE identities (
    identity   TEXT PRIMARY KEY,
    -- The same JSON policy document tokens carry.
    policies   TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
