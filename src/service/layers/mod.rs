//! The tower layers every request passes through, outermost first: [`metrics`] (counts
//! what the caller saw), the deadline layer (`service::lifecycle`), the audit layer
//! (`crate::audit`), the drain layer (`service::lifecycle`), then admission
//! (`crate::limits`).

pub mod admission;
pub mod audit;
pub mod metrics;
