//! A TCP proxy in front of the test PostgreSQL that a test cuts (every open connection
//! closed, new ones refused: nothing listens on the port) and restores (the same port
//! listens again). A daemon reaches PostgreSQL through it by its database URL.
//!
//! Self-contained (no `crate::` paths), so that benches include it too:
//! `#[path = "../tests/api/proxy.rs"] mod proxy;`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// The server's URL when `DATABASE_URL` is unset, as in the test helpers.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct PgProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

/// `host:port` of a PostgreSQL URL (`postgres://user@host:port/db?...`).
fn authority(url: &str) -> (usize, usize) {
    let start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[start..];
    let end = rest.find(['/', '?']).map(|i| start + i).unwrap_or(url.len());
    let host_start = url[start..end].rfind('@').map(|i| start + i + 1).unwrap_or(start);
    (host_start, end)
}

/// `url` pointing at `addr` instead of its own host and port.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let (a, b) = authority(url);
    format!("{}{addr}{}", &url[..a], &url[b..])
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // The restored listener takes the port back while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

impl PgProxy {
    /// A proxy on a free loopback port in front of the PostgreSQL of `DATABASE_URL`.
    pub async fn start() -> PgProxy {
        let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        let (a, b) = authority(&url);
        let hostport = &url[a..b];
        let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:5432") };
        let upstream = tokio::net::lookup_host(hostport.as_str())
            .await
            .expect("resolve PostgreSQL")
            .find(|a| a.is_ipv4())
            .expect("an IPv4 address for PostgreSQL");
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let mut p = PgProxy { addr, upstream, conns: Arc::default(), accept: None };
        p.serve(listener);
        p
    }

    /// `database_url` (a database on the proxied server), through this proxy.
    pub fn url(&self, database_url: &str) -> String {
        via(database_url, self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (upstream, conns) = (self.upstream, self.conns.clone());
        self.accept = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns.lock().unwrap().push(task);
            }
        }));
    }

    /// Closes every proxied connection and stops listening, so connects are refused.
    pub async fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        // Abort is asynchronous: a connection task in the middle of a poll still forwards
        // what it reads there. Waiting for each one to end means that once `cut` returns
        // not one more byte passes, so nothing the test writes next can slip through.
        let conns: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        for c in &conns {
            c.abort();
        }
        for c in conns {
            let _ = c.await;
        }
    }

    /// Listens on the same port again.
    pub async fn restore(&mut self) {
        let mut last = None;
        for _ in 0..100 {
            match bind(self.addr) {
                Ok(l) => return self.serve(l),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("cannot listen on {} again: {last:?}", self.addr);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

#[test]
fn urls_are_pointed_at_the_proxy() {
    let addr: SocketAddr = "127.0.0.1:6000".parse().unwrap();
    assert_eq!(via("postgres://postgres@127.0.0.1:5432/db", addr), "postgres://postgres@127.0.0.1:6000/db");
    assert_eq!(via("postgres://u:p@h/db?sslmode=require", addr), "postgres://u:p@127.0.0.1:6000/db?sslmode=require");
    assert_eq!(via("postgres://h:5432", addr), "postgres://127.0.0.1:6000");
}
