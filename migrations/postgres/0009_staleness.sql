-- Staleness gauges and filtered listings: credentials by expiry (expiring soon, expired)
-- and current versions by age (the oldest one) are index range scans, not table scans.
CREATE INDEX credentials_expiry ON credentials (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX credential_versions_current_age ON credential_versions (created_at) WHERE state = 'current';
