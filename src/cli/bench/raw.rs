//! The raw HTTP/2 baseline: hyper serving one pre-encoded `GetCredentialResponse` gRPC
//! frame to every request, with a pass-through codec (the request body is read and
//! dropped, never decoded). No tonic, no routing, no protobuf work per request: what is
//! left is HTTP/2 itself, the transport's ceiling on this machine.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Body as _;
use hyper::body::{Bytes, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;

use super::*;

/// The constant answer: one length-prefixed gRPC message, then `grpc-status: 0`.
#[derive(Clone)]
pub(super) struct RawReply {
    frame: Bytes,
    trailers: http::HeaderMap,
}

impl RawReply {
    /// A `GetCredentialResponse` for a name as long as the bench's (`bench/000000`) with a
    /// value of `value_size` bytes, encoded once.
    pub(super) fn new(value_size: usize) -> RawReply {
        let message = proto::GetCredentialResponse {
            name: "bench/000000".to_owned(),
            version: 1,
            value: make_value(value_size),
            state: proto::VersionState::Current as i32,
            created_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            expires_at: None,
        };
        let body = message.encode_to_vec();
        let mut frame = Vec::with_capacity(5 + body.len());
        frame.push(0); // not compressed
        frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(&body);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        RawReply { frame: frame.into(), trailers }
    }
}

/// The response body: the frame, then the trailers.
struct ReplyBody {
    frame: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.frame.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.frame.is_none() && self.trailers.is_none()
    }
}

/// Reads the request body to its end (the pass-through codec: the bytes are not looked
/// at), then answers with the constant frame.
async fn answer(
    reply: RawReply,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<ReplyBody>, Infallible> {
    let mut body = req.into_body();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if frame.is_err() {
            break;
        }
    }
    let mut res = http::Response::new(ReplyBody { frame: Some(reply.frame), trailers: Some(reply.trailers) });
    res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    Ok(res)
}

/// Serves HTTP/2 connections from `listener` until the process ends.
pub(super) async fn serve_raw(listener: tokio::net::TcpListener, reply: RawReply) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        // As the daemon does, or trailers wait for a delayed ACK.
        stream.set_nodelay(true)?;
        let reply = reply.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(reply.clone(), req));
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service);
            // A client going away mid-connection is the normal end of a run.
            let _ = conn.await;
        });
    }
}
