//! One integration-test binary (one link step on a 2-core machine). Every test gets a
//! fresh PostgreSQL database or SQLite file; daemons run on port 0.

mod helpers;

mod audit;
mod bad_input;
mod bench;
mod cache;
mod cli;
mod concurrency;
mod conformance;
mod e2e;
mod hygiene;
mod kek;
mod keys;
mod rotation;
mod security;
mod tamper;
mod tls;
mod transport;
