//! The admin listener: `/metrics`, `/healthz`, `/readyz` and `/routes`. It reads shared state
//! and never touches the request path.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::BackendState;
use crate::server::accept::Acceptor;
use crate::time::now_ms;
use crate::Shared;

pub async fn serve_admin(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    let mut acceptor = Acceptor::new(listener, "admin");
    loop {
        tokio::select! {
            (stream, _, _) = acceptor.accept(None, &shared.metrics) => {
                let shared = shared.clone();
                let svc = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(respond(&shared, &req)) }
                });
                let conn = http.serve_connection(TokioIo::new(stream), svc);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = stop.changed() => return,
        }
    }
}

fn respond(shared: &Shared, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if shared.shutting_down.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if shared.table.load().is_none() {
                text(StatusCode::SERVICE_UNAVAILABLE, "no routing table yet\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        "/metrics" => {
            refresh_gauges(shared);
            let mut resp = Response::new(Full::new(Bytes::from(shared.metrics.encode())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        "/routes" => {
            let body = serde_json::to_vec_pretty(&routes_view(shared)).expect("view serializes");
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics /healthz /readyz /routes\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// Gauges derived from the live table are computed at scrape time, not on the request path.
fn refresh_gauges(shared: &Shared) {
    let m = &shared.metrics;
    let _series = shared.series.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(table) = shared.table.load_full() {
        for route in table.routes.iter() {
            let healthy = route.healthy_count();
            let ejected = route.backends.len() - healthy;
            m.backends
                .with_label_values(&[&route.name, BackendState::Healthy.as_str()])
                .set(healthy as i64);
            m.backends
                .with_label_values(&[&route.name, BackendState::Ejected.as_str()])
                .set(ejected as i64);
        }
    }
    m.consul_up.set(i64::from(shared.consul.consul_up()));
    m.table_age
        .set(shared.consul.table_age().unwrap_or(f64::NAN));
}

#[derive(Serialize)]
struct RoutesView {
    generation: u64,
    table_age_seconds: Option<f64>,
    consul_up: bool,
    /// The table is the snapshot's: Consul has not answered for all of it since the start.
    from_snapshot: bool,
    routes: Vec<RouteView>,
}

#[derive(Serialize)]
struct RouteView {
    route: String,
    host: Option<String>,
    prefix: String,
    backends: Vec<BackendView>,
}

#[derive(Serialize)]
struct BackendView {
    addr: String,
    service: String,
    instance: String,
    weight: u32,
    state: &'static str,
    ejected_for_ms: Option<u64>,
    in_flight: usize,
    requests: u64,
    idle_connections: usize,
    /// Kept over a Consul that lost its state, which no longer lists it.
    held: bool,
    /// Its version (tag `version`), and whether its weight in Consul KV is 0 (only pinned
    /// requests reach it).
    version: Option<String>,
    dark: bool,
}

fn routes_view(shared: &Shared) -> RoutesView {
    let table = shared.table.load_full();
    let now = now_ms();
    RoutesView {
        generation: table.as_ref().map_or(0, |t| t.generation),
        table_age_seconds: shared.consul.table_age(),
        consul_up: shared.consul.consul_up(),
        from_snapshot: shared.metrics.table_from_snapshot.get() == 1,
        routes: table
            .iter()
            .flat_map(|t| t.routes.iter())
            .map(|r| RouteView {
                route: r.name.clone(),
                host: r.key.host.clone(),
                prefix: r.key.prefix.clone(),
                backends: r
                    .backends
                    .iter()
                    .map(|b| {
                        let ejected = b.backend.ejected_for(now);
                        BackendView {
                            addr: b.spec.addr.to_string(),
                            service: b.spec.service.to_string(),
                            instance: b.spec.instance_id.to_string(),
                            weight: b.weight,
                            state: if ejected.is_some() {
                                BackendState::Ejected
                            } else {
                                BackendState::Healthy
                            }
                            .as_str(),
                            ejected_for_ms: ejected.map(|d| d.as_millis() as u64),
                            in_flight: b.backend.in_flight(),
                            requests: b.backend.requests(),
                            idle_connections: b.backend.idle_connections(),
                            held: b.spec.held,
                            version: b.spec.version.as_deref().map(str::to_string),
                            dark: b.spec.dark,
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}
