//! credvault: a credential vault daemon.
//!
//! Layers, from the edge inwards:
//! - [`service`]: the gRPC edge. Converts messages, authenticates, maps errors to status
//!   codes; the only module that knows tonic (with [`proto`] and the [`cli`] client).
//! - [`server`]: builds a daemon from [`config::Settings`] and runs it until shutdown.
//! - [`vault`]: the core: validation, sealing and opening, compare-and-set writes.
//! - [`cache`]: the sharded TTL LRU of sealed versions with lazy decryption.
//! - [`telemetry`]: metric names, the Prometheus recorder, the `/metrics` listener and
//!   its upkeep (the request series are recorded by `service::layers::metrics`).
//! - [`auth`]: bearer tokens, checked in memory.
//! - [`policy`]: token policies: capabilities, the pattern language, listing ranges.
//! - [`audit`]: the audit layer, queue and batch writer.
//! - [`limits`]: per-token rate limits and load shedding.
//! - [`unlock`]: turns a passphrase or key file into an unlocked key ring at start-up.
//! - [`crypto`]: key types and envelope encryption (pure, no I/O).
//! - [`store`]: the storage trait and its PostgreSQL and SQLite implementations.
//! - [`names`]: credential name syntax.
pub mod audit;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod generate;
pub mod limits;
pub mod names;
pub mod policy;
pub mod proto;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod unlock;
pub mod vault;
