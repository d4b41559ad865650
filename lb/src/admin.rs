//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/routes`, and `/why?host=H&path=P`
//! (what happens to such a request, and why). It reads shared state and never touches the
//! request path.

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
use crate::routing::Verdict;
use crate::server::accept::Acceptor;
use crate::time::now_ms;
use crate::Shared;
use switchyard_consul::tags::path_matches;

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
        "/why" => match why_view(shared, req.uri().query().unwrap_or("")) {
            Ok(view) => {
                let body = serde_json::to_vec_pretty(&view).expect("view serializes");
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                resp
            }
            Err(e) => {
                let mut resp = Response::new(Full::new(Bytes::from(format!("{e}\n"))));
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                resp
            }
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics /healthz /readyz /routes /why?host=H&path=P\n",
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
    /// The Consul node it is registered on.
    node: String,
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
                            node: b.spec.node.to_string(),
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

/// What happens to a request for a host and path, and why: the route that takes it and the
/// ones that do not, its backends and whether the balancer could pick each now, and the
/// route's instances that are not backends.
#[derive(Serialize)]
struct WhyView {
    host: String,
    path: String,
    /// What the request gets, in words: `routed`, `404 no route`, `503 no backend can be
    /// picked`, `503 no routing table yet`.
    answer: String,
    route: Option<String>,
    routes: Vec<RouteVerdict>,
    /// Routes that apply but are left out of `routes` (at most `WHY_ROUTES` are listed).
    more_routes: usize,
    backends: Vec<WhyBackend>,
    pickable: usize,
    unrouted: Vec<WhyInstance>,
    consul_up: bool,
    /// Seconds since Consul last confirmed the table; 0 while every watch is healthy.
    table_age_seconds: Option<f64>,
    from_snapshot: bool,
    generation: u64,
}

#[derive(Serialize)]
struct RouteVerdict {
    route: String,
    verdict: String,
}

#[derive(Serialize)]
struct WhyBackend {
    service: String,
    instance: String,
    node: String,
    addr: String,
    weight: u32,
    /// `ready`, `ejected`, `full` (at `LB_BACKEND_MAX_CONNECTIONS`) or `dark` (its version's
    /// weight is 0: pinned requests only).
    state: &'static str,
    pickable: bool,
    ejected_for_ms: Option<u64>,
    in_flight: usize,
    requests: u64,
    /// The last failure held against it (`connect`, `connect_timeout`, ...), and how long ago.
    last_failure: Option<&'static str>,
    last_failure_ms_ago: Option<u64>,
    held: bool,
    version: Option<String>,
}

#[derive(Serialize)]
struct WhyInstance {
    service: String,
    instance: String,
    node: String,
    addr: String,
    why: &'static str,
    failing_checks: Vec<FailingCheck>,
}

#[derive(Serialize)]
struct FailingCheck {
    check: String,
    status: String,
}

/// Routes listed in a "why" answer besides the one taken.
const WHY_ROUTES: usize = 32;

fn why_view(shared: &Shared, query: &str) -> Result<WhyView, String> {
    let (mut host, mut path) = (String::new(), "/".to_string());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| format!("{k}: bad percent-encoding"))?;
        match k {
            "host" => host = v,
            "path" => path = v,
            _ => return Err(format!("unknown parameter {k:?}: use host and path")),
        }
    }
    // As the request path sees them: the host lower-case without port, the path normal.
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !h.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host.as_str(),
    }
    .trim_end_matches('.')
    .to_ascii_lowercase();
    let path = crate::proxy::normalize_path(&path)
        .map_err(|e| format!("the lb answers 400 to this path: {e}"))?
        .into_owned();
    let table = shared.table.load_full();
    let now = now_ms();
    let cap = shared.config.backend_max_connections;
    let mut view = WhyView {
        answer: String::new(),
        route: None,
        routes: Vec::new(),
        more_routes: 0,
        backends: Vec::new(),
        pickable: 0,
        unrouted: Vec::new(),
        consul_up: shared.consul.consul_up(),
        table_age_seconds: shared.consul.table_age(),
        from_snapshot: shared.metrics.table_from_snapshot.get() == 1,
        generation: table.as_ref().map_or(0, |t| t.generation),
        host,
        path,
    };
    let Some(table) = table else {
        view.answer = "503 no routing table yet".into();
        return Ok(view);
    };
    let mut chosen = None;
    for (route, verdict) in table.explain(&view.host, &view.path) {
        let verdict = match verdict {
            Verdict::Chosen => {
                chosen = Some(route.clone());
                "takes the request".to_string()
            }
            Verdict::LongerPrefix(w) => format!("shadowed: {w} matches a longer prefix"),
            Verdict::HostRouteWins(w) => format!("shadowed: {w} is the host's own route"),
            Verdict::PathDiffers => "the path is not at or below its prefix".to_string(),
            Verdict::OtherHost => "another host's route".to_string(),
        };
        if view.routes.len() < WHY_ROUTES || chosen.as_ref().is_some_and(|c| c.name == route.name) {
            view.routes.push(RouteVerdict {
                route: route.name.clone(),
                verdict,
            });
        } else {
            view.more_routes += 1;
        }
    }
    if let Some(route) = &chosen {
        view.route = Some(route.name.clone());
        for b in route.backends.iter() {
            let ejected = b.backend.ejected_for(now);
            let full = cap.is_some_and(|c| b.backend.in_flight() >= c);
            let state = if ejected.is_some() {
                "ejected"
            } else if b.spec.dark {
                "dark"
            } else if full {
                "full"
            } else {
                "ready"
            };
            let failure = b.backend.last_failure(now);
            view.pickable += usize::from(state == "ready");
            view.backends.push(WhyBackend {
                service: b.spec.service.to_string(),
                instance: b.spec.instance_id.to_string(),
                node: b.spec.node.to_string(),
                addr: b.spec.addr.to_string(),
                weight: b.weight,
                state,
                pickable: state == "ready",
                ejected_for_ms: ejected.map(|d| d.as_millis() as u64),
                in_flight: b.backend.in_flight(),
                requests: b.backend.requests(),
                last_failure: failure.map(|(k, _)| k.as_str()),
                last_failure_ms_ago: failure.map(|(_, ago)| ago.as_millis() as u64),
                held: b.spec.held,
                version: b.spec.version.as_deref().map(str::to_string),
            });
        }
    }
    // The instances that ask for the route taken (or, when none is, for a route that would
    // take the request) and are not backends.
    let applies = |name: &str| match &chosen {
        Some(route) => route.name == name,
        None => name.split_once('/').is_some_and(|(h, p)| {
            (h == "*" || h == view.host) && path_matches(&format!("/{p}"), &view.path)
        }),
    };
    let unrouted = shared.unrouted.lock().unwrap_or_else(|e| e.into_inner());
    for (service, instances) in unrouted.iter() {
        for i in instances
            .iter()
            .filter(|i| i.routes.iter().any(|r| applies(r)))
        {
            view.unrouted.push(WhyInstance {
                service: service.clone(),
                instance: i.instance.clone(),
                node: i.node.clone(),
                addr: i.addr.clone(),
                why: i.why,
                failing_checks: i
                    .failing
                    .iter()
                    .map(|(check, status)| FailingCheck {
                        check: check.clone(),
                        status: status.clone(),
                    })
                    .collect(),
            });
        }
    }
    drop(unrouted);
    view.unrouted
        .sort_by(|a, b| (&a.service, &a.instance).cmp(&(&b.service, &b.instance)));
    // With every backend ejected the balancer still tries them (ejection never takes a
    // route's last backends out of service).
    let mut fallback = false;
    if view.pickable == 0 {
        for b in view.backends.iter_mut().filter(|b| b.state == "ejected") {
            b.pickable = true;
            view.pickable += 1;
            fallback = true;
        }
    }
    view.answer = match (&chosen, view.pickable) {
        (None, _) => "404 no route".into(),
        (Some(_), 0) => "503 no backend can be picked".into(),
        (Some(_), n) if fallback => format!(
            "routed to an ejected backend: all {n} are ejected, and the lb tries them rather than refuse"
        ),
        (Some(_), n) => format!(
            "routed: {n} of {} backends can be picked",
            view.backends.len()
        ),
    };
    Ok(view)
}

/// A query value's percent-decoding (`+` is a space); `None` when it is not UTF-8 or a `%`
/// is not followed by two hex digits.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}
