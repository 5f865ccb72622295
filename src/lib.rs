//! credvault: a credential vault daemon.
//!
//! - [`crypto`]: key types and envelope encryption (pure, no I/O).
//! - [`store`]: the storage trait and its PostgreSQL and SQLite implementations.
pub mod crypto;
pub mod store;
