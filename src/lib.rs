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
//! - [`model`]: what the core and the edge share: [`model::CredentialName`], metadata,
//!   version states, change kinds, rotation policies and jobs, token records, the clock.
//! - [`client`]: the Rust client and caching client for services (feature `client`; no
//!   daemon dependencies).
//!
//! Features: `server` (default) builds the daemon and the command line; `client` alone
//! (`default-features = false, features = ["client"]`) builds only [`client`] and
//! [`proto`], without sqlx, SQLite, argon2 or the daemon's HTTP stack.
#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod cache;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod crypto;
#[cfg(feature = "server")]
pub mod generate;
#[cfg(feature = "server")]
pub mod limits;
#[cfg(feature = "server")]
pub mod model;
#[cfg(feature = "server")]
pub use model::names;
#[cfg(feature = "server")]
pub mod policy;
pub mod proto;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod telemetry;
#[cfg(feature = "server")]
pub mod unlock;
#[cfg(feature = "server")]
pub mod vault;
