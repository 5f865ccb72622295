//! The gRPC baselines: servers answering the same messages with constants, on a runtime
//! of their own.

use super::*;

/// Which baseline server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BaselineKind {
    /// hyper's HTTP/2 server answering every request with one pre-encoded
    /// `GetCredentialResponse` frame; the request body is read, not decoded.
    Raw,
    /// tonic's `Server` and `Router` with a `CredentialService` answering constants.
    Tonic,
}

impl BaselineKind {
    pub(super) fn name(self) -> &'static str {
        match self {
            BaselineKind::Raw => "raw",
            BaselineKind::Tonic => "tonic",
        }
    }
}

/// A baseline server on its own runtime (and thread) in this process.
pub(super) struct BaselineServer {
    pub(super) addr: SocketAddr,
    pub(super) stop: Option<oneshot::Sender<()>>,
    pub(super) done: Option<oneshot::Receiver<()>>,
}

impl BaselineServer {
    pub(super) fn start(
        kind: BaselineKind,
        addr: SocketAddr,
        workers: usize,
        value_size: usize,
        miss: bool,
    ) -> Result<BaselineServer, ClientError> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("baseline-server")
            .enable_all()
            .build()?;
        let raw = raw::RawReply::new(value_size);
        let api = BaselineApi {
            value: make_value(value_size),
            miss,
            created_at: prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 },
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        std::thread::Builder::new().name("baseline".into()).spawn(move || {
            let served = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                if kind == BaselineKind::Raw {
                    return tokio::select! {
                        r = raw::serve_raw(listener, raw) => r,
                        _ = stop_rx => Ok(()),
                    };
                }
                // TCP_NODELAY as the daemon sets it, or trailers wait for a delayed ACK.
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                let serve = tonic::transport::Server::builder()
                    .add_service(CredentialServiceServer::new(api).max_encoding_message_size(usize::MAX))
                    .serve_with_incoming(incoming);
                // Not graceful: the bench is over and its connections may still be open.
                tokio::select! {
                    r = serve => r.map_err(std::io::Error::other),
                    _ = stop_rx => Ok(()),
                }
            });
            if let Err(e) = served {
                eprintln!("baseline server failed: {e}");
            }
            runtime.shutdown_timeout(Duration::from_secs(1));
            let _ = done_tx.send(());
        })?;
        Ok(BaselineServer { addr, stop: Some(stop_tx), done: Some(done_rx) })
    }

    /// Until the server ends by itself (it fails: it is never asked to stop).
    pub(super) async fn wait(mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }

    pub(super) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        }
    }
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub(super) struct BaselineApi {
    pub(super) value: Vec<u8>,
    /// Answer every read NOT_FOUND, like a store holding nothing.
    pub(super) miss: bool,
    pub(super) created_at: prost_types::Timestamp,
}

impl BaselineApi {
    pub(super) fn credential(&self, name: String) -> proto::GetCredentialResponse {
        proto::GetCredentialResponse {
            name,
            version: 1,
            value: self.value.clone(),
            state: proto::VersionState::Current as i32,
            created_at: Some(self.created_at),
            expires_at: None,
        }
    }
}

#[tonic::async_trait]
impl CredentialService for BaselineApi {
    async fn get_credential(
        &self,
        req: Request<proto::GetCredentialRequest>,
    ) -> Result<Response<proto::GetCredentialResponse>, Status> {
        if self.miss {
            return Err(Status::not_found("not found"));
        }
        Ok(Response::new(self.credential(req.into_inner().name)))
    }

    async fn batch_get_credentials(
        &self,
        req: Request<proto::BatchGetCredentialsRequest>,
    ) -> Result<Response<proto::BatchGetCredentialsResponse>, Status> {
        let results = req
            .into_inner()
            .names
            .into_iter()
            .map(|name| proto::BatchGetResult {
                result: Some(batch_get_result::Result::Credential(self.credential(name.clone()))),
                name,
            })
            .collect();
        Ok(Response::new(proto::BatchGetCredentialsResponse { results }))
    }

    async fn get_credential_metadata(
        &self,
        req: Request<proto::GetCredentialMetadataRequest>,
    ) -> Result<Response<proto::CredentialMetadata>, Status> {
        Ok(Response::new(proto::CredentialMetadata {
            name: req.into_inner().name,
            current_version: 1,
            ..Default::default()
        }))
    }

    async fn put_credential(
        &self,
        req: Request<proto::PutCredentialRequest>,
    ) -> Result<Response<proto::PutCredentialResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(proto::PutCredentialResponse {
            name: r.name,
            version: r.expected_version.unwrap_or(0) + 1,
            created_at: Some(self.created_at),
        }))
    }

    async fn delete_credential(
        &self,
        _req: Request<proto::DeleteCredentialRequest>,
    ) -> Result<Response<proto::DeleteCredentialResponse>, Status> {
        Err(Status::unimplemented("the baseline only reads and writes"))
    }

    async fn list_credentials(
        &self,
        _req: Request<proto::ListCredentialsRequest>,
    ) -> Result<Response<proto::ListCredentialsResponse>, Status> {
        Err(Status::unimplemented("the baseline only reads and writes"))
    }

    type WatchCredentialsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::CredentialEvent, Status>> + Send + 'static>>;

    async fn watch_credentials(
        &self,
        _req: Request<proto::WatchCredentialsRequest>,
    ) -> Result<Response<Self::WatchCredentialsStream>, Status> {
        Err(Status::unimplemented("the baseline only reads and writes"))
    }

    async fn write_credentials(
        &self,
        _req: Request<proto::WriteCredentialsRequest>,
    ) -> Result<Response<proto::WriteCredentialsResponse>, Status> {
        Err(Status::unimplemented("the baseline only reads and writes"))
    }

    async fn rollback_credential(
        &self,
        _req: Request<proto::RollbackCredentialRequest>,
    ) -> Result<Response<proto::RollbackCredentialResponse>, Status> {
        Err(Status::unimplemented("the baseline only reads and writes"))
    }

    async fn update_credential_metadata(
        &self,
        _req: Request<proto::UpdateCredentialMetadataRequest>,
    ) -> Result<Response<proto::CredentialMetadata>, Status> {
        Err(Status::unimplemented("the baseline only reads and writes"))
    }
}
