//! Counts and times every RPC: `credvault_requests_total{rpc,code}` and
//! `credvault_request_duration_seconds{rpc}`, with RPC names and status codes from fixed
//! lists, so no request can add a series.

use std::sync::OnceLock;
use std::time::Instant;

use crate::service::layers::{Around, BoxFuture, GRPC_STATUS};
use crate::telemetry::names;

/// The RPC names used as label values; anything else is `unknown`.
const RPCS: &[&str] = &[
    "GetCredential",
    "BatchGetCredentials",
    "GetCredentialMetadata",
    "PutCredential",
    "DeleteCredential",
    "ListCredentials",
    "WatchCredentials",
    "WriteCredentials",
    "RollbackCredential",
    "UpdateCredentialMetadata",
    "RotateCredential",
    "DestroyVersion",
    "UndeleteCredential",
    "RotateKek",
    "GetRotationJob",
    "WatchRotationJob",
    "RekeyMaster",
    "SetRotationPolicy",
    "GetRotationPolicy",
    "DeleteRotationPolicy",
    "CreateToken",
    "RevokeToken",
    "ListTokens",
    "GetStatus",
    "ListAuditEvents",
    "BindIdentity",
    "ListIdentities",
    "UnbindIdentity",
    "Check",
    "Watch",
    "ServerReflectionInfo",
];

/// The position of the path's method in [`RPCS`]; `RPCS.len()` for anything else.
fn rpc_index(path: &str) -> usize {
    let method = path.rsplit('/').next().unwrap_or_default();
    RPCS.iter().position(|r| *r == method).unwrap_or(RPCS.len())
}

pub(crate) fn rpc_label(path: &str) -> &'static str {
    RPCS.get(rpc_index(path)).copied().unwrap_or("unknown")
}

/// gRPC status codes by number.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const UNKNOWN_CODE: usize = 2;
const INTERNAL_CODE: usize = 13;

/// The number of a `grpc-status` value; anything that is not one is UNKNOWN.
fn code_index(code: &[u8]) -> usize {
    let n = match code {
        [d] if d.is_ascii_digit() => usize::from(d - b'0'),
        [b'1', d] if d.is_ascii_digit() => 10 + usize::from(d - b'0'),
        _ => return UNKNOWN_CODE,
    };
    if n < CODES.len() {
        n
    } else {
        UNKNOWN_CODE
    }
}

pub(crate) fn code_label(code: &[u8]) -> &'static str {
    CODES[code_index(code)]
}

/// The request series' handles, each registered on first use. `counter!` with labels
/// builds a key and looks it up in the registry on every call; with these a request
/// pays an index and an atomic add instead.
struct RequestSeries {
    /// By RPC (the last for `unknown`).
    duration: Vec<OnceLock<metrics::Histogram>>,
    /// By RPC, then by status code.
    requests: Vec<[OnceLock<metrics::Counter>; CODES.len()]>,
}

fn request_series() -> &'static RequestSeries {
    static SERIES: OnceLock<RequestSeries> = OnceLock::new();
    SERIES.get_or_init(|| RequestSeries {
        duration: (0..=RPCS.len()).map(|_| OnceLock::new()).collect(),
        requests: (0..=RPCS.len()).map(|_| std::array::from_fn(|_| OnceLock::new())).collect(),
    })
}

fn record_request(rpc: usize, code: usize, seconds: f64) {
    let series = request_series();
    let (Some(duration), Some(requests)) = (series.duration.get(rpc), series.requests.get(rpc)) else {
        return;
    };
    let label = RPCS.get(rpc).copied().unwrap_or("unknown");
    duration.get_or_init(|| metrics::histogram!(names::REQUEST_DURATION, "rpc" => label)).record(seconds);
    if let Some(counter) = requests.get(code) {
        counter.get_or_init(|| metrics::counter!(names::REQUESTS, "rpc" => label, "code" => CODES[code])).increment(1);
    }
}

/// Counts and times every gRPC request. An error status produced by a handler or
/// interceptor travels in the response headers (a trailers-only response); a response
/// without one is a success whose status follows in the trailers.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestMetricsLayer;

impl<S, B, RB> Around<S, B> for RequestMetricsLayer
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    fn around(&self, inner: &mut S, req: http::Request<B>) -> BoxFuture<Result<S::Response, S::Error>> {
        let rpc = rpc_index(req.uri().path());
        let start = Instant::now();
        let fut = inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => r.headers().get(&GRPC_STATUS).map(|v| code_index(v.as_bytes())).unwrap_or(0),
                Err(_) => INTERNAL_CODE,
            };
            record_request(rpc, code, start.elapsed().as_secs_f64());
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_fixed_sets() {
        assert_eq!(rpc_label("/credvault.v1.CredentialService/GetCredential"), "GetCredential");
        assert_eq!(rpc_label("/credvault.v1.CredentialService/payments-secret-name"), "unknown");
        assert_eq!(code_label(b"5"), "NOT_FOUND");
        assert_eq!(code_label(b"999"), "UNKNOWN");
        assert_eq!(code_label(b"16"), "UNAUTHENTICATED");
        assert_eq!(code_label(b"0"), "OK");
        assert_eq!(code_label(b"-1"), "UNKNOWN");
        assert_eq!(code_label(b"+5"), "UNKNOWN", "only plain numbers");
        assert_eq!(code_label(b""), "UNKNOWN");
        assert_eq!(rpc_label("/x.Svc/ServerReflectionInfo"), "ServerReflectionInfo");
    }

    #[test]
    fn every_rpc_of_the_api_has_its_own_label() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let methods: Vec<&str> =
            set.file.iter().flat_map(|f| &f.service).flat_map(|s| &s.method).map(|m| m.name()).collect();
        assert!(methods.len() > 20, "{methods:?}");
        for m in methods {
            assert_eq!(rpc_label(&format!("/credvault.v1.Service/{m}")), m, "add {m} to RPCS");
        }
    }
}
