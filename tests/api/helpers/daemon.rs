//! A daemon running inside the test process on port 0, and authenticated tonic clients.

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use credvault::config::Settings;
use credvault::proto::admin_service_client::AdminServiceClient;
use credvault::proto::credential_service_client::CredentialServiceClient;
use credvault::server::{Daemon, ServerError};

#[derive(Clone)]
pub struct Bearer(pub MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    /// The `authorization` value for `token`.
    pub fn new(token: &str) -> Bearer {
        Bearer(format!("Bearer {token}").parse().expect("ascii token"))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = CredentialServiceClient<InterceptedService<Channel, Bearer>>;
pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// A credential client over `channel` that presents `token`.
pub fn client_over(channel: Channel, token: &str) -> Client {
    CredentialServiceClient::with_interceptor(channel, Bearer::new(token))
}

/// An admin client over `channel` that presents `token`.
pub fn admin_over(channel: Channel, token: &str) -> Admin {
    AdminServiceClient::with_interceptor(channel, Bearer::new(token))
}

/// A daemon running inside the test process.
///
/// Dropping it without [`stop`](TestDaemon::stop) tells it to stop (the same graceful
/// drain) without waiting; its tasks end with the test's runtime at the latest.
pub struct TestDaemon {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    /// The daemon's core, for counting its store queries.
    pub vault: credvault::vault::Vault,
    /// The daemon's token table, for counting how it was updated.
    pub auth: credvault::auth::Auth,
    pub token: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestDaemon {
    /// Builds and starts a daemon; `token` is the root token to use when the database
    /// already has one (a restart), since it is printed only on first start.
    pub async fn start(settings: Settings, token: Option<&str>) -> TestDaemon {
        Self::start_with_clock(settings, token, std::sync::Arc::new(credvault::model::SystemClock)).await
    }

    /// [`TestDaemon::start`] on a clock the test moves (`credvault::model::ManualClock`).
    pub async fn start_with_clock(
        settings: Settings,
        token: Option<&str>,
        clock: std::sync::Arc<dyn credvault::model::Clock>,
    ) -> TestDaemon {
        let mut daemon = Daemon::build_with_clock(settings, clock).await.expect("daemon starts");
        let token = match (daemon.take_root_token(), token) {
            (Some(t), _) => t.expose_secret().to_owned(),
            (None, Some(t)) => t.to_owned(),
            (None, None) => panic!("no root token: pass the one from the first start"),
        };
        let addr = daemon.local_addr();
        let metrics_addr = daemon.metrics_addr();
        let vault = daemon.vault().clone();
        let auth = daemon.auth().clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(daemon.run_until(async {
            let _ = rx.await;
        }));
        TestDaemon { addr, metrics_addr, vault, auth, token, stop: Some(tx), task: Some(task) }
    }

    pub async fn channel(&self) -> Channel {
        // The listener is bound before `start` returns, so the first connect succeeds;
        // retry briefly anyway in case the accept loop is still being scheduled.
        let endpoint = format!("http://{}", self.addr);
        let mut last = None;
        for _ in 0..50 {
            match Channel::from_shared(endpoint.clone()).expect("endpoint").connect().await {
                Ok(c) => return c,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("cannot connect to test daemon: {last:?}");
    }

    pub async fn client(&self) -> Client {
        CredentialServiceClient::with_interceptor(self.channel().await, self.bearer())
    }

    pub async fn admin(&self) -> Admin {
        AdminServiceClient::with_interceptor(self.channel().await, self.bearer())
    }

    pub fn bearer(&self) -> Bearer {
        Bearer::new(&self.token)
    }

    /// Stops the daemon and waits for it to finish in-flight requests.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("daemon task").expect("daemon ran cleanly");
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn passphrase_settings(mut s: Settings, passphrase: &str) -> Settings {
    s.passphrase = Some(SecretString::from(passphrase.to_owned()));
    // The minimum allowed cost keeps tests quick; production defaults are higher.
    s.kdf.memory_kib = 19 * 1024;
    s.kdf.iterations = 2;
    s.kdf.parallelism = 1;
    s
}
