//! The admin listener: `/metrics`, `/healthz`, `/readyz` (ready after the first complete
//! reconcile) and `/containers` (the journal: what was decided for each container, and why).
//! Reads the metrics, the journal and the ready flag; knows nothing of Docker or Consul.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::journal::Journal;
use crate::metrics::Metrics;

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    journal: Arc<Journal>,
    ready: Arc<AtomicBool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, journal, ready) = (metrics.clone(), journal.clone(), ready.clone());
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let (metrics, journal, ready) = (metrics.clone(), journal.clone(), ready.clone());
            async move {
                let resp = match req.uri().path() {
                    "/healthz" => text(StatusCode::OK, "ok\n".into()),
                    "/readyz" if ready.load(Ordering::Acquire) => {
                        text(StatusCode::OK, "ready\n".into())
                    }
                    "/readyz" => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not reconciled yet\n".into(),
                    ),
                    "/metrics" => {
                        let mut r = text(StatusCode::OK, metrics.encode());
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        r
                    }
                    "/containers" => {
                        let body = serde_json::to_string_pretty(&journal.entries())
                            .expect("entries serialize");
                        let mut r = text(StatusCode::OK, body);
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("application/json"),
                        );
                        r
                    }
                    _ => text(
                        StatusCode::NOT_FOUND,
                        "try /metrics /healthz /readyz /containers\n".into(),
                    ),
                };
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
