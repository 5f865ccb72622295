-- Finding a token by a prefix of its hash (revocation by token id) is a range scan in
-- byte order; the primary key follows the database's collation, which may not be bytes.
CREATE INDEX tokens_hash_bytes ON tokens (token_hash COLLATE "C");
