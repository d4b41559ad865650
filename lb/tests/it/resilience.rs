//! Failure handling on the request path: dead backends, malformed clients, shutdown.

use std::io::{Read, Write};
use std::time::Duration;

use http::StatusCode;

use crate::balancing::wait_routed;
use crate::support::{
    catalog_write, eventually, spread, spread_ok, Backend, CatalogInstance, Consul, Http, Lb,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_costs_no_failed_get_and_is_ejected_then_returns() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    // No Consul check: only passive health can notice the dead backend.
    for x in [&a, &b, &c] {
        consul
            .register_with(&x.name, "web", x.port(), &["lb.route=/"], None)
            .await;
    }
    let lb = Lb::start(
        &consul,
        &[("LB_EJECT_BASE", "1s"), ("LB_BALANCE", "round_robin")],
    )
    .await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 3).await;
    // Warm the pools so the kill also breaks pooled connections.
    spread_ok(&http, &lb.url("/"), 30).await;

    let addr = b.addr;
    b.kill();
    let seen = spread_ok(&http, &lb.url("/"), 200).await;
    assert_eq!(seen.get("b"), None);
    assert_eq!(
        seen.values().sum::<usize>(),
        200,
        "every GET succeeded: {seen:?}"
    );
    assert!(
        lb.metric(&http, "lb_backend_ejections_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
    assert!(lb.metric(&http, "lb_retries_total", &[]).await.unwrap() >= 1.0);
    let routes = lb.routes(&http).await;
    let states: Vec<String> = routes["routes"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{}={}",
                b["addr"].as_str().unwrap(),
                b["state"].as_str().unwrap()
            )
        })
        .collect();
    assert!(states.contains(&format!("{addr}=ejected")), "{states:?}");

    // Back on the same address: put back on its own once the ejection runs out.
    let _b2 = Backend::start_on("b-again", addr).await;
    eventually(
        "the revived backend to get traffic again",
        Duration::from_secs(15),
        || async {
            spread(&http, &lb.url("/"), 10)
                .await
                .contains_key("b-again")
        },
    )
    .await;
}

/// Drops every packet sent to a loopback port while it lives: a host that died or was cut
/// off, which answers nothing, not even a reset.
struct Blackhole(Vec<String>);

impl Blackhole {
    fn port(port: u16) -> Blackhole {
        let rule: Vec<String> = [
            "INPUT",
            "-i",
            "lo",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["-j", "DROP"].map(String::from))
        .collect();
        let status = std::process::Command::new("iptables")
            .args(["-w", "-I"])
            .args(&rule)
            .status()
            .expect("iptables (scripts/install-deps installs it with Docker)");
        assert!(status.success(), "iptables -I {rule:?}");
        Blackhole(rule)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables")
            .args(["-w", "-D"])
            .args(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_host_goes_silent_is_ejected_and_gets_are_retried() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    for x in [&a, &b] {
        consul
            .register_with(&x.name, "web", x.port(), &["lb.route=/"], None)
            .await;
    }
    a_silent_host_costs_no_get(&consul, b.port()).await;
}

/// The same over HTTP/2 to the backends: one shared connection each, whose I/O errors the
/// HTTP/2 stack reports by kind only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_backend_whose_host_goes_silent_is_ejected_and_gets_are_retried() {
    let consul = Consul::start().await;
    let (a, _a) = h2c_backend("a").await;
    let (b, _b) = h2c_backend("b").await;
    for (name, addr) in [("a", a), ("b", b)] {
        consul
            .register_with(
                name,
                "web",
                addr.port(),
                &["lb.route=/", "lb.proto=h2c"],
                None,
            )
            .await;
    }
    a_silent_host_costs_no_get(&consul, b.port()).await;
}

/// An HTTP/2 backend without TLS that names itself in `x-backend`.
async fn h2c_backend(name: &'static str) -> (std::net::SocketAddr, AbortOnDrop) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("x-backend", name)
                            .body(http_body_util::Full::new(bytes::Bytes::from(name)))
                            .unwrap(),
                    )
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    (addr, AbortOnDrop(task))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Routes `/` to backends `a` and `b` (registered by the caller) through an lb, then makes
/// b's host silent: every GET must still be answered, by a, long before the response timeout,
/// because b's connections are dropped once what was sent goes unacknowledged.
async fn a_silent_host_costs_no_get(consul: &Consul, b_port: u16) {
    // A response timeout far past the client's patience: only the unacknowledged send can
    // tell the lb in time that b's host is gone.
    let lb = Lb::start(
        consul,
        &[
            ("LB_BALANCE", "round_robin"),
            ("LB_UPSTREAM_USER_TIMEOUT", "500ms"),
            ("LB_CONNECT_TIMEOUT", "500ms"),
            ("LB_RESPONSE_TIMEOUT", "120s"),
        ],
    )
    .await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 2).await;
    // Connections to both: the next GET to b goes out on one of them.
    spread_ok(&http, &lb.url("/"), 20).await;

    let _silent = Blackhole::port(b_port);
    let seen = tokio::time::timeout(Duration::from_secs(30), spread_ok(&http, &lb.url("/"), 20))
        .await
        .expect("GETs answered while b's host is silent");
    assert_eq!(seen.get("a"), Some(&20), "{seen:?}");
    let unacked = [("kind", "unacknowledged")];
    assert!(
        lb.metric(&http, "lb_upstream_errors_total", &unacked)
            .await
            .unwrap()
            >= 1.0
    );
    let timeouts = [("kind", "response_timeout")];
    assert_eq!(
        lb.metric(&http, "lb_upstream_errors_total", &timeouts)
            .await,
        Some(0.0)
    );
    assert!(
        lb.metric(&http, "lb_backend_ejections_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
}

/// A request pays for one silent host at most: once an attempt finds its backend's host
/// silent, the retry goes to an instance on another Consul node, not to the silent node's
/// other instances, which share its fate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_silent_host_goes_to_another_node() {
    let consul = Consul::start().await;
    let live = Backend::start("live").await;
    let dead = [
        Backend::start("d1").await,
        Backend::start("d2").await,
        Backend::start("d3").await,
    ];
    let on = |node: &str, b: &Backend| CatalogInstance {
        node: node.to_string(),
        id: b.name.clone(),
        service: "web".to_string(),
        tags: vec!["lb.route=/".to_string()],
        port: b.port(),
        check: None,
    };
    let mut instances = vec![on("node-live", &live)];
    instances.extend(dead.iter().map(|b| on("node-dead", b)));
    catalog_write(&consul, &instances).await;
    // Round robin and one retry: a retry that stayed on the silent node would pick another
    // of its instances, whatever the order of the four, and its GET would fail.
    let lb = Lb::start(
        &consul,
        &[
            ("LB_BALANCE", "round_robin"),
            ("LB_RETRIES", "1"),
            ("LB_UPSTREAM_USER_TIMEOUT", "500ms"),
            ("LB_CONNECT_TIMEOUT", "500ms"),
            ("LB_RESPONSE_TIMEOUT", "120s"),
            ("LB_EJECT_BASE", "60s"),
        ],
    )
    .await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 4).await;
    let routes = lb.routes(&http).await;
    let nodes: Vec<(&str, &str)> = routes["routes"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["instance"].as_str().unwrap(), b["node"].as_str().unwrap()))
        .collect();
    assert!(nodes.contains(&("d1", "node-dead")), "{nodes:?}");
    assert!(nodes.contains(&("live", "node-live")), "{nodes:?}");
    spread_ok(&http, &lb.url("/"), 20).await;

    let _silent: Vec<Blackhole> = dead.iter().map(|b| Blackhole::port(b.port())).collect();
    let seen = tokio::time::timeout(Duration::from_secs(60), spread(&http, &lb.url("/"), 12))
        .await
        .expect("GETs answered while node-dead is silent");
    assert_eq!(seen.get("live"), Some(&12), "{seen:?}");
    // Each silent instance cost one attempt, then was ejected.
    let mut silent = 0.0;
    for kind in ["unacknowledged", "connect_timeout"] {
        silent += lb
            .metric(&http, "lb_upstream_errors_total", &[("kind", kind)])
            .await
            .unwrap_or(0.0);
    }
    assert_eq!(silent, 3.0);
}

/// A backend on 127.0.0.1 that reads a request head, waits `pause`, then reads a body of
/// `body` bytes `chunk` at a time with `gap` between reads, and answers 200: an upload sink
/// as slow as asked. Returns its port.
fn upload_sink(body: usize, pause: Duration, chunk: usize, gap: Duration) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; chunk.max(64 << 10)];
                let mut got = Vec::new();
                let head_end = loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                std::thread::sleep(pause);
                let mut read = got.len() - head_end;
                while read < body {
                    match s.read(&mut buf[..chunk]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read += n,
                    }
                    std::thread::sleep(gap);
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-backend: sink\r\n\r\nok",
                );
            });
        }
    });
    port
}

/// Sends a POST of `body` bytes through an lb routing `/` to the sink on `port` alone.
async fn upload(
    port: u16,
    body: usize,
    env: &[(&str, &str)],
) -> (Consul, Lb, Http, StatusCode, String) {
    let consul = Consul::start().await;
    consul
        .register_with("sink", "web", port, &["lb.route=/"], None)
        .await;
    let lb = Lb::start(&consul, env).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let req = http::Request::post(lb.url("/upload"))
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            b'x';
            body
        ])))
        .unwrap();
    let r = http.send(req).await.unwrap();
    (consul, lb, http, r.status, r.body)
}

/// A backend that stops reading an upload for a while keeps a live host: it still answers
/// the kernel's window probes. The user timeout, which the kernel also applies to a window
/// held shut (Linux 5.11 and later; earlier kernels pass this test either way), must not
/// take it for dead and cut the upload off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_pauses_reading_an_upload_is_not_taken_for_dead() {
    const BODY: usize = 24 << 20;
    // The head, then 2 s without reading: the window shuts long before.
    let port = upload_sink(BODY, Duration::from_secs(2), 64 << 10, Duration::ZERO);
    let env = [
        ("LB_UPSTREAM_USER_TIMEOUT", "300ms"),
        ("LB_RESPONSE_TIMEOUT", "30s"),
    ];
    let (_consul, lb, http, status, body) = upload(port, BODY, &env).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let unacked = [("kind", "unacknowledged")];
    assert_eq!(
        lb.metric(&http, "lb_upstream_errors_total", &unacked).await,
        Some(0.0)
    );
}

/// An upload longer than the response timeout to a backend that keeps reading it, more
/// slowly than the client sends, is not a backend holding the exchange up: each part it
/// takes restarts the timeout. That includes the last megabytes, which wait in the lb's
/// send buffer (up to 4 MiB as the kernel grows it) after the lb has written them: at this
/// rate they take the backend well over the timeout to take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_a_backend_keeps_taking_outlasts_the_response_timeout() {
    const BODY: usize = 12 << 20;
    // 128 KiB every 50 ms: about 5 s for the body, against a 1 s response timeout.
    let port = upload_sink(BODY, Duration::ZERO, 128 << 10, Duration::from_millis(50));
    upload_within_a_1s_response_timeout(port, BODY, StatusCode::OK, 0.0).await;
}

/// A backend that stops taking a large upload altogether is holding the exchange up: once
/// its send queue stops shrinking, the response timeout runs out (a 504, counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_a_backend_stops_taking_ends_at_the_response_timeout() {
    const BODY: usize = 16 << 20;
    // The head, then no read for longer than the test.
    let port = upload_sink(BODY, Duration::from_secs(120), 64 << 10, Duration::ZERO);
    upload_within_a_1s_response_timeout(port, BODY, StatusCode::GATEWAY_TIMEOUT, 1.0).await;
}

/// Uploads `body` bytes to the sink on `port` through an lb with a 1 s response timeout, and
/// checks the answer and how many response timeouts the lb counted.
async fn upload_within_a_1s_response_timeout(
    port: u16,
    body: usize,
    want: StatusCode,
    timeouts: f64,
) {
    let (_consul, lb, http, status, text) =
        upload(port, body, &[("LB_RESPONSE_TIMEOUT", "1s")]).await;
    assert_eq!(status, want, "{text}");
    let kind = [("kind", "response_timeout")];
    assert_eq!(
        lb.metric(&http, "lb_upstream_errors_total", &kind).await,
        Some(timeouts)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_backend_is_never_ejected_out_of_service() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    consul
        .register_with("a", "web", a.port(), &["lb.route=/"], None)
        .await;
    let dead_port = crate::support::free_port();
    consul
        .register_with("dead", "web", dead_port, &["lb.route=/"], None)
        .await;
    let lb = Lb::start(&consul, &[("LB_EJECT_BASE", "60s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 2).await;
    spread_ok(&http, &lb.url("/"), 20).await;
    // Now `a` dies too: both are ejected, and requests still try them rather than failing fast
    // with "no backend"; once `a` is back it serves at once, without waiting out 60 s.
    let addr = a.addr;
    a.kill();
    for _ in 0..5 {
        let r = http.get(&lb.url("/")).await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }
    let _a2 = Backend::start_on("a-again", addr).await;
    let r = http.get(&lb.url("/")).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Ignore write errors: the lb may answer and close before it read everything.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_and_the_lb_lives_on() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let proxy = lb.proxy;

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"\x00\x01GARBAGE\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "bad version",
            b"GET / HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
            "HTTP/1.1 ",
        ),
        (
            "no host",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            "huge head",
            {
                let mut v = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
                v.extend(std::iter::repeat_n(b'a', 70_000));
                v.extend(b"\r\n\r\n");
                v
            },
            "HTTP/1.1 431",
        ),
        (
            "too many headers",
            {
                let mut v = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
                for i in 0..150 {
                    v.extend(format!("X-H{i}: v\r\n").as_bytes());
                }
                v.extend(b"\r\n");
                v
            },
            "HTTP/1.1 431",
        ),
        (
            "bad content-length",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
    ];
    for (what, req, want) in cases {
        let reply = tokio::task::spawn_blocking(move || raw_exchange(proxy, &req))
            .await
            .unwrap();
        assert!(
            reply.starts_with(want),
            "{what}: got {:?}",
            &reply[..reply.len().min(80)]
        );
        if want != "HTTP/1.1 " {
            let code: u16 = want[9..].parse().unwrap();
            assert!((400..500).contains(&code));
        }
        // Still alive and serving.
        assert_eq!(
            http.get(&lb.url("/")).await.unwrap().status,
            StatusCode::OK,
            "after {what}"
        );
    }
    let errors = lb
        .metric(&http, "lb_client_connection_errors_total", &[])
        .await
        .unwrap_or(0.0);
    let local = lb
        .metric(
            &http,
            "lb_local_responses_total",
            &[("reason", "bad_request")],
        )
        .await
        .unwrap_or(0.0);
    assert!(errors + local >= 5.0, "errors={errors} local={local}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_hop_by_hop() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    // The test client is a trusted proxy here: its X-Forwarded-For is appended to.
    let lb = Lb::start(&consul, &[("LB_TRUSTED_PROXIES", "127.0.0.0/8")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let req = http::Request::get(lb.url("/headers"))
        .header("host", "shop.example.com")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        // A second Connection line counts as much as the first (RFC 9110 5.3).
        .header("connection", "x-second")
        .header("x-second", "secret")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-for", "198.51.100.7")
        .header("x-forwarded-proto", "forged")
        .header("x-forwarded-host", "forged")
        .body(Default::default())
        .unwrap();
    let r = http.send(req).await.unwrap();
    let seen = r.body.to_lowercase();
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.9, 198.51.100.7, 127.0.0.1"),
        "{seen}"
    );
    assert!(
        !seen.contains("forged"),
        "a client's forwarding field passed: {seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http"), "{seen}");
    assert!(
        seen.contains("x-forwarded-host: shop.example.com"),
        "{seen}"
    );
    assert!(seen.contains("host: shop.example.com"), "{seen}");
    assert!(
        !seen.contains("x-hop"),
        "a header named by Connection was forwarded: {seen}"
    );
    assert!(
        !seen.contains("x-second"),
        "a header named by a second Connection line was forwarded: {seen}"
    );
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert!(seen.contains(&format!("x-request-id: {id}")), "{seen}");

    let req = http::Request::get(lb.url("/"))
        .header("x-request-id", "trace-123")
        .body(Default::default())
        .unwrap();
    assert_eq!(
        http.send(req).await.unwrap().headers["x-request-id"],
        "trace-123"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_not_retried_once_it_may_have_reached_a_backend() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    consul
        .register_with("a", "web", a.port(), &["lb.route=/"], None)
        .await;
    let lb = Lb::start(&consul, &[("LB_RESPONSE_TIMEOUT", "300ms")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    // POST to a slow path: the response timeout fires after the request was sent.
    let req = http::Request::post(lb.url("/slow?ms=2000"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"pay")))
        .unwrap();
    let r = http.send(req).await.unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    // Every retry reason's series starts at zero.
    assert_eq!(
        lb.metric(&http, "lb_retries_total", &[]).await,
        Some(0.0),
        "a POST was retried"
    );
    // A body is streamed through whole.
    let r = http.post(&lb.url("/"), b"hello world").await.unwrap();
    assert_eq!(r.body, "a len=11");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    let mut lb = Lb::start(&consul, &[("LB_DRAIN_DELAY", "700ms")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;

    let slow = {
        let (http, url) = (http.clone(), lb.url("/slow?ms=2000"));
        tokio::spawn(async move { http.get(&url).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    lb.signal(libc::SIGTERM);
    eventually(
        "readiness to turn false",
        Duration::from_secs(2),
        || async {
            http.get(&lb.admin_url("/readyz"))
                .await
                .is_ok_and(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        },
    )
    .await;
    // Within the drain delay new requests are still served.
    assert_eq!(
        Http::new().get(&lb.url("/")).await.unwrap().status,
        StatusCode::OK
    );
    let r = slow
        .await
        .unwrap()
        .expect("the in-flight request completed");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "a");
    assert_eq!(
        lb.wait_exit(Duration::from_secs(10)).await,
        Some(0),
        "clean exit"
    );
    assert!(
        std::net::TcpStream::connect(lb.proxy).is_err(),
        "listener closed after exit"
    );
}
