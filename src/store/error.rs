//! [`StoreError`], and how an error bears on the store's health ([`Outage`]): the
//! SQLSTATEs that mean the database is going away rather than the request being wrong.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (connection refused, pool timeout, closed pool).
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("storage query failed: {0}")]
    Query(#[source] sqlx::Error),
    /// The compare-and-set lost: the row changed since it was read.
    #[error("write conflict")]
    Conflict,
    #[error("storage call {0} timed out after {1:?}")]
    Timeout(&'static str, std::time::Duration),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A write was sealed under a KEK that is no longer the active one (another daemon
    /// rotated the KEK): reload the keys and seal again.
    #[error("KEK {0} is no longer active")]
    StaleKek(i64),
    /// A KEK rotation job is already running.
    #[error("rotation job {0} is still running")]
    JobRunning(i64),
    /// Refused without trying: the store is known to be down (the breaker is open).
    #[error("storage is down; calls are refused until a probe reaches it")]
    Down,
}

/// How an error bears on the store's health (see [`Breaker`](super::Breaker)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// The database cannot be reached or is shutting down: the store is down.
    Down,
    /// A timeout or one killed connection: down only if it keeps happening.
    Flaky,
}

impl StoreError {
    /// `None` when the database answered (even with an error) or was not asked.
    pub fn outage(&self) -> Option<Outage> {
        match self {
            StoreError::Timeout(..) => Some(Outage::Flaky),
            StoreError::Unavailable(sqlx::Error::Database(e)) => Some(match e.code().as_deref() {
                Some(code) if sqlstate_means_down(code) => Outage::Down,
                _ => Outage::Flaky,
            }),
            // A pool that timed out handing out a connection may be busy, not cut off:
            // only timeouts in a row say the store is gone (refused connects are `Io`).
            StoreError::Unavailable(sqlx::Error::PoolTimedOut) => Some(Outage::Flaky),
            StoreError::Unavailable(_) => Some(Outage::Down),
            _ => None,
        }
    }
}

/// SQLSTATE classes 08 (connection exception) and 57 (operator intervention: the server
/// shutting down, a backend terminated, a query cancelled) mean the database is going
/// away or dropping connections, not that the request was wrong. 25006 (read-only
/// transaction) is a write that reached a standby: a primary that was demoted, or a URL
/// that does not yet follow a failover; the write can succeed once it does.
pub(crate) fn sqlstate_is_unavailable(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57") || code == "25006"
}

/// The SQLSTATEs that say the whole server is unreachable, not just one connection:
/// connection exceptions, crash shutdown, and "cannot connect now" (starting up or
/// shutting down). A backend killed by `pg_terminate_backend` (57P01) or a cancelled
/// query (57014) is one connection's fate and counts as flaky.
fn sqlstate_means_down(code: &str) -> bool {
    code.starts_with("08") || code == "57P02" || code == "57P03"
}

/// A stored enumeration value this build does not know is corruption.
impl From<crate::model::UnknownValue> for StoreError {
    fn from(e: crate::model::UnknownValue) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(ref d) if d.code().is_some_and(|c| sqlstate_is_unavailable(&c)) => {
                StoreError::Unavailable(e)
            }
            other => StoreError::Query(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_and_connection_sqlstates_are_unavailable() {
        for code in ["08006", "08001", "57P01", "57P02", "57P03", "57014", "25006"] {
            assert!(sqlstate_is_unavailable(code), "{code}");
        }
        for code in ["23505", "40001", "42P01", "53300", "XX000"] {
            assert!(!sqlstate_is_unavailable(code), "{code}");
        }
        assert!(sqlstate_means_down("08006") && sqlstate_means_down("57P03"));
        assert!(!sqlstate_means_down("57P01"), "one terminated backend is not an outage by itself");
        assert_eq!(StoreError::Unavailable(sqlx::Error::PoolTimedOut).outage(), Some(Outage::Flaky), "a busy pool");
        assert_eq!(StoreError::Unavailable(sqlx::Error::PoolClosed).outage(), Some(Outage::Down));
        assert_eq!(StoreError::Timeout("x", std::time::Duration::ZERO).outage(), Some(Outage::Flaky));
        assert_eq!(StoreError::Conflict.outage(), None);
        assert_eq!(StoreError::Down.outage(), None, "a refused call tells nothing new");
    }
}
