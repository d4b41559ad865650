//! web-sample: the smallest honest backend. It says which instance answered, serves `/health`,
//! and has fault knobs switchable at run time for tests and demos.
//!
//! - `GET /health`: 200 `ok`, or 503 while failing or draining.
//! - `POST /fault?health=fail|ok&latency_ms=N&error_rate=F`: set knobs; `GET /fault` shows them.
//!   Only with `WEB_FAULTS=on` (tests and demos): otherwise `403`, so that nobody can make a
//!   deployed instance fail through the public route.
//! - `GET /bytes/N`: 200 with N bytes (at most 4 MiB) of payload, for throughput benchmarks.
//! - anything else: 200 with a JSON line naming the instance (and header `x-backend`), after the
//!   configured latency; a share `error_rate` of them answers 500 instead.
//!
//! On SIGTERM it fails `/health` at once, keeps serving for `WEB_DRAIN_DELAY`, then closes
//! keep-alive connections cleanly and exits once in-flight requests are done.
//!
//! `web-sample probe` checks this instance's own `/health` (for Docker HEALTHCHECK).
//!
//! Environment: `WEB_LISTEN` (default `0.0.0.0:8000`), `WEB_NAME` (default the hostname),
//! `WEB_VERSION` (default the crate version), `WEB_TASK` (default `$TASK_SLOT`/empty),
//! `WEB_DRAIN_DELAY` seconds (default 2), `WEB_FAULTS` (`on` enables the fault knobs),
//! `WEB_ERROR_RATE` (the `error_rate` knob's value at start, default 0: a bad version to
//! deploy, for canary tests and demos).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;

struct State {
    name: String,
    version: String,
    task: String,
    failing: AtomicBool,
    draining: AtomicBool,
    latency_ms: AtomicU64,
    /// Error rate in millionths.
    error_ppm: AtomicU32,
    served: AtomicU64,
    /// `WEB_FAULTS=on`: the fault knobs answer.
    faults_on: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn main() -> std::process::ExitCode {
    let listen = env("WEB_LISTEN").unwrap_or_else(|| "0.0.0.0:8000".into());
    if std::env::args().nth(1).as_deref() == Some("probe") {
        return probe(&listen);
    }
    let drain: f64 = match env("WEB_DRAIN_DELAY").map(|v| v.parse::<f64>()) {
        None => 2.0,
        Some(Ok(v)) if (0.0..3600.0).contains(&v) => v,
        Some(_) => {
            eprintln!("web-sample: WEB_DRAIN_DELAY must be a number of seconds");
            return std::process::ExitCode::from(2);
        }
    };
    let error_rate = match env("WEB_ERROR_RATE").map(|v| v.parse::<f64>()) {
        None => 0.0,
        Some(Ok(r)) if (0.0..=1.0).contains(&r) => r,
        Some(_) => {
            eprintln!("web-sample: WEB_ERROR_RATE must be a number within 0..=1");
            return std::process::ExitCode::from(2);
        }
    };
    let state = Arc::new(State {
        name: env("WEB_NAME")
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "web-sample".into()),
        version: env("WEB_VERSION").unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()),
        task: env("WEB_TASK").unwrap_or_default(),
        failing: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        latency_ms: AtomicU64::new(0),
        error_ppm: AtomicU32::new((error_rate * 1e6) as u32),
        served: AtomicU64::new(0),
        faults_on: env("WEB_FAULTS").is_some_and(|v| v == "on"),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(listen, Duration::from_secs_f64(drain), state)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("web-sample: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `web-sample probe`: exits 0 when this instance's `/health` answers 200 (the HEALTHCHECK of
/// images built `FROM scratch`).
fn probe(listen: &str) -> std::process::ExitCode {
    let port = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    switchyard_daemon::probe::exit_code(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "/health",
    )
}

async fn run(listen: String, drain: Duration, state: Arc<State>) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("binding {listen}: {e}"))?;
    eprintln!(
        "web-sample {} listening on {}",
        state.name,
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let drain_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain_deadline);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(&state, req).await) }
                });
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move { let _ = conn.await; });
            }
            _ = term.recv(), if !state.draining.load(Ordering::Relaxed) => {
                state.draining.store(true, Ordering::Relaxed);
                eprintln!("web-sample {}: SIGTERM, failing health and draining for {drain:?}", state.name);
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + drain);
            }
            _ = &mut drain_deadline => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    eprintln!(
        "web-sample {}: served {} requests, bye",
        state.name,
        state.served.load(Ordering::Relaxed)
    );
    Ok(())
}

const MAX_PAYLOAD: usize = 8 << 20;

/// N bytes sliced from one shared buffer: the benchmark measures the proxy, not this server.
fn payload(state: &State, n: &str) -> Response<Full<Bytes>> {
    static BUF: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    match n.parse::<usize>() {
        Ok(n) if n <= MAX_PAYLOAD => {
            state.served.fetch_add(1, Ordering::Relaxed);
            let buf = BUF.get_or_init(|| Bytes::from(vec![b'x'; MAX_PAYLOAD]));
            let mut r = Response::new(Full::new(buf.slice(..n)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        _ => text(
            StatusCode::BAD_REQUEST,
            format!("/bytes/N takes a byte count up to {MAX_PAYLOAD}\n"),
        ),
    }
}

async fn answer(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    match (req.method().clone(), path.as_str()) {
        (_, "/health") => {
            if state.failing.load(Ordering::Relaxed) || state.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "failing\n".into())
            } else {
                text(StatusCode::OK, "ok\n".into())
            }
        }
        (_, "/fault") if !state.faults_on => text(
            StatusCode::FORBIDDEN,
            "fault knobs are off (WEB_FAULTS=on enables them)\n".into(),
        ),
        (Method::POST, "/fault") => match set_faults(state, &query) {
            Ok(()) => text(StatusCode::OK, faults(state)),
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (Method::GET, "/fault") => text(StatusCode::OK, faults(state)),
        (Method::GET, p) if p.starts_with("/bytes/") => payload(state, &p["/bytes/".len()..]),
        _ => {
            state.served.fetch_add(1, Ordering::Relaxed);
            // Read (and count) the body so clients can stream uploads through the lb.
            let len = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            let latency = state.latency_ms.load(Ordering::Relaxed);
            if latency > 0 {
                tokio::time::sleep(Duration::from_millis(latency)).await;
            }
            let ppm = state.error_ppm.load(Ordering::Relaxed);
            if ppm > 0 && fastrand::u32(..1_000_000) < ppm {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("injected error from {}\n", state.name),
                );
            }
            let body = format!(
                "{{\"instance\":\"{}\",\"task\":\"{}\",\"version\":\"{}\",\"path\":\"{}\",\"body_bytes\":{len}}}\n",
                state.name, state.task, state.version, path.replace('"', "")
            );
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            if let Ok(v) = header::HeaderValue::from_str(&state.name) {
                r.headers_mut().insert("x-backend", v);
            }
            r
        }
    }
}

fn set_faults(state: &State, query: &str) -> Result<(), String> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "health" => match v {
                "fail" => state.failing.store(true, Ordering::Relaxed),
                "ok" => state.failing.store(false, Ordering::Relaxed),
                _ => return Err("health must be fail or ok".into()),
            },
            "latency_ms" => state.latency_ms.store(
                v.parse().map_err(|_| "latency_ms must be an integer")?,
                Ordering::Relaxed,
            ),
            "error_rate" => {
                let r: f64 = v.parse().map_err(|_| "error_rate must be a number")?;
                if !(0.0..=1.0).contains(&r) {
                    return Err("error_rate must be within 0..=1".into());
                }
                state.error_ppm.store((r * 1e6) as u32, Ordering::Relaxed);
            }
            _ => {
                return Err(format!(
                    "unknown knob {k:?} (health, latency_ms, error_rate)"
                ))
            }
        }
    }
    Ok(())
}

fn faults(state: &State) -> String {
    format!(
        "{{\"health\":\"{}\",\"latency_ms\":{},\"error_rate\":{}}}\n",
        if state.failing.load(Ordering::Relaxed) {
            "fail"
        } else {
            "ok"
        },
        state.latency_ms.load(Ordering::Relaxed),
        f64::from(state.error_ppm.load(Ordering::Relaxed)) / 1e6
    )
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
