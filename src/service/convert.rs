//! Conversions between the model's types and protobuf messages that more than one
//! service needs.

use tonic::Status;

use crate::model::{Micros, VersionState};
use crate::proto;

pub(crate) fn timestamp(micros: Micros) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        // In 0..1_000_000_000 by construction.
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or_default(),
    }
}

pub(crate) fn from_timestamp(t: &prost_types::Timestamp) -> Result<Micros, Status> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Status::invalid_argument("timestamp nanos must be in 0..1e9"));
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1000)))
        .ok_or_else(|| Status::invalid_argument("timestamp out of range"))
}

pub(crate) fn version_state(s: VersionState) -> proto::VersionState {
    match s {
        VersionState::Current => proto::VersionState::Current,
        VersionState::Previous => proto::VersionState::Previous,
        VersionState::Deprecated => proto::VersionState::Deprecated,
        VersionState::Destroyed => proto::VersionState::Destroyed,
    }
}
