//! One integration-test binary (one link step on a 2-core machine). Every test gets a
//! fresh PostgreSQL database or SQLite file; daemons run on port 0.

mod helpers;

mod agent;
mod audit;
mod bad_input;
mod bench;
mod cache;
mod cli;
mod client;
mod concurrency;
mod conformance;
mod drain;
mod e2e;
mod fuzz;
mod hygiene;
mod idempotency;
mod identity;
mod kek;
mod keys;
mod listing;
mod metadata;
mod outage;
mod pg_tls;
mod policy;
mod proxy;
mod rollback;
mod rotation;
mod secrets;
mod security;
mod staleness;
mod tamper;
mod tls;
mod tokens;
mod transport;
mod versions;
mod write_many;
