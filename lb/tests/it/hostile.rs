//! Hostile and malformed input at the edge, as raw bytes or with real clients that can say what
//! a polite client would not: the lb must route on the name it forwards, refuse what the RFCs
//! call malformed, and never let one request's input change how another is handled.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::balancing::wait_routed;
use crate::support::{proc_stat, Backend, Consul, Http, Lb};

/// One request as raw bytes on a new connection; the answer read to the close.
fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The body of an answer from the test backend's `/headers`, lower-cased.
fn echoed(answer: &str) -> String {
    answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_lowercase()
}

/// A Consul agent, one backend named `web` on route `/`, and an lb with `extra` settings
/// that routes to it.
async fn one_backend(extra: &[(&str, &str)]) -> (Consul, Backend, Lb, Http) {
    let consul = Consul::start().await;
    let backend = Backend::start("web").await;
    consul
        .register("web", "web", backend.port(), &["lb.route=/"])
        .await;
    let lb = Lb::start(&consul, extra).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    (consul, backend, lb, http)
}

/// A public and an internal host on two backends: what the lb routes on must be what the
/// backend is told (Host, X-Forwarded-Host), whatever mix of names the client sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_routed_on_is_the_host_forwarded() {
    let consul = Consul::start().await;
    let public = Backend::start("public").await;
    let admin = Backend::start("admin").await;
    consul
        .register(
            "public",
            "public",
            public.port(),
            &["lb.route=public.example/"],
        )
        .await;
    consul
        .register(
            "admin",
            "admin",
            admin.port(),
            &["lb.route=admin.internal/"],
        )
        .await;
    let lb = Lb::start(&consul, &[("LB_H2C", "true")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "public.example/", 1).await;
    wait_routed(&lb, &http, "admin.internal/", 1).await;

    // Absolute form: the target's authority wins (RFC 9112 3.2.2) and replaces the Host.
    let a = raw(
        lb.proxy,
        "GET http://public.example/headers HTTP/1.1\r\nHost: admin.internal\r\nConnection: close\r\n\r\n",
    );
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert!(a.to_lowercase().contains("x-backend: public"), "{a}");
    let body = echoed(&a);
    assert!(body.contains("host: public.example\n"), "{body}");
    assert!(
        body.contains("x-forwarded-host: public.example\n"),
        "{body}"
    );
    assert!(!body.contains("admin.internal"), "{body}");

    // Two Host fields: 400, and nothing reaches either backend.
    let served = public.served() + admin.served();
    let a = raw(
        lb.proxy,
        "GET /headers HTTP/1.1\r\nHost: public.example\r\nHost: admin.internal\r\nConnection: close\r\n\r\n",
    );
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    assert!(a.contains("more than one Host"), "{a}");
    assert_eq!(public.served() + admin.served(), served);
    // A Host that is no host and port: 400 (RFC 9112 3.2), not a guess at what it names.
    for host in [
        "public.example admin.internal",
        "admin.internal/x",
        "u@public.example",
    ] {
        let a = raw(
            lb.proxy,
            &format!("GET /headers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert!(a.starts_with("HTTP/1.1 400"), "{host}: {a}");
    }
    assert_eq!(public.served() + admin.served(), served);

    // HTTP/2 (prior knowledge): a host field naming another authority is malformed.
    let url = format!("http://127.0.0.1:{}/headers", lb.proxy.port());
    let h2 = |extra: &[&str]| {
        let mut cmd = std::process::Command::new("nghttp");
        cmd.args(["--no-dep", "-v", "-H", ":authority: public.example"]);
        for h in extra {
            cmd.args(["-H", h]);
        }
        let out = cmd.arg(&url).output().expect("nghttp runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mismatch = h2(&["host: admin.internal"]);
    assert!(mismatch.contains(":status: 400"), "{mismatch}");
    assert_eq!(public.served() + admin.served(), served);
    let agree = h2(&["host: public.example"]);
    assert!(agree.contains(":status: 200"), "{agree}");
    assert!(
        agree.contains("x-forwarded-host: public.example"),
        "{agree}"
    );
}

/// An HTTP/2 frame: 9-byte header, then the payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header block of HPACK literals without indexing, so any field can be written.
fn hpack_literals(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127);
        block.extend_from_slice(&[0x00, name.len() as u8]);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// The client preface and an empty SETTINGS frame.
fn h2_preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    out
}

/// How the lb answered one raw HTTP/2 request.
#[derive(Debug, PartialEq)]
enum H2Answer {
    /// A response head; the first byte of its header block (HPACK: `0x88` is `:status: 200`,
    /// `0x8c` is `:status: 400`, both from the static table).
    Head(u8),
    /// RST_STREAM with this error code (1: PROTOCOL_ERROR).
    Reset(u32),
    /// GOAWAY: the connection was refused whole.
    GoAway,
}

/// Sends one request on a new prior-knowledge HTTP/2 connection, its header block written by
/// hand (HPACK literals without indexing), so that fields no polite client would send can be.
fn h2_raw(addr: SocketAddr, fields: &[(&str, &str)]) -> H2Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = h2_preface();
    out.extend(h2_frame(0x1, 0x5, 1, &hpack_literals(fields))); // HEADERS, END_STREAM | END_HEADERS
    s.write_all(&out).unwrap();
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).expect("a frame from the lb");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        s.read_exact(&mut payload).unwrap();
        match (head[3], stream) {
            (0x1, 1) => return H2Answer::Head(payload[0]),
            (0x3, 1) => {
                return H2Answer::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()))
            }
            (0x7, _) => return H2Answer::GoAway,
            (0x4, 0) if head[4] & 1 == 0 => s.write_all(&h2_frame(0x4, 1, 0, &[])).unwrap(),
            _ => {}
        }
    }
}

/// Requests RFC 9113 calls malformed, and CONNECT, never reach a backend: a 400 or a stream
/// error, and the connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http2_requests_and_connect_never_reach_a_backend() {
    let (_consul, backend, lb, _http) = one_backend(&[("LB_H2C", "true")]).await;
    let get = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "a.example"),
        (":path", "/"),
    ];
    assert_eq!(
        h2_raw(lb.proxy, &get),
        H2Answer::Head(0x88),
        "a sane request passes"
    );
    let served = backend.served();

    let refused = |answer: &H2Answer| matches!(answer, H2Answer::Head(0x8c) | H2Answer::Reset(1));
    let connect = h2_raw(lb.proxy, &[(":method", "CONNECT")]);
    assert!(refused(&connect), "CONNECT without :authority: {connect:?}");
    let connect = h2_raw(
        lb.proxy,
        &[(":method", "CONNECT"), (":authority", "admin.internal:22")],
    );
    assert!(refused(&connect), "CONNECT: {connect:?}");
    let mut padded = get.to_vec();
    padded.push(("x-pad", " leading"));
    let answer = h2_raw(lb.proxy, &padded);
    assert!(refused(&answer), "leading whitespace: {answer:?}");
    let mut padded = get.to_vec();
    padded.push(("x-pad", "trailing\t"));
    let answer = h2_raw(lb.proxy, &padded);
    assert!(refused(&answer), "trailing whitespace: {answer:?}");
    let mut hop = get.to_vec();
    hop.push(("connection", "keep-alive"));
    let answer = h2_raw(lb.proxy, &hop);
    assert!(refused(&answer), "a connection-specific field: {answer:?}");
    assert_eq!(
        backend.served(),
        served,
        "a malformed request reached the backend"
    );

    // HTTP/1.1 CONNECT asks for a tunnel the lb does not give.
    let a = raw(
        lb.proxy,
        "CONNECT admin.internal:22 HTTP/1.1\r\nHost: admin.internal:22\r\n\r\n",
    );
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    assert_eq!(backend.served(), served);
}

/// A path that climbs out of its route's prefix (`/api/../admin`, however it is written) is
/// routed by where it lands, which is also the path forwarded; what a backend might still read
/// as a separator after the lb matched is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_cannot_climb_out_of_their_route() {
    let consul = Consul::start().await;
    let api = Backend::start("api").await;
    let admin = Backend::start("admin").await;
    consul
        .register("api", "api", api.port(), &["lb.route=/api"])
        .await;
    consul
        .register("admin", "admin", admin.port(), &["lb.route=/admin"])
        .await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/api", 1).await;
    wait_routed(&lb, &http, "*/admin", 1).await;
    let get = |target: &str| {
        raw(
            lb.proxy,
            &format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .to_lowercase()
    };
    for target in [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/.%2E/admin",
        "/api/./../admin?x=1",
        "/api//..//admin",
        // Nor can a name hide from the route that owns it.
        "/%61dmin",
        "/admin;jsessionid=1/x",
    ] {
        let a = get(target);
        assert!(a.starts_with("http/1.1 200"), "{target}: {a}");
        assert!(a.contains("x-backend: admin"), "{target} reached {a}");
    }
    let api_served = api.served();
    for target in [
        "/api/..;/admin",
        "/api/x%2f..%2f..%2fadmin",
        "/api/x%5c..%5cadmin",
        "/api/..\\admin",
        "/api/x;p=%2f..%2f..%2fadmin",
        "/api/100%",
    ] {
        let a = get(target);
        assert!(a.starts_with("http/1.1 400"), "{target}: {a}");
    }
    assert_eq!(
        api.served(),
        api_served,
        "a refused path reached the api backend"
    );
    let a = get("/api/./users");
    assert!(a.contains("x-backend: api"), "{a}");
}

/// A client that is not a trusted proxy cannot name its own address to the backend: its
/// `X-Forwarded-For` is replaced by its peer address, and its `Forwarded` and `X-Real-IP`
/// do not pass. Over HTTP/1.1 and HTTP/2 alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_clients_cannot_forge_their_address() {
    let consul = Consul::start().await;
    let backend = Backend::start("web").await;
    consul
        .register("web", "web", backend.port(), &["lb.route=/"])
        .await;
    // Trusted: only a network the test client is not in.
    let lb = Lb::start(
        &consul,
        &[("LB_H2C", "true"), ("LB_TRUSTED_PROXIES", "192.0.2.0/24")],
    )
    .await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let forged = "X-Forwarded-For: 198.51.100.1\r\nForwarded: for=198.51.100.1\r\nX-Real-IP: 198.51.100.1\r\n";
    let a = raw(
        lb.proxy,
        &format!("GET /headers HTTP/1.1\r\nHost: x\r\n{forged}Connection: close\r\n\r\n"),
    );
    let body = echoed(&a);
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(
        !body.contains("198.51.100.1"),
        "a forged address passed: {body}"
    );

    // nghttp without -v prints just the response body: the backend's echo of what it got.
    let url = format!("http://127.0.0.1:{}/headers", lb.proxy.port());
    let out = std::process::Command::new("nghttp")
        .args(["--no-dep", "-H", "x-forwarded-for: 198.51.100.1"])
        .args([
            "-H",
            "forwarded: for=198.51.100.1",
            "-H",
            "x-real-ip: 198.51.100.1",
        ])
        .arg(&url)
        .output()
        .expect("nghttp runs");
    let body = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(
        !body.contains("198.51.100.1"),
        "a forged address passed: {body}"
    );
}

/// `LB_BACKEND_MAX_CONNECTIONS` caps what one backend is sent at once: a full backend is
/// passed over for one with room, and when every backend is full the request is shed with a
/// 503 and Retry-After, never reaching a backend and never counted against one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_never_gets_more_than_its_cap() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    for backend in [&a, &b] {
        consul
            .register(&backend.name, "web", backend.port(), &["lb.route=/"])
            .await;
    }
    let lb = Lb::start(&consul, &[("LB_BACKEND_MAX_CONNECTIONS", "2")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 2).await;
    let (a0, b0) = (a.served(), b.served());

    let url = lb.url("/slow?ms=1500");
    let answers = futures_util::future::join_all((0..7).map(|_| http.get(&url))).await;
    let statuses: Vec<_> = answers
        .iter()
        .map(|r| r.as_ref().map(|r| r.status.as_u16()))
        .collect();
    let ok = answers
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    let shed: Vec<_> = answers
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.status == 503)
        .collect();
    assert_eq!(ok, 4, "two per backend: {statuses:?}");
    assert_eq!(shed.len(), 3, "{statuses:?}");
    for r in &shed {
        assert_eq!(r.headers["x-switchyard-error"], "backend_full");
        assert_eq!(r.headers["retry-after"], "1");
    }
    assert_eq!(
        (a.served() - a0, b.served() - b0),
        (2, 2),
        "a backend got more than its cap"
    );
    assert_eq!(
        lb.metric(
            &http,
            "lb_local_responses_total",
            &[("reason", "backend_full")]
        )
        .await,
        Some(3.0)
    );
    assert_eq!(
        lb.metric(&http, "lb_backend_ejections_total", &[]).await,
        Some(0.0)
    );
    // The places come back with the responses.
    let r = http.get(&lb.url("/")).await.unwrap();
    assert_eq!(r.status, 200);
}

/// With `LB_MAX_CONNECTIONS` client connections open, accepting waits (the kernel's backlog
/// holds the next one) instead of failing, and resumes when one ends. Which connection
/// waits is not the last one made: each worker accepts from a listening socket of its own,
/// so connections are not taken in the order they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_limit_holds_accepting_and_releases_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_consul, _backend, lb, http) = one_backend(&[("LB_MAX_CONNECTIONS", "3")]).await;
    // The readiness and routing checks above used connections of their own; let them end.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Four keep-alive connections, each with a request: each one served stays open.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(lb.proxy).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let _ = tx.send((String::from_utf8_lossy(&buf[..n]).into_owned(), s));
        });
    }
    let mut served = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        served.push(answer);
    }
    let heads: Vec<_> = served.iter().map(|(head, _)| head.lines().next()).collect();
    assert_eq!(
        heads,
        [Some("HTTP/1.1 200 OK"); 3],
        "not three connections served under a limit of three"
    );
    assert!(
        lb.metric(&http, "lb_accept_paused_total", &[]).await >= Some(1.0),
        "the pause was not counted"
    );
    // One served connection ends: the one waiting is taken and served.
    drop(served.pop());
    let (head, _) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("served once a connection ended")
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// Out of file descriptors, neither listener spins on its failing accept, and both serve
/// again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_does_not_spin_the_listeners() {
    let (_consul, _backend, lb, http) = one_backend(&[("LB_WORKERS", "1")]).await;
    let pid = lb.pid();
    // The soft limit only: a lowered hard limit could not be raised again without privilege.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();
    let set_soft = |soft: &str| {
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
            .status()
            .expect("prlimit runs");
        assert!(status.success());
    };
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    set_soft(&(open + 8).to_string());

    // More connections than descriptors left, to both listeners.
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(tokio::net::TcpStream::connect(lb.proxy).await.unwrap());
    }
    clients.push(tokio::net::TcpStream::connect(lb.admin).await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = || {
        // utime and stime, in clock ticks (fields 14 and 15 of the whole line).
        let stat = proc_stat(pid);
        stat[11] + stat[12]
    };
    let before = cpu();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks = cpu() - before;
    // 2 s is 200 ticks at 100 Hz; a spinning accept loop takes nearly all of them.
    assert!(
        ticks < 40,
        "the lb used {ticks} ticks of CPU in 2 s while out of descriptors"
    );

    drop(clients);
    set_soft(&soft);
    crate::support::eventually("the lb serves again", Duration::from_secs(10), || async {
        http.get(&lb.url("/"))
            .await
            .is_ok_and(|r| r.status.is_success())
            && http
                .get(&lb.admin_url("/healthz"))
                .await
                .is_ok_and(|r| r.status.is_success())
    })
    .await;
}

/// The number of series `/metrics` exposes.
async fn series(lb: &Lb, http: &Http) -> usize {
    let text = http.get(&lb.admin_url("/metrics")).await.unwrap().body;
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

/// Metric series belong to what Consul holds: routes that come and go, and requests for
/// hosts and paths nobody routes, leave the number of series where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_series_leave_with_their_routes() {
    // Routes go as soon as their instances do (no linger): their series must go with them.
    let (consul, _backend, lb, http) =
        one_backend(&[("LB_EJECT_FAILURES", "100"), ("LB_ROUTE_LINGER", "0s")]).await;
    let _ = http.get(&lb.url("/")).await;
    let baseline = series(&lb, &http).await;

    // 40 services on one instance that closes every connection unanswered: each request to
    // them is an answer of the lb's own (502), counted under its route. (A port held open
    // this way cannot be taken by another test's listener, as a freed one could.)
    let closer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = closer.local_addr().unwrap().port();
    let closing = tokio::spawn(async move {
        while let Ok((stream, _)) = closer.accept().await {
            drop(stream);
        }
    });
    for i in 0..40 {
        let route = format!("lb.route=svc-{i}.example/");
        let (id, tags) = (format!("svc-{i}"), [route.as_str()]);
        // No check: the instance passes, and the lb finds it closing every connection.
        consul.register_with(&id, &id, dead_port, &tags, None).await;
    }
    wait_routed(&lb, &http, "svc-39.example/", 1).await;
    for i in 0..40 {
        let r = http
            .get_host(&lb.url(&format!("/x/{i}")), &format!("svc-{i}.example"))
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 502);
    }
    for i in 0..200 {
        let host = format!("{:x}.random.example", fastrand::u64(..));
        let _ = http.get_host(&lb.url(&format!("/{i}/{host}")), &host).await;
    }
    assert!(series(&lb, &http).await > baseline);
    for i in 0..40 {
        consul.deregister(&format!("svc-{i}")).await;
    }
    crate::support::eventually(
        "the series of the routes that left to go",
        Duration::from_secs(10),
        || async { series(&lb, &http).await <= baseline },
    )
    .await;
    closing.abort();
}

/// An HTTP/2 client that resets its stream (RST_STREAM) while the lb waits for the head
/// leaves nothing counted in flight, with its connection still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_http2_stream_leaves_nothing_in_flight() {
    let (_consul, _backend, lb, http) = one_backend(&[("LB_H2C", "true")]).await;

    let block = hpack_literals(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "a.example"),
        (":path", "/slow?ms=3000"),
    ]);
    let mut s = TcpStream::connect(lb.proxy).unwrap();
    let mut out = h2_preface();
    for stream in [1u32, 3, 5] {
        out.extend(h2_frame(0x1, 0x5, stream, &block));
    }
    s.write_all(&out).unwrap();
    let in_flight = || async { lb.metric(&http, "lb_requests_in_flight", &[]).await };
    crate::support::eventually(
        "three requests in flight",
        Duration::from_secs(2),
        || async { in_flight().await == Some(3.0) },
    )
    .await;
    let mut resets = Vec::new();
    for stream in [1u32, 3, 5] {
        resets.extend(h2_frame(0x3, 0, stream, &8u32.to_be_bytes())); // CANCEL
    }
    s.write_all(&resets).unwrap();
    crate::support::eventually(
        "nothing in flight after the resets",
        Duration::from_secs(2),
        || async { in_flight().await == Some(0.0) },
    )
    .await;
    drop(s);
}

/// Behind an L4 balancer (`LB_PROXY_PROTOCOL`), the client's address comes from the PROXY
/// header, v1 or v2, into `X-Forwarded-For`; a connection without a valid header is refused
/// and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_carries_the_client_address() {
    // The balancer (here the test, on loopback) is a trusted proxy: its headers are believed.
    let (consul, _backend, lb, http) = one_backend(&[
        ("LB_PROXY_PROTOCOL", "true"),
        ("LB_TRUSTED_PROXIES", "127.0.0.0/8"),
    ])
    .await;
    let get = b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let send = |prefix: Vec<u8>| {
        let mut bytes = prefix;
        bytes.extend_from_slice(get);
        let mut s = TcpStream::connect(lb.proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).to_lowercase()
    };
    let v1 = send(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n".to_vec());
    assert!(v1.contains("x-forwarded-for: 203.0.113.7\n"), "{v1}");
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[
        0x21, 0x11, 0, 12, 198, 51, 100, 9, 192, 0, 2, 1, 0x1f, 0x90, 0, 80,
    ]);
    let v2 = send(v2);
    assert!(v2.contains("x-forwarded-for: 198.51.100.9\n"), "{v2}");
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let local = send(local);
    assert!(
        local.contains("x-forwarded-for: 127.0.0.1\n"),
        "LOCAL: {local}"
    );

    for refused in [
        b"PROXY SCTP 1 2 3 4\r\n".to_vec(),
        Vec::new(), // plain HTTP where a header is expected
    ] {
        let answer = send(refused);
        assert!(answer.is_empty(), "served without a valid header: {answer}");
    }
    assert_eq!(
        lb.metric(
            &http,
            "lb_client_connection_errors_total",
            &[("kind", "proxy_header")]
        )
        .await,
        Some(2.0)
    );

    // From a peer that is not a trusted proxy the header is read, but its address is not
    // believed: anyone who reaches the listener could name any address.
    let untrusting = Lb::start(&consul, &[("LB_PROXY_PROTOCOL", "true")]).await;
    wait_routed(&untrusting, &http, "*/", 1).await;
    let mut s = TcpStream::connect(untrusting.proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n")
        .unwrap();
    s.write_all(get).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).to_lowercase();
    assert!(out.contains("x-forwarded-for: 127.0.0.1\n"), "{out}");
}

/// Reads HTTP/2 frames until `wanted` returns true for one (kind, flags, stream, payload);
/// acknowledges the lb's SETTINGS on the way. `false` when the connection ends first.
fn h2_until(s: &mut TcpStream, mut wanted: impl FnMut(u8, u8, u32, &[u8]) -> bool) -> bool {
    loop {
        let mut head = [0u8; 9];
        if s.read_exact(&mut head).is_err() {
            return false;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        if s.read_exact(&mut payload).is_err() {
            return false;
        }
        if wanted(head[3], head[4], stream, &payload) {
            return true;
        }
        if head[3] == 0x4 && stream == 0 && head[4] & 1 == 0 {
            let _ = s.write_all(&h2_frame(0x4, 1, 0, &[]));
        }
    }
}

/// A client that stops reading lets go of its backend: a response that waits on the client
/// for `LB_CLIENT_WRITE_TIMEOUT` ends its connection (HTTP/1.1) or its stream (HTTP/2, whose
/// connection serves on), counted, with nothing left in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_lets_go_of_its_backend() {
    let (_consul, _backend, lb, http) =
        one_backend(&[("LB_H2C", "true"), ("LB_CLIENT_WRITE_TIMEOUT", "1s")]).await;
    let timeouts = || async {
        lb.metric(
            &http,
            "lb_client_connection_errors_total",
            &[("kind", "write_timeout")],
        )
        .await
        .unwrap_or(0.0)
    };
    let in_flight = || async { lb.metric(&http, "lb_requests_in_flight", &[]).await };

    // HTTP/1.1: 64 MiB asked for, more than every socket buffer on the way holds; none read.
    let mut s = TcpStream::connect(lb.proxy).unwrap();
    s.write_all(b"GET /big?kb=65536 HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .unwrap();
    crate::support::eventually(
        "the stalled HTTP/1.1 response timed out",
        Duration::from_secs(20),
        || async { timeouts().await == 1.0 },
    )
    .await;
    crate::support::eventually(
        "nothing in flight after the write timeout",
        Duration::from_secs(2),
        || async { in_flight().await == Some(0.0) },
    )
    .await;
    drop(s);

    // HTTP/2: the client opens no window for its stream (initial window 0) but stays.
    let mut s = TcpStream::connect(lb.proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[0, 0x4, 0, 0, 0, 0])); // SETTINGS_INITIAL_WINDOW_SIZE 0
    let get = |path: &str| {
        hpack_literals(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "a.example"),
            (":path", path),
        ])
    };
    out.extend(h2_frame(0x1, 0x5, 1, &get("/big?kb=64")));
    s.write_all(&out).unwrap();
    let reset = h2_until(&mut s, |kind, _, stream, payload| {
        kind == 0x3 && stream == 1 && payload == 8u32.to_be_bytes() // CANCEL
    });
    assert!(reset, "the stalled stream was not reset");
    assert_eq!(timeouts().await, 2.0);
    crate::support::eventually(
        "nothing in flight after the stream's reset",
        Duration::from_secs(2),
        || async { in_flight().await == Some(0.0) },
    )
    .await;
    // The connection itself was not at fault: it answers the next stream.
    s.write_all(&h2_frame(0x1, 0x5, 3, &get("/"))).unwrap();
    let answered = h2_until(&mut s, |kind, _, stream, payload| {
        kind == 0x1 && stream == 3 && payload[0] == 0x88
    });
    assert!(answered, "the connection did not serve on");
}

/// What the kernel holds of a response for a client that has stopped reading, beyond what is
/// on its way, is bounded by `LB_CLIENT_NOTSENT_LOWAT` (128 KiB by default): the rest waits
/// in the backend's socket. With 0, the system's default, the client's socket takes
/// megabytes. Read with `ss` off the lb's side of the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_has_little_queued_unsent() {
    let (consul, _backend, lb, http) = one_backend(&[]).await;
    let unbounded = Lb::start(&consul, &[("LB_CLIENT_NOTSENT_LOWAT", "0")]).await;
    wait_routed(&unbounded, &http, "*/", 1).await;
    let mut queued = Vec::new();
    for lb in [&lb, &unbounded] {
        let mut s = TcpStream::connect(lb.proxy).unwrap();
        // 16 MiB asked for, far more than any socket buffer on the way holds; none read.
        s.write_all(b"GET /big?kb=16384 HTTP/1.1\r\nHost: a.example\r\n\r\n")
            .unwrap();
        // The queue grows while the lb's writes find room: its largest over two seconds.
        let mut most = 0;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            most = most.max(unsent_to_clients(lb.proxy.port()));
        }
        queued.push(most);
        drop(s);
    }
    println!("unsent for a client that stopped reading, bounded / system default: {queued:?}");
    // The bound, and one piece past it: the kernel checks the bound before each piece of up
    // to 64 KiB (loopback's largest) that it copies.
    assert!(queued[0] <= 128 * 1024 + 64 * 1024, "{queued:?}");
    // What the system's default holds is the host's to say; unbounded unless set.
    let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_notsent_lowat").unwrap();
    if system.trim() == u32::MAX.to_string() {
        assert!(
            queued[1] > 1024 * 1024,
            "the system's default held little: {queued:?}"
        );
    }
}

/// Bytes the sockets of local port `port` hold unsent (`ss`'s `notsent`, which it leaves out
/// when 0), over every established connection.
fn unsent_to_clients(port: u16) -> u64 {
    let out = std::process::Command::new("ss")
        .args([
            "-tniH",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("ss (iproute2) runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("notsent:"))
        .map(|n| n.parse::<u64>().unwrap())
        .sum()
}

/// HTTP/2 has no header timeout of its own: a client that sends only part of the preface, or
/// the preface and no request, is closed at the header timeout; an idle connection is closed
/// at `LB_H2_IDLE_TIMEOUT`, keep-alive pings or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_http2_connections_are_closed() {
    let (_consul, _backend, lb, http) = one_backend(&[
        ("LB_H2C", "true"),
        ("LB_CLIENT_HEADER_TIMEOUT", "1s"),
        ("LB_H2_IDLE_TIMEOUT", "2s"),
    ])
    .await;
    let closed_within = |mut s: TcpStream, secs: u64| {
        s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
        // Frames the lb sends (SETTINGS, GOAWAY, pings) are read past, unanswered: an
        // acknowledgement would complete the partial preface wrongly. The end must come.
        match s.read_to_end(&mut Vec::new()) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    let start = std::time::Instant::now();
    let mut part = TcpStream::connect(lb.proxy).unwrap();
    part.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    let mut silent = TcpStream::connect(lb.proxy).unwrap();
    silent.write_all(&h2_preface()).unwrap();
    let mut idle = TcpStream::connect(lb.proxy).unwrap();
    let mut out = h2_preface();
    out.extend(h2_frame(
        0x1,
        0x5,
        1,
        &hpack_literals(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "a.example"),
            (":path", "/"),
        ]),
    ));
    idle.write_all(&out).unwrap();
    assert!(
        closed_within(part, 8),
        "a partial preface kept its connection"
    );
    assert!(
        closed_within(silent, 8),
        "a preface with no request kept its connection"
    );
    assert!(closed_within(idle, 10), "an idle connection was kept");
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "closed before the idle timeout"
    );
    let header_timeouts = lb
        .metric(
            &http,
            "lb_client_connection_errors_total",
            &[("kind", "header_timeout")],
        )
        .await;
    assert_eq!(header_timeouts, Some(2.0));
}

/// The lb's resident memory, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Clients that read a large response very slowly cost the lb little each: the backend is
/// read in small pieces once a client lags, and what waits for a client in the lb is bounded,
/// while the rest of the response stays in the backend's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_hold_little_in_the_lb() {
    slow_readers(false).await;
}

/// The same over TLS, where the lb sees the client's pace through the TLS layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tls_readers_hold_little_in_the_lb() {
    slow_readers(true).await;
}

async fn slow_readers(tls: bool) {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

    let consul = Consul::start().await;
    let _backend = Backend::start("web").await;
    consul
        .register("web", "web", _backend.port(), &["lb.route=/"])
        .await;
    let ca = crate::tls::Ca::new(if tls { "slow-tls" } else { "slow-plain" });
    let leaf = ca.leaf("a", &["a.example"]);
    let t = crate::tls::start_tls_lb(&consul, &leaf.source(), &[]).await;
    let (lb, tls_port) = (t.lb, t.tls_port);
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let addr: SocketAddr = if tls {
        ([127, 0, 0, 1], tls_port).into()
    } else {
        lb.proxy
    };
    let connector = ca.client();
    // Warm up: the first large response, read at once, sizes the allocator's arenas.
    let r = http.get(&lb.url("/big?kb=4096")).await.unwrap();
    assert_eq!(r.body.len(), 4096 * 1024);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(lb.pid());
    const READERS: u64 = 24;
    let mut readers: Vec<Box<dyn Stream>> = Vec::new();
    for _ in 0..READERS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // A small receive window, set before connecting so the handshake offers it.
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let mut s: Box<dyn Stream> = if tls {
            let name = rustls::pki_types::ServerName::try_from("a.example").unwrap();
            Box::new(connector.connect(name, tcp).await.unwrap())
        } else {
            Box::new(tcp)
        };
        s.write_all(b"GET /big?kb=4096 HTTP/1.1\r\nHost: a.example\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 1024];
        let _ = s.read(&mut first).await.unwrap();
        readers.push(s);
    }
    // Every reader's response has filled what the kernel takes by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = rss_kib(lb.pid()).saturating_sub(before);
    println!("{READERS} slow readers (tls: {tls}): {held} KiB held in the lb");
    drop(readers);
    // A TLS connection also keeps its session and record buffers (tens of KiB); before the
    // lb watched a TLS client's pace, each held about 580 KiB.
    let each = if tls { 256 } else { 160 };
    assert!(
        held < READERS * each,
        "{READERS} slow readers (tls: {tls}) hold {held} KiB in the lb ({} KiB each)",
        held / READERS
    );
}
