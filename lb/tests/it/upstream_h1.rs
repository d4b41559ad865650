//! The lb's own HTTP/1.1 client against a backend that answers byte for byte as scripted:
//! every way RFC 9112 delimits a response, interim responses, responses the lb must refuse,
//! request bodies of unknown length, and reuse of the connection only when that is safe; and
//! large bodies spliced through pipes, for which clients, and within the pipe budget.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::TcpListener;

use crate::balancing::wait_routed;
use crate::support::{eventually, proc_stat, Backend, Consul, Http, Lb};

/// What the scripted backend answers for a request path, and whether it closes afterwards.
fn script(method: &str, path: &str, body: &[u8]) -> (Vec<u8>, bool) {
    let fixed = |s: &str| (s.as_bytes().to_vec(), false);
    match path {
        "/chunked" => fixed(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n\
             5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        ),
        // Both framings at once (RFC 9112 6.3): the coding is the one that holds.
        "/length-and-chunked" => fixed(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        ),
        // Chunked with a declared trailer.
        "/declared-trailer" => fixed(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
             5\r\nhello\r\n0\r\nX-Checksum: c0ffee\r\n\r\n",
        ),
        "/interim" => fixed(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nfinally",
        ),
        "/to-close" => (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close".to_vec(),
            true,
        ),
        "/http10" => (
            b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nold ok".to_vec(),
            true,
        ),
        "/cut" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this".to_vec(),
            true,
        ),
        "/garbage" => (b"SMTP ready\r\n\r\n".to_vec(), true),
        "/conflict" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
            true,
        ),
        "/huge-head" => {
            let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..2000 {
                r.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "f".repeat(40)).as_bytes());
            }
            r.extend_from_slice(b"Content-Length: 0\r\n\r\n");
            (r, true)
        }
        "/echo" => {
            let mut r =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            r.extend_from_slice(body);
            (r, false)
        }
        // N bytes of a pattern that no block of them repeats at a page's offset.
        p if p.starts_with("/pattern/") => {
            let n: usize = p["/pattern/".len()..].parse().unwrap();
            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").into_bytes();
            if method != "HEAD" {
                r.extend_from_slice(&pattern(n));
            }
            (r, false)
        }
        // The first half of such a body, then the close.
        p if p.starts_with("/pattern-cut/") => {
            let n: usize = p["/pattern-cut/".len()..].parse().unwrap();
            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").into_bytes();
            r.extend_from_slice(&pattern(n / 2));
            (r, true)
        }
        _ if method == "HEAD" => fixed("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        "/no-content" => fixed("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
        _ => fixed("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain"),
    }
}

/// `n` bytes that differ from their neighbours' and from any page-sized shift of themselves.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A backend that parses just enough of each request (head, Content-Length or chunked body,
/// kept raw) and answers from `script`. Counts the connections it accepted.
async fn scripted_backend() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = TokioBufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut words = line.split_whitespace();
                    let method = words.next().unwrap_or("").to_string();
                    let path = words.next().unwrap_or("").to_string();
                    let (mut length, mut chunked) = (0usize, false);
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).await.unwrap();
                        if h == "\r\n" {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        if k.eq_ignore_ascii_case("content-length") {
                            length = v.trim().parse().unwrap();
                        }
                        if k.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = v.trim().eq_ignore_ascii_case("chunked");
                        }
                    }
                    let mut body = vec![0; length];
                    // A request whose body never came whole (the lb gave up on its client).
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if chunked {
                        // Kept raw, framing and all: the test checks the lb's chunked coding.
                        while !body.ends_with(b"0\r\n\r\n") {
                            let mut l = Vec::new();
                            r.read_until(b'\n', &mut l).await.unwrap();
                            body.extend_from_slice(&l);
                        }
                    }
                    let (answer, close) = script(&method, &path, &body);
                    if w.write_all(&answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (port, accepted)
}

/// A Consul agent, the scripted backend on route `/`, and an lb with `extra` settings that
/// routes to it; with the count of connections the backend accepted.
async fn scripted_lb(extra: &[(&str, &str)]) -> (Consul, Arc<AtomicUsize>, Lb, Http) {
    let consul = Consul::start().await;
    let (port, accepted) = scripted_backend().await;
    consul.register("s", "web", port, &["lb.route=/"]).await;
    let lb = Lb::start(&consul, extra).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    (consul, accepted, lb, http)
}

/// One raw exchange with the lb on a new connection: the whole response as text, read to
/// the close (the request asks for one).
fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = BufReader::new(s).read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_read_as_rfc_9112_frames_them() {
    let consul = Consul::start().await;
    let (port, accepted) = scripted_backend().await;
    consul.register("s", "web", port, &["lb.route=/"]).await;
    // A response timeout far past the test's patience: an exchange that waits for it fails.
    // One worker: each worker pools its own backend connections, and the raw exchanges
    // below come on connections of their own, which another worker could take.
    let lb = Lb::start(
        &consul,
        &[("LB_RESPONSE_TIMEOUT", "10m"), ("LB_WORKERS", "1")],
    )
    .await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;

    // Content-Length, keep-alive: every one of these rides the same backend connection.
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..5 {
        let r = http.get(&lb.url("/plain")).await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "plain"));
    }
    // HEAD: a Content-Length and no body; 204: no body. The connection stays usable.
    let head = raw(
        lb.proxy,
        "HEAD /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("content-length: 5"), "{head}");
    assert!(
        head.ends_with("\r\n\r\n"),
        "a HEAD response carried a body: {head}"
    );
    let r = http.get(&lb.url("/no-content")).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::NO_CONTENT, ""));
    let r = http.get(&lb.url("/plain")).await.unwrap();
    assert_eq!(r.body, "plain");
    assert_eq!(
        accepted.load(Ordering::SeqCst) - before,
        1,
        "delimited responses did not reuse the backend connection"
    );

    // Chunked, with an extension and a trailer; the client gets it chunked, trailer dropped
    // (it did not ask for trailers).
    let r = http.get(&lb.url("/chunked")).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "hello world"));
    assert_eq!(r.headers["x-kind"], "chunked");
    let chunked = raw(
        lb.proxy,
        "GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        chunked
            .to_lowercase()
            .contains("transfer-encoding: chunked"),
        "{chunked}"
    );
    // Interim responses are skipped, also when they arrive in one read with the final head
    // (which once waited for the next byte, or the response timeout, before it was parsed).
    let r = tokio::time::timeout(Duration::from_secs(20), http.get(&lb.url("/interim")))
        .await
        .expect("the final head after interim ones in the same read was left waiting")
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "finally"));
    // No length: the body runs to the close; an HTTP/1.0 response without keep-alive.
    let r = http.get(&lb.url("/to-close")).await.unwrap();
    assert_eq!(r.body, "until the close");
    let r = http.get(&lb.url("/http10")).await.unwrap();
    assert_eq!(r.body, "old ok");
    // Neither of those connections could be reused, and neither was.
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            http.get(&lb.url("/to-close")).await.unwrap().body,
            "until the close"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst) - before, 3);

    // Nothing of these is counted as a failure of the backend.
    assert_eq!(
        lb.metric(&http, "lb_upstream_errors_total", &[("kind", "reset")])
            .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_responses_become_502s_and_cut_bodies_cut_the_client_off() {
    let consul = Consul::start().await;
    let (port, _) = scripted_backend().await;
    consul.register("s", "web", port, &["lb.route=/"]).await;
    // No retry: each bad answer is seen once.
    let lb = Lb::start(&consul, &[("LB_RETRIES", "0")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;

    for path in ["/garbage", "/conflict", "/huge-head"] {
        let r = http.get(&lb.url(path)).await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}: {}", r.body);
        assert_eq!(r.headers["x-switchyard-error"], "upstream_error", "{path}");
    }
    assert_eq!(
        lb.metric(&http, "lb_upstream_errors_total", &[("kind", "reset")])
            .await,
        Some(3.0)
    );
    // A body shorter than its Content-Length: the head may have gone out already, so the
    // client's connection is cut (at once, not after a timeout) rather than the response
    // completed with a lie.
    let started = std::time::Instant::now();
    let cut = raw(lb.proxy, "GET /cut HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(started.elapsed() < Duration::from_secs(5), "{cut}");
    assert!(
        !cut.contains("\r\n\r\n") || cut.split("\r\n\r\n").nth(1).unwrap().len() < 100,
        "{cut}"
    );
    assert_eq!(
        lb.metric(&http, "lb_upstream_errors_total", &[("kind", "body")])
            .await,
        Some(1.0)
    );
    // The lb lives on and the backend is still used.
    assert_eq!(http.get(&lb.url("/plain")).await.unwrap().body, "plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_of_unknown_length_go_chunked() {
    let consul = Consul::start().await;
    let (port, _) = scripted_backend().await;
    consul.register("s", "web", port, &["lb.route=/"]).await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;

    // A chunked upload, sent in two pieces: the backend receives valid chunked coding of
    // the same bytes.
    let addr = lb.proxy;
    let got = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nabcd\r\n",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(b"3\r\nefg\r\n0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = BufReader::new(s).read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    let body = got.split("\r\n\r\n").nth(1).unwrap_or("");
    let decoded: String = body
        .split("\r\n")
        .collect::<Vec<_>>()
        .chunks(2)
        .filter_map(|c| {
            let size = usize::from_str_radix(c[0], 16).ok()?;
            Some(c.get(1)?.get(..size)?.to_string())
        })
        .collect();
    assert_eq!(decoded, "abcdefg", "backend saw: {body:?}");
    // A body of known length goes with Content-Length, whole.
    let r = http.post(&lb.url("/echo"), b"0123456789").await.unwrap();
    assert_eq!(r.body, "0123456789");

    // An upload that stops short of its length is the client's failure, not the backend's:
    // answered (if the client still listens) as a bad request, never counted as a reset.
    let cut = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b")
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        let _ = BufReader::new(s).read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(!cut.contains("502"), "{cut}");
    assert_eq!(
        lb.metric(&http, "lb_upstream_errors_total", &[("kind", "reset")])
            .await,
        Some(0.0)
    );
    assert_eq!(
        lb.metric(
            &http,
            "lb_local_responses_total",
            &[("reason", "bad_request")]
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_beside_a_chunked_coding_is_removed_not_obeyed() {
    // One worker, so one pool: each worker keeps its own.
    let (_consul, accepted, lb, http) = scripted_lb(&[("LB_WORKERS", "1")]).await;

    // The whole body, by its chunks; the contradicting length never reaches the client.
    let r = http.get(&lb.url("/length-and-chunked")).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "hello world"));
    let raw_answer = raw(
        lb.proxy,
        "GET /length-and-chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let lower = raw_answer.to_lowercase();
    assert!(!lower.contains("content-length: 3"), "{raw_answer}");
    assert!(
        lower.contains("hello") && lower.contains(" world"),
        "{raw_answer}"
    );
    // Such a connection is not trusted with another request.
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..2 {
        let r = http.get(&lb.url("/length-and-chunked")).await.unwrap();
        assert_eq!(r.body, "hello world");
    }
    assert_eq!(accepted.load(Ordering::SeqCst) - before, 2);
}

/// Trailers of a chunked response reach an HTTP/1.1 client that asked for them (`TE:
/// trailers`) when the backend declares them (`Trailer`), as RFC 9110 6.5 lets a proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_trailers_reach_http1_clients_that_ask_for_them() {
    let (_consul, _, lb, _http) = scripted_lb(&[]).await;

    let asked = raw(
        lb.proxy,
        "GET /declared-trailer HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .to_lowercase();
    assert!(asked.contains("trailer: x-checksum"), "{asked}");
    let (_, body) = asked.split_once("\r\n\r\n").unwrap();
    assert!(body.contains("hello"), "{asked}");
    assert!(body.contains("0\r\nx-checksum: c0ffee\r\n"), "{asked}");
    // A client that did not ask gets the body without them.
    let plain = raw(
        lb.proxy,
        "GET /declared-trailer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .to_lowercase();
    assert!(
        plain.contains("hello") && !plain.contains("c0ffee"),
        "{plain}"
    );
}

/// A backend whose keep-alive timeout is `idle` (uvicorn and Node close after about 5 s), as
/// a proxy meets it at its worst: a request on a connection idle that long finds it closing,
/// and gets no answer (the close and the request crossed). `/slow` answers after 300 ms.
async fn closing_backend(idle: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = TokioBufReader::new(r);
                let mut last = std::time::Instant::now();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 || last.elapsed() >= idle {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    if line.contains("/slow") {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if w.write_all(ok).await.is_err() {
                        return;
                    }
                    last = std::time::Instant::now();
                }
            });
        }
    });
    port
}

/// Under a paced load, the pool hands out its most recently used connection: the oldest ones
/// are the ones a backend's short keep-alive timeout closes, and reusing them means a stale
/// connection to retry or a new one to open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_reuses_its_freshest_connection() {
    let consul = Consul::start().await;
    let port = closing_backend(Duration::from_secs(2)).await;
    consul.register("s", "web", port, &["lb.route=/"]).await;
    // One worker, so one pool: each worker keeps its own.
    let lb = Lb::start(&consul, &[("LB_WORKERS", "1")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;

    // Four connections into the pool at once.
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let (http, url) = (http.clone(), lb.url("/slow"));
            tokio::spawn(async move { http.get(&url).await.unwrap().status })
        })
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap(), StatusCode::OK);
    }
    let before = churn(&lb, &http).await;
    // One request every 700 ms for 7 s: the freshest connection is never 2 s idle.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = http.get(&lb.url("/")).await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "ok"));
    }
    let after = churn(&lb, &http).await;
    assert_eq!(
        after - before,
        0.0,
        "stale or new upstream connections under a paced load"
    );
}

/// Pooled connections found closing (stale, or reset under a request) plus upstream
/// connections opened, so far.
async fn churn(lb: &Lb, http: &Http) -> f64 {
    let mut total = 0.0;
    for kind in ["stale_connection", "reset"] {
        let labels = [("kind", kind)];
        total += lb
            .metric(http, "lb_upstream_errors_total", &labels)
            .await
            .unwrap_or(0.0);
    }
    let opened = lb
        .metric(http, "lb_upstream_connections_total", &[])
        .await
        .unwrap_or(0.0);
    total + opened
}

/// A slow upload is the client's time, not the backend's: the response timeout runs only while
/// the backend holds the exchange up, and a stalled body is the client's fault (a 408), never
/// a backend failure or an ejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_are_not_blamed_on_the_backend() {
    use tokio::io::AsyncWriteExt as _;
    let (_consul, _, lb, http) = scripted_lb(&[
        ("LB_RESPONSE_TIMEOUT", "1s"),
        ("LB_CLIENT_BODY_TIMEOUT", "2s"),
        ("LB_EJECT_FAILURES", "1"),
    ])
    .await;
    let upload = |body: &'static [&'static str], gap: Duration| {
        let addr = lb.proxy;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let len: usize = body.iter().map(|p| p.len()).sum();
            let head = format!(
                "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await.unwrap();
            for part in body {
                tokio::time::sleep(gap).await;
                if s.write_all(part.as_bytes()).await.is_err() {
                    break;
                }
            }
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };

    // Ten parts 400 ms apart: 4 s in all, four times the response timeout, each gap well
    // inside the body timeout (2 s). The backend answers once it has it all.
    let parts: &'static [&'static str] = &["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    let answer = upload(parts, Duration::from_millis(400)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("abcdefghij"), "{answer}");

    // Three parts, then silence: the client's fault, answered 408 at the body timeout.
    let stalled: &'static [&'static str] = &["a", "b", "c"];
    let answer = {
        let addr = lb.proxy;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            .await
            .unwrap();
        for part in stalled {
            s.write_all(part.as_bytes()).await.unwrap();
        }
        let mut out = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(8), s.read(&mut out))
            .await
            .expect("an answer within the body timeout")
            .unwrap();
        String::from_utf8_lossy(&out[..n]).into_owned()
    };
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    for (name, labels) in [
        ("lb_backend_ejections_total", &[][..]),
        (
            "lb_upstream_errors_total",
            &[("kind", "response_timeout")][..],
        ),
    ] {
        assert_eq!(lb.metric(&http, name, labels).await, Some(0.0), "{name}");
    }
    assert_eq!(
        lb.metric(
            &http,
            "lb_local_responses_total",
            &[("reason", "client_timeout")]
        )
        .await,
        Some(1.0)
    );
    // The backend is in service.
    let r = http.get(&lb.url("/plain")).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "plain"));
}

/// `LB_MAX_BODY_BYTES`: a declared length over it is a 413 before any backend sees the
/// request; a chunked body is cut off where it passes it, also a 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_the_limit_get_413() {
    let (_consul, accepted, lb, http) = scripted_lb(&[("LB_MAX_BODY_BYTES", "10")]).await;
    let _ = http.get(&lb.url("/plain")).await.unwrap();
    let before = accepted.load(Ordering::SeqCst);

    let small = raw(
        lb.proxy,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789",
    );
    assert!(
        small.starts_with("HTTP/1.1 200") && small.ends_with("0123456789"),
        "{small}"
    );
    let big = raw(
        lb.proxy,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\n0123456789a",
    );
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    let chunked = raw(
        lb.proxy,
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         6\r\n012345\r\n6\r\n6789ab\r\n0\r\n\r\n",
    );
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    assert_eq!(
        lb.metric(
            &http,
            "lb_local_responses_total",
            &[("reason", "body_too_large")]
        )
        .await,
        Some(2.0)
    );
    // The declared one never reached the backend; the backend is not blamed for either.
    assert!(accepted.load(Ordering::SeqCst) - before <= 1);
    assert_eq!(
        lb.metric(&http, "lb_backend_ejections_total", &[]).await,
        Some(0.0)
    );
}

/// An HTTP/2 (prior knowledge) backend that reads each request body whole and echoes it.
async fn h2c_echo_backend() -> u16 {
    use http_body_util::{BodyExt, Full};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await;
                        let body = body.map(|b| b.to_bytes()).unwrap_or_default();
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body)))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    port
}

/// With an HTTP/2 backend too, a slow upload runs on the client's time (the body timeout
/// between its bytes), a stalled one is a 408 that is not held against the backend, and a
/// body cut off at `LB_MAX_BODY_BYTES` is a 413, not a backend error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_and_body_limits_with_an_h2c_backend() {
    let consul = Consul::start().await;
    let port = h2c_echo_backend().await;
    consul
        .register_with("h2", "h2", port, &["lb.route=/", "lb.proto=h2c"], None)
        .await;
    let lb = Lb::start(
        &consul,
        &[
            ("LB_RESPONSE_TIMEOUT", "1s"),
            ("LB_CLIENT_BODY_TIMEOUT", "2s"),
            ("LB_EJECT_FAILURES", "1"),
            ("LB_MAX_BODY_BYTES", "20"),
        ],
    )
    .await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;

    let send = |head: &'static str, parts: &'static [&'static str], gap: Duration| {
        let addr = lb.proxy;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            for part in parts {
                tokio::time::sleep(gap).await;
                if s.write_all(part.as_bytes()).await.is_err() {
                    break;
                }
            }
            let mut out = vec![0; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut out))
                .await
                .expect("an answer")
                .unwrap_or(0);
            String::from_utf8_lossy(&out[..n]).into_owned()
        }
    };

    // Ten parts 400 ms apart: four times the response timeout, each gap inside the body's.
    let answer = send(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n",
        &["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"],
        Duration::from_millis(400),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("abcdefghij"), "{answer}");

    // Three parts, then silence: a 408 at the body timeout.
    let answer = send(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n",
        &["a", "b", "c"],
        Duration::ZERO,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A chunked body that passes the limit on its way: 413.
    let answer = send(
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        &[
            "10\r\n0123456789abcdef\r\n",
            "10\r\n0123456789abcdef\r\n",
            "0\r\n\r\n",
        ],
        Duration::from_millis(100),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    for (name, labels) in [
        ("lb_backend_ejections_total", &[][..]),
        (
            "lb_upstream_errors_total",
            &[("kind", "response_timeout")][..],
        ),
        ("lb_upstream_errors_total", &[("kind", "reset")][..]),
    ] {
        assert_eq!(lb.metric(&http, name, labels).await, Some(0.0), "{name}");
    }
    let r = http.get(&lb.url("/plain")).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "the backend is in service");
}

/// An h2c backend's one connection carries every worker's requests: the drain of the worker
/// whose request opened it must not cut another worker's request still on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_connection_outlives_the_worker_that_opened_it() {
    let consul = Consul::start().await;
    let port = h2c_echo_backend().await;
    consul
        .register_with("h2", "h2", port, &["lb.route=/", "lb.proto=h2c"], None)
        .await;
    let mut lb = Lb::start(&consul, &[("LB_WORKERS", "2"), ("LB_DRAIN_DELAY", "0s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let served = |w: usize| {
        let (lb, http) = (&lb, &http);
        async move {
            lb.metric(
                http,
                "lb_worker_connections_total",
                &[("worker", &w.to_string())],
            )
            .await
            .unwrap_or(0.0)
        }
    };

    // Connections opened and kept, without a request, until each worker holds one.
    let mut on: [Option<tokio::net::TcpStream>; 2] = [None, None];
    let mut spare = Vec::new();
    for _ in 0..8 {
        let before = [served(0).await, served(1).await];
        let s = tokio::net::TcpStream::connect(lb.proxy).await.unwrap();
        let mut waited = 0;
        let w = loop {
            let now = [served(0).await, served(1).await];
            if let Some(w) = (0..2).find(|&i| now[i] > before[i]) {
                break w;
            }
            waited += 1;
            assert!(waited < 500, "no worker took the connection");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        match &on[w] {
            None => on[w] = Some(s),
            Some(_) => spare.push(s),
        }
        if on.iter().all(Option::is_some) {
            break;
        }
    }
    let [Some(mut w0), Some(mut w1)] = on else {
        panic!("eight connections did not reach both workers");
    };

    // Worker 1's request opens the backend connection.
    w1.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let mut r1 = TokioBufReader::new(&mut w1);
    let mut status = String::new();
    r1.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    // Worker 0's request is on it, half sent, when the drain begins. Worker 1 has nothing in
    // flight and finishes its drain at once.
    w0.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lb.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    w0.write_all(b"56789").await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), w0.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("0123456789"), "{answer}");
    assert_eq!(
        lb.wait_exit(Duration::from_secs(10)).await,
        Some(0),
        "clean exit"
    );
    drop((w1, spare));
}

/// Large responses stream through memory the lb already has. With glibc's moving heap
/// thresholds (the lb's allocator then), the read buffers of 1 MiB responses at 16
/// connections went back to the kernel and were faulted in again, 11 to 28 minor page faults
/// per response in every round.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_do_not_fault_in_fresh_memory_each_time() {
    let consul = Consul::start().await;
    let backend = Backend::start("big").await;
    consul
        .register("big-0", "big", backend.port(), &["lb.route=/"])
        .await;
    let lb = Lb::start(&consul, &[("LB_WORKERS", "1")]).await;
    // Nor in huge pages: where the kernel gives them to any large mapping, each would be
    // 2 MiB faulted in for a few KiB used.
    let status = std::fs::read_to_string(format!("/proc/{}/status", lb.pid())).unwrap();
    assert!(
        !status.contains("THP_enabled:\t1"),
        "transparent huge pages are on for the lb"
    );
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let url = lb.url("/big?kb=1024");
    let round = |each: usize| {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (http, url) = (http.clone(), url.clone());
                tokio::spawn(async move {
                    for _ in 0..each {
                        let r = http.get(&url).await.unwrap();
                        assert_eq!((r.status, r.body.len()), (StatusCode::OK, 1 << 20));
                    }
                })
            })
            .collect();
        async move {
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    let minor_faults = || proc_stat(lb.pid())[7];
    // Buffers and pools grow to what this load needs first.
    round(4).await;
    // The best of three rounds: memory left free at a burst's end goes back to the kernel
    // (after 10 ms, by default), and the next round faults it in again.
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let before = minor_faults();
        round(8).await;
        rounds.push((minor_faults() - before) as f64 / 128.0);
    }
    let best = rounds.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        best < 4.0,
        "minor page faults per 1 MiB response, in three rounds: {rounds:.1?}"
    );
}

/// A response read off a keep-alive connection by its `Content-Length`: status line and body.
fn read_response(r: &mut BufReader<TcpStream>) -> (String, Vec<u8>) {
    crate::keepalive::read_response(r).unwrap()
}

/// What follows the head in a response read whole.
fn body_of(response: &[u8]) -> &[u8] {
    let at = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    &response[at + 4..]
}

/// With `LB_SPLICE_MIN`, bodies of at least that length pass from the backend's socket to the
/// client's through a pipe: byte for byte and in order, among smaller ones that are copied,
/// with both connections reused, also after the connection parked; to a client that reads
/// slowly; past clients that leave halfway (the next clients get their own bodies whole);
/// pipelined, to HTTP/1.0 clients, as a connection's last response, beside HEAD (never
/// spliced: no body); counted whole in the access log; and a backend that breaks off cuts
/// its client off as with copying. The count of bytes spliced shows the pipe was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_spliced_byte_for_byte() {
    let (_consul, _, lb, http) = scripted_lb(&[
        ("LB_SPLICE_MIN", "65536"),
        ("LB_RETRIES", "0"),
        ("LB_ACCESS_LOG", "json"),
    ])
    .await;
    let spliced = || async {
        lb.metric(&http, "lb_spliced_bytes_total", &[])
            .await
            .unwrap_or(0.0) as usize
    };
    let connect = || {
        let s = TcpStream::connect(lb.proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        BufReader::new(s)
    };
    let ask = |c: &mut BufReader<TcpStream>, path: &str| {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        c.get_mut().write_all(req.as_bytes()).unwrap();
    };

    let mut c = connect();
    let sizes = [1 << 20, 100, 65536, 300_001, 65535, 4 << 20, 70_000];
    let mut backends = None;
    for n in sizes {
        ask(&mut c, &format!("/pattern/{n}"));
        let (head, body) = read_response(&mut c);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body == pattern(n), "{n} bytes came changed");
        // The backend's connection goes on from the first exchange (the lb's count: Consul's
        // checks connect to the backend too).
        let opened = lb.metric(&http, "lb_upstream_connections_total", &[]).await;
        assert_eq!(*backends.get_or_insert(opened), opened, "after {n}");
    }
    let large: usize = sizes.iter().filter(|&&n| n >= 65536).sum();
    let moved = spliced().await;
    // All of the large bodies but what came in the read of each head (at most 8 KiB).
    assert!(
        moved <= large && moved + 5 * 8192 >= large,
        "{moved} of {large}"
    );

    // Pipelined: the second head waits for the first body's last placeholder; then a HEAD,
    // whose length is not followed by a body.
    c.get_mut()
        .write_all(
            b"GET /pattern/1048576 HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /pattern/300000 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .unwrap();
    assert!(read_response(&mut c).1 == pattern(1 << 20));
    assert!(read_response(&mut c).1 == pattern(300_000));
    c.get_mut()
        .write_all(b"HEAD /pattern/1048576 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        head.push(b[0] as char);
    }
    assert!(
        head.to_ascii_lowercase()
            .contains("content-length: 1048576"),
        "{head}"
    );
    ask(&mut c, "/pattern/70000");
    assert!(read_response(&mut c).1 == pattern(70_000));
    // Idle long enough to park (its pipe given back), then a new round on the connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ask(&mut c, "/pattern/1048576");
    assert!(read_response(&mut c).1 == pattern(1 << 20), "after parking");

    // The last response of a connection (corked), and an HTTP/1.0 client's.
    for request in [
        "GET /pattern/1048576 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /pattern/1048576 HTTP/1.0\r\n\r\n",
    ] {
        let mut last = connect();
        last.get_mut().write_all(request.as_bytes()).unwrap();
        let mut got = Vec::new();
        last.read_to_end(&mut got).unwrap();
        let body = body_of(&got);
        assert!(
            body == pattern(1 << 20),
            "{request:?}: {} bytes",
            body.len()
        );
    }

    // A client that reads in small pieces, slowly.
    let before_slow = spliced().await;
    let mut slow = connect();
    ask(&mut slow, "/pattern/2097152");
    let (_, body) = {
        let mut line = String::new();
        while !line.ends_with("\r\n\r\n") {
            let mut b = [0u8; 1];
            slow.read_exact(&mut b).unwrap();
            line.push(b[0] as char);
        }
        let mut body = Vec::new();
        let mut piece = [0u8; 8192];
        while body.len() < 2097152 {
            let k = slow.read(&mut piece).unwrap();
            assert!(k > 0, "cut after {}", body.len());
            body.extend_from_slice(&piece[..k]);
            // About 4 MB/s: the lb's socket fills and its writes wait for room.
            std::thread::sleep(Duration::from_millis(2));
        }
        (line, body)
    };
    assert!(
        body == pattern(2097152),
        "the slow client's body came changed"
    );
    assert!(spliced().await - before_slow + 8192 >= 2097152);

    // Clients that leave halfway through, each followed by one that reads to the end.
    for _ in 0..4 {
        let mut gone = connect();
        ask(&mut gone, "/pattern/4194304");
        let mut some = vec![0; 200_000];
        gone.read_exact(&mut some).unwrap();
        drop(gone);
        let mut next = connect();
        ask(&mut next, "/pattern/1048576");
        let (_, body) = read_response(&mut next);
        assert!(
            body == pattern(1 << 20),
            "a body after a client left came changed"
        );
    }

    // A backend that breaks off: the client is cut off short of the length, at once.
    let mut cut = connect();
    ask(&mut cut, "/pattern-cut/1048576");
    let mut got = Vec::new();
    let started = std::time::Instant::now();
    // The end, or a reset: never the read timeout.
    if let Err(e) = cut.read_to_end(&mut got) {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let body = body_of(&got);
    assert!(body.len() < 1 << 20, "{}", body.len());
    assert!(body == &pattern(1 << 20)[..body.len()]);
    assert_eq!(
        lb.metric(&http, "lb_upstream_errors_total", &[("kind", "body")])
            .await,
        Some(1.0)
    );
    // The lb goes on.
    let mut after = connect();
    ask(&mut after, "/pattern/131072");
    assert!(read_response(&mut after).1 == pattern(131072));

    // The access log counts what the placeholders stood for.
    eventually("the line to be written", Duration::from_secs(5), || async {
        crate::access_log::json_lines(&lb)
            .iter()
            .any(|l| l["path"] == "/pattern/131072")
    })
    .await;
    let lines = crate::access_log::json_lines(&lb);
    let line = lines
        .iter()
        .find(|l| l["path"] == "/pattern/300001")
        .unwrap();
    assert_eq!(line["bytes_out"], 300_001, "{line}");
    assert_eq!(
        lb.metric(&http, "lb_splice_refused_total", &[]).await,
        Some(0.0)
    );
}

/// Splicing is for plain HTTP/1.1 clients only. With `LB_SPLICE_MIN` set, a TLS client (over
/// HTTP/1.1 and HTTP/2) and a cleartext HTTP/2 one get the same bodies copied, byte for
/// byte: a placeholder that reached their writers would arrive as zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_plain_http1_clients_have_bodies_spliced() {
    let consul = Consul::start().await;
    let (port, _) = scripted_backend().await;
    consul.register("s", "web", port, &["lb.route=/"]).await;
    let ca = crate::tls::Ca::new("splice");
    let leaf = ca.leaf("a", &["a.test"]);
    let splice = [("LB_SPLICE_MIN", "65536"), ("LB_H2C", "true")];
    let t = crate::tls::start_tls_lb(&consul, &leaf.source(), &splice).await;
    let (lb, http) = (&t.lb, Http::new());
    wait_routed(lb, &http, "*/", 1).await;
    // The body, and the HTTP version curl spoke.
    let get = |args: &[&str], url: String| -> (Vec<u8>, String) {
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new("curl")
                .args(["-sS", "--max-time", "20", "-w", "%{stderr}%{http_version}"])
                .args(args)
                .arg(&url)
                .output()
                .expect("curl runs")
        });
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "curl {args:?} {url}: {stderr}");
        (out.stdout, stderr)
    };
    let ca_pem = ca.ca_pem();
    let resolve = format!("a.test:{}:127.0.0.1", t.tls_port);
    let tls = |proto: &str, n: usize| {
        let args = [
            proto,
            "--cacert",
            ca_pem.to_str().unwrap(),
            "--resolve",
            &resolve,
        ];
        get(&args, format!("https://a.test:{}/pattern/{n}", t.tls_port))
    };
    let metric = |name: &'static str| {
        let http = &http;
        async move { lb.metric(http, name, &[]).await.unwrap_or(0.0) }
    };
    for n in [1 << 20, 300_001, 65536] {
        let (body, version) = tls("--http1.1", n);
        assert!(
            body == pattern(n) && version == "1.1",
            "TLS, HTTP/{version}: {n}"
        );
        let (body, version) = tls("--http2", n);
        assert!(
            body == pattern(n) && version == "2",
            "TLS, HTTP/{version}: {n}"
        );
        let (body, version) = get(
            &["--http2-prior-knowledge"],
            format!("http://{}/pattern/{n}", lb.proxy),
        );
        assert!(
            body == pattern(n) && version == "2",
            "cleartext HTTP/{version}: {n}"
        );
    }
    assert_eq!(metric("lb_spliced_bytes_total").await, 0.0);
    // The setting is on: a plain HTTP/1.1 client's body is spliced.
    let (body, version) = get(
        &["--http1.1"],
        format!("http://{}/pattern/1048576", lb.proxy),
    );
    assert!(
        body == pattern(1 << 20) && version == "1.1",
        "plain HTTP/{version}"
    );
    assert!(metric("lb_spliced_bytes_total").await > 0.0);
    assert_eq!(metric("lb_splice_refused_total").await, 0.0);
}

/// The pipes splicing holds open are bounded by the descriptor limit: with the lb's soft
/// limit at 512, at most 32 pipes (a sixteenth) are open at once. Forty clients that ask for
/// a large body and do not read yet each hold theirs: 32 bodies take a pipe, the other 8 are
/// copied and counted as refused. Every body then arrives whole, the pipes kept for reuse
/// are at most half the budget (four workers could pool all 32 without that rule), and a
/// second wave of 32 such clients gets a pipe each: every place came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_pipes_are_held_to_the_budget() {
    use std::os::unix::process::CommandExt;
    const SOFT_LIMIT: u64 = 512;
    const MAX_PIPES: usize = 512 / 16;
    const CLIENTS: usize = MAX_PIPES + 8;
    const BODY: usize = 2 << 20;

    let consul = Consul::start().await;
    let (port, _) = scripted_backend().await;
    consul.register("s", "web", port, &["lb.route=/"]).await;
    let settings = [
        ("LB_SPLICE_MIN", "65536"),
        ("LB_WORKERS", "4"),
        // What holds a body in the lb while its client does not read: the lb writes no more
        // than this ahead of what the client has taken. Its client sockets' send buffers
        // start at megabytes on loopback and would take a whole body, and its pipe with it.
        ("LB_CLIENT_NOTSENT_LOWAT", "131072"),
    ];
    let lb = Lb::start_tuned(&consul, &settings, |cmd| {
        // SAFETY: only getrlimit and setrlimit run between fork and exec, both
        // async-signal-safe; the hard limit stays as it is.
        unsafe {
            cmd.pre_exec(|| {
                let mut l = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if l.rlim_max < SOFT_LIMIT {
                    return Err(std::io::Error::other("hard descriptor limit below 512"));
                }
                l.rlim_cur = SOFT_LIMIT;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
    .await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let lowat = [("option", "TCP_NOTSENT_LOWAT")];
    let refused_option = lb.metric(&http, "lb_socket_options_refused_total", &lowat);
    assert_eq!(
        refused_option.await.unwrap_or(0.0),
        0.0,
        "the test needs the option"
    );
    let metric = |name: &'static str| {
        let (lb, http) = (&lb, &http);
        async move { lb.metric(http, name, &[]).await.unwrap_or(0.0) as usize }
    };
    let pid = lb.pid();
    let pipe_fds = move || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|link| link.to_string_lossy().starts_with("pipe:"))
            .count()
    };
    let before = pipe_fds();
    let pipes_open = || pipe_fds().saturating_sub(before) / 2;
    // Clients that ask for a large body each and read nothing yet.
    let wave = |n: usize| async move {
        let mut clients = Vec::new();
        for _ in 0..n {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(16 * 1024).unwrap();
            let mut s = socket.connect(lb.proxy).await.unwrap();
            let req = format!("GET /pattern/{BODY} HTTP/1.1\r\nHost: x\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            clients.push(s);
        }
        clients
    };
    let read_all = |clients: Vec<tokio::net::TcpStream>| async move {
        let readers: Vec<_> = clients
            .into_iter()
            .map(|s| tokio::spawn(read_body(s)))
            .collect();
        for reader in readers {
            let body = tokio::time::timeout(Duration::from_secs(30), reader)
                .await
                .expect("a body in time")
                .unwrap();
            assert!(body == pattern(BODY), "a body came changed");
        }
    };
    // The kernel refuses pipes of this size past `fs.pipe-user-pages-soft` (per user): that
    // would be counted as a refusal too.
    let refusals = "refusals other than the budget's (see fs.pipe-user-pages-soft in the log)";

    let spliced_before = metric("lb_spliced_bytes_total").await;
    let clients = wave(CLIENTS).await;
    // A body started: either it holds a pipe or it was refused one.
    eventually("every body to start", Duration::from_secs(20), || async {
        metric("lb_splice_refused_total").await + pipes_open() >= CLIENTS
    })
    .await;
    assert_eq!(
        metric("lb_splice_refused_total").await,
        CLIENTS - MAX_PIPES,
        "{refusals}"
    );
    assert_eq!(pipes_open(), MAX_PIPES, "one pipe per spliced body");
    read_all(clients).await;
    // The spliced bodies but what came with each head, at most 8 KiB.
    let moved = metric("lb_spliced_bytes_total").await - spliced_before;
    assert!(
        moved <= MAX_PIPES * BODY && moved + MAX_PIPES * 8192 >= MAX_PIPES * BODY,
        "{moved}"
    );
    // Pooled for reuse: at most half the budget, and the one a last drain may still hold.
    eventually(
        "the last pipes to be let go",
        Duration::from_secs(5),
        || async { pipes_open() <= MAX_PIPES / 2 + 1 },
    )
    .await;

    let clients = wave(MAX_PIPES).await;
    eventually(
        "every place to come back",
        Duration::from_secs(20),
        || async { pipes_open() == MAX_PIPES },
    )
    .await;
    assert_eq!(
        metric("lb_splice_refused_total").await,
        CLIENTS - MAX_PIPES,
        "{refusals}"
    );
    read_all(clients).await;
}

/// One response's body, read whole after its head, from a client that asked for it.
async fn read_body(s: tokio::net::TcpStream) -> Vec<u8> {
    let mut r = TokioBufReader::new(s);
    let mut length = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = Some(v.trim().parse::<usize>().unwrap());
        }
    }
    let mut body = vec![0; length.expect("a length")];
    r.read_exact(&mut body).await.unwrap();
    body
}
