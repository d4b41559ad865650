//! Accepting client connections: HTTP/1.1 with keep-alive, head-size and header-count limits,
//! a header-read timeout, and a graceful drain that lets in-flight requests finish.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Shared;

/// Serves the proxy on `listener` until `stop` flips, then waits up to `drain` for open
/// connections to finish their requests. Returns how many connections were still open.
pub async fn serve_proxy(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) -> usize {
    let cfg = &shared.config;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(cfg.client_header_timeout)
        .max_header_size(cfg.max_header_bytes)
        .max_headers(cfg.max_headers);
    let graceful = GracefulShutdown::new();
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
                let shared2 = shared.clone();
                let client = crate::proxy::Peer::new(peer);
                let svc = service_fn(move |req| {
                    let (shared, client) = (shared2.clone(), client.clone());
                    async move { Ok::<_, Infallible>(crate::proxy::handle(shared, req, client).await) }
                });
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
                let shared = shared.clone();
                tokio::spawn(async move {
                    shared.metrics.client_connections.inc();
                    shared.metrics.client_connections_open.inc();
                    if let Err(e) = conn.await {
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
                        shared.metrics.client_connection_errors.with_label_values(&[kind]).inc();
                        tracing::debug!(%peer, error = %e, kind, "client connection ended with an error");
                    }
                    shared.metrics.client_connections_open.dec();
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let open = shared.metrics.client_connections_open.get();
    tracing::info!(open_connections = open, "stopped accepting; draining");
    match tokio::time::timeout(drain, graceful.shutdown()).await {
        Ok(()) => 0,
        Err(_) => {
            let left = shared.metrics.client_connections_open.get().max(0) as usize;
            tracing::warn!(left, "drain timeout reached; closing remaining connections");
            left
        }
    }
}
