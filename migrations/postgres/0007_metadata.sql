-- Metadata has a version of its own, for compare-and-set on UpdateCredentialMetadata.
-- It counts changes to labels, description, owner and expiry (by UpdateCredentialMetadata
-- or by a write that carries metadata); the value's version is separate.
ALTER TABLE credentials ADD COLUMN metadata_version BIGINT NOT NULL DEFAULT 1;
