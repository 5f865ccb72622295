//! The tower layers every request passes through, outermost first: [`metrics`] (counts
//! what the caller saw), the deadline layer (`service::lifecycle`), the audit layer
//! (`crate::audit`), the drain layer (`service::lifecycle`), then admission
//! (`crate::limits`).
//!
//! Each layer is only its per-request work, an [`Around`]; the one [`Layered`] service
//! and the one [`AroundLayer`] here do the tower plumbing (readiness, wrapping) for all.

pub mod admission;
pub mod audit;
pub mod metrics;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Header names the layers read or write on every request, made once: a lookup by a
/// `&str` parses and checks the name each time.
pub(crate) static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
pub(crate) static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
pub(crate) static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// What a layer does around one request. `inner` has been polled ready: call it once,
/// or take it with [`take_ready`] to call it from inside the returned future.
pub trait Around<S, B>: Clone
where
    S: tower::Service<http::Request<B>>,
{
    fn around(&self, inner: &mut S, req: http::Request<B>) -> BoxFuture<Result<S::Response, S::Error>>;
}

/// Makes an [`Around`] a tower layer: `Server::builder().layer(AroundLayer(x))`.
#[derive(Debug, Clone, Copy)]
pub struct AroundLayer<A>(pub A);

impl<S, A: Clone> tower::Layer<S> for AroundLayer<A> {
    type Service = Layered<S, A>;

    fn layer(&self, inner: S) -> Self::Service {
        Layered { inner, around: self.0.clone() }
    }
}

/// The service of every layer: readiness is the inner service's, a call is the layer's
/// [`Around`].
#[derive(Debug, Clone)]
pub struct Layered<S, A> {
    inner: S,
    around: A,
}

impl<S, A, B> tower::Service<http::Request<B>> for Layered<S, A>
where
    S: tower::Service<http::Request<B>>,
    A: Around<S, B>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.around.around(&mut self.inner, req)
    }
}

/// The service that was polled ready, for a future that calls it later; a clone (not
/// yet ready) stays behind for the next request, as tower requires.
pub(crate) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}
