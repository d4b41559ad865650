//! Accepting client connections on the plain and TLS listeners: HTTP/1.1 with keep-alive and
//! upgrades, HTTP/2 (ALPN `h2` over TLS, or prior knowledge on the plain port when enabled),
//! head-size and header-count limits, a header-read timeout, and a graceful drain that lets
//! in-flight requests and upgraded tunnels finish.
//!
//! Every connection task and tunnel holds a clone of one `mpsc::Sender`; the drain is over when
//! the receiver sees all of them dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::rt::{Read, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::proxy::{Drain, Peer};
use crate::tls::{Tls, ALPN_H2};
use crate::Shared;

/// What a client connection needs from its listener.
struct Listener {
    shared: Arc<Shared>,
    tls: Option<Arc<Tls>>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    stop: watch::Receiver<bool>,
    drain: Drain,
}

/// Serves the proxy on `listener` (TLS when `tls` is given) until `stop` flips, then waits up
/// to `drain` for open connections to finish their requests and upgraded connections to end;
/// those still open then are closed. Returns how many connections were still open.
pub async fn serve_proxy(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) -> usize {
    let cfg = &shared.config;
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(cfg.client_header_timeout)
        .max_header_size(cfg.max_header_bytes)
        .max_headers(cfg.max_headers);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        // Pings find clients that vanished without a FIN; HTTP/2 has no header timeout.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256)
        .max_header_list_size(cfg.max_header_bytes as u32);
    let (alive, mut all_gone) = mpsc::channel::<Infallible>(1);
    let (close_tunnels, tunnels_closed) = watch::channel(false);
    let ctx = Arc::new(Listener {
        shared: shared.clone(),
        tls,
        h1,
        h2,
        stop: stop.clone(),
        drain: Drain {
            alive,
            close: tunnels_closed,
        },
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        shared.metrics.client_connection_errors.with_label_values(&["accept"]).inc();
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(ctx.clone().connection(stream, peer));
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    // Connection tasks hold the listener context, and with it a drain sender; tunnels hold
    // their own. Ours goes now, so `recv` returns `None` once the last of them ends.
    drop(ctx);
    let open = shared.metrics.client_connections_open.get();
    tracing::info!(open_connections = open, "stopped accepting; draining");
    if tokio::time::timeout(drain, all_gone.recv()).await.is_ok() {
        return 0;
    }
    let left = shared.metrics.client_connections_open.get().max(0) as usize
        + shared.metrics.upgraded_open.get().max(0) as usize;
    tracing::warn!(left, "drain timeout reached; closing remaining connections");
    // Tunnels get a FIN on both sides rather than a reset when the process exits.
    let _ = close_tunnels.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), all_gone.recv()).await;
    left
}

impl Listener {
    async fn connection(self: Arc<Self>, stream: TcpStream, addr: SocketAddr) {
        let metrics = &self.shared.metrics;
        metrics.client_connections_open.inc();
        let _open = OpenConnection(self.shared.clone());
        match &self.tls {
            Some(tls) => {
                let Some(stream) = tls.accept(stream, metrics).await else {
                    return;
                };
                let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
                self.serve(TokioIo::new(stream), addr, true, h2).await;
            }
            None => {
                let h2 = self.shared.config.h2c
                    && starts_with_h2_preface(&stream, self.shared.config.client_header_timeout)
                        .await;
                self.serve(TokioIo::new(stream), addr, false, h2).await;
            }
        }
    }

    async fn serve<I>(&self, io: I, addr: SocketAddr, tls: bool, h2: bool)
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        let shared = &self.shared;
        let protocol = if h2 { "h2" } else { "http/1.1" };
        shared
            .metrics
            .client_connections
            .with_label_values(&[protocol, if tls { "true" } else { "false" }])
            .inc();
        let peer = Arc::new(Peer::new(addr, tls, self.drain.clone()));
        let shared2 = shared.clone();
        let svc = service_fn(move |req| {
            let (shared, peer) = (shared2.clone(), peer.clone());
            async move { Ok::<_, Infallible>(crate::proxy::handle(shared, req, peer).await) }
        });
        let mut stop = self.stop.clone();
        // Both connection types finish in-flight requests after `graceful_shutdown`.
        macro_rules! drive {
            ($conn:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }};
        }
        let result = if h2 {
            drive!(self.h2.serve_connection(io, svc))
        } else {
            drive!(self.h1.serve_connection(io, svc).with_upgrades())
        };
        if let Err(e) = result {
            let kind = if e.is_timeout() {
                "header_timeout"
            } else if e.is_parse_too_large() {
                "head_too_large"
            } else if e.is_parse() || e.is_parse_status() {
                "malformed"
            } else if e.is_incomplete_message() {
                "incomplete"
            } else {
                "io"
            };
            shared
                .metrics
                .client_connection_errors
                .with_label_values(&[kind])
                .inc();
            tracing::debug!(peer = %addr, error = %e, kind, "client connection ended with an error");
        }
    }
}

struct OpenConnection(Arc<Shared>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.metrics.client_connections_open.dec();
    }
}

/// Whether a plain connection opens with the HTTP/2 preface (`PRI * HTTP/2.0`), without
/// consuming it. No HTTP/1 method is `PRI`, so four bytes decide. A client that sends nothing
/// is bounded by `timeout`, as a slow HTTP/1 head would be.
async fn starts_with_h2_preface(stream: &TcpStream, timeout: Duration) -> bool {
    const PREFACE: &[u8; 4] = b"PRI ";
    let sniff = async {
        let mut buf = [0u8; 4];
        // The first bytes almost always arrive in one segment; a split start is polled briefly.
        for _ in 0..100 {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if buf[..n] != PREFACE[..n] => return false,
                Ok(4) => return true,
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        false
    };
    tokio::time::timeout(timeout, sniff).await.unwrap_or(false)
}
