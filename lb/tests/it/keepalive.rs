//! Plain HTTP/1.1 keep-alive connections, which the lb parks between requests: no byte of a
//! request may be lost across a park, whatever the client splits or pipelines, and a parked
//! connection still obeys the idle timeout and the drain. How new connections are taken:
//! spread over the workers, and their first request acknowledged with its answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::balancing::wait_routed;
use crate::support::{listening_sockets, Backend, Consul, Http, Lb};

/// One response from `r`: its status line and body (Content-Length framed; the test backend
/// and the lb's own answers always send one).
pub(crate) fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<(String, Vec<u8>)> {
    let mut status = String::new();
    if r.read_line(&mut status)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok((status.trim_end().to_string(), body))
}

fn connect(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn pause() {
    // Long enough for the lb to have parked the connection.
    std::thread::sleep(Duration::from_millis(200));
}

/// Everything the client does on one connection; runs on a blocking thread.
fn exchanges(addr: SocketAddr) {
    let (mut s, mut r) = connect(addr);

    // Pipelined: two whole requests and the start of a third, the rest after a pause.
    s.write_all(b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\n\r\nGET /p3 HTTP/1.1\r\nHo")
        .unwrap();
    pause();
    s.write_all(b"st: x\r\n\r\n").unwrap();
    for _ in 0..3 {
        let (status, body) = read_response(&mut r).unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, b"a");
    }

    // A head split over a pause, after the connection went idle.
    pause();
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    pause();
    s.write_all(b"Host: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r).unwrap().1, b"a");

    // A body split over a pause, alone and behind a pipelined request.
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        .unwrap();
    pause();
    s.write_all(b"67890").unwrap();
    assert_eq!(read_response(&mut r).unwrap().1, b"a len=10");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        .unwrap();
    pause();
    s.write_all(b"67890").unwrap();
    assert_eq!(read_response(&mut r).unwrap().1, b"a");
    assert_eq!(read_response(&mut r).unwrap().1, b"a len=10");

    // A response larger than the socket buffers, read slowly, then one more request.
    s.write_all(b"GET /big?kb=32768 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    pause();
    let (status, body) = read_response(&mut r).unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body.len(), 32768 * 1024);
    pause();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r).unwrap().1, b"a");
}

async fn connections(lb: &Lb, http: &Http) -> f64 {
    lb.metric(
        http,
        "lb_client_connections_total",
        &[("protocol", "http/1.1"), ("tls", "false")],
    )
    .await
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_lose_no_byte_and_keep_their_timeouts() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    // One worker: the current-thread runtime the lb picks on a single CPU.
    let lb = Lb::start(
        &consul,
        &[("LB_CLIENT_HEADER_TIMEOUT", "1s"), ("LB_WORKERS", "1")],
    )
    .await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let proxy = lb.proxy;
    let before = connections(&lb, &http).await;
    let errors_before = lb
        .metric(&http, "lb_client_connection_errors_total", &[])
        .await
        .unwrap_or(0.0);

    tokio::task::spawn_blocking(move || exchanges(proxy))
        .await
        .unwrap();
    // All of it on one client connection.
    assert_eq!(connections(&lb, &http).await - before, 1.0);

    // A keep-alive connection left idle is closed after the timeout, as is one that never
    // sends a request, and one whose request head stops halfway, on a new connection or after
    // an exchange; only the idle one is not a client error.
    let closed = tokio::task::spawn_blocking(move || {
        let (mut idle, mut idle_r) = connect(proxy);
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        read_response(&mut idle_r).unwrap();
        let (_silent, silent_r) = connect(proxy);
        let (mut partial, partial_r) = connect(proxy);
        partial.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
        let (mut later, mut later_r) = connect(proxy);
        later
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        read_response(&mut later_r).unwrap();
        later.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
        [idle_r, silent_r, partial_r, later_r].map(|mut r| {
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).ok().map(|_| rest.len())
        })
    })
    .await
    .unwrap();
    assert_eq!(
        closed,
        [Some(0); 4],
        "idle, silent and half-sent connections were closed without a response"
    );
    let timeouts = lb
        .metric(
            &http,
            "lb_client_connection_errors_total",
            &[("kind", "header_timeout")],
        )
        .await
        .unwrap_or(0.0);
    let errors = lb
        .metric(&http, "lb_client_connection_errors_total", &[])
        .await
        .unwrap_or(0.0);
    assert_eq!(
        timeouts, 3.0,
        "header timeouts: the silent and half-sent connections"
    );
    assert_eq!(errors - errors_before, 3.0, "no other client error");
    assert_eq!(
        parked(&lb, &http).await,
        0.0,
        "the idle connection left the lot"
    );
}

/// A connection that has had one exchange, which the lb parks next.
async fn after_one_exchange(proxy: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    tokio::task::spawn_blocking(move || {
        let (mut s, mut r) = connect(proxy);
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        read_response(&mut r).unwrap();
        (s, r)
    })
    .await
    .unwrap()
}

/// Waits up to 10 s for `n` connections parked.
async fn wait_parked(lb: &Lb, http: &Http, n: u32, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while parked(lb, http).await != f64::from(n) {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, then a clean exit well within the drain's 10 s: idle connections do not hold it
/// up.
async fn drains_at_once(lb: &mut Lb) {
    let started = std::time::Instant::now();
    lb.signal(libc::SIGTERM);
    assert_eq!(
        lb.wait_exit(Duration::from_secs(10)).await,
        Some(0),
        "clean exit"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain waited on idle connections"
    );
}

async fn parked(lb: &Lb, http: &Http) -> f64 {
    lb.metric(http, "lb_client_connections_parked", &[])
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_parked_connections_at_once() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    let mut lb = Lb::start(&consul, &[("LB_DRAIN_DELAY", "0s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let proxy = lb.proxy;
    // Parked after its exchange, as is a second connection whose next request then comes
    // from the lot, and which is parked again after it.
    let (s, mut r) = after_one_exchange(proxy).await;
    let (mut s2, mut r2) = after_one_exchange(proxy).await;
    wait_parked(&lb, &http, 2, "two connections parked").await;
    let (s2, r2) = tokio::task::spawn_blocking(move || {
        s2.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut r2).unwrap().1, b"a");
        (s2, r2)
    })
    .await
    .unwrap();
    wait_parked(&lb, &http, 2, "parked again after its request").await;
    drains_at_once(&mut lb).await;
    let mut rest = Vec::new();
    assert_eq!(r.read_to_end(&mut rest).unwrap(), 0, "closed with a FIN");
    let mut r2 = r2;
    assert_eq!(r2.read_to_end(&mut rest).unwrap(), 0, "closed with a FIN");
    drop((s, s2));
}

/// A request that offers a switch of protocols the lb does not make leaves its connection
/// plain HTTP/1.1, which parks when idle and answers the next request like any other. The
/// offers: `h2c`, as curl's `--http2` sends on plain http (never forwarded); an `Upgrade`
/// without `Connection: upgrade` (not an offer to the lb, but one to hyper); a WebSocket
/// switch the backend declines with a 200; and a `CONNECT`, which the lb refuses. hyper keeps
/// an offer pending until the connection ends, and then ends it as an upgrade: the
/// connection closed at its first idle spell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_upgrade_leaves_the_connection_to_park() {
    let (_consul, _a, lb) = routed_to_a().await;
    let http = Http::new();
    let proxy = lb.proxy;
    let offers: [(&[u8], &str); 4] = [
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", "HTTP/1.1 200 OK"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: x\r\n\r\n", "HTTP/1.1 200 OK"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", "HTTP/1.1 200 OK"),
        (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ];
    let conns = tokio::task::spawn_blocking(move || {
        offers
            .into_iter()
            .map(|(offer, status)| {
                let (mut s, mut r) = connect(proxy);
                s.write_all(offer).unwrap();
                assert_eq!(read_response(&mut r).unwrap().0, status);
                (s, r)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    wait_parked(
        &lb,
        &http,
        4,
        "the connections parked after declined offers",
    )
    .await;
    // Answered from the lot, and parked again.
    let conns = tokio::task::spawn_blocking(move || {
        let mut conns = conns;
        for (i, (s, r)) in conns.iter_mut().enumerate() {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            assert_eq!(read_response(r).unwrap().1, b"a", "connection {i}");
        }
        conns
    })
    .await
    .unwrap();
    wait_parked(&lb, &http, 4, "parked again").await;
    drop(conns);
}

async fn worker_connections(lb: &Lb, http: &Http) -> [f64; 2] {
    let mut out = [0.0; 2];
    for (w, n) in out.iter_mut().enumerate() {
        *n = lb
            .metric(
                http,
                "lb_worker_connections_total",
                &[("worker", &w.to_string())],
            )
            .await
            .unwrap_or(0.0);
    }
    out
}

/// Two workers, each a thread with a runtime of its own and a listening socket of its own:
/// new connections are spread over both, each reuses its own upstream connections, and the
/// drain closes the parked connections of both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_connections_and_pool_their_own() {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    let mut lb = Lb::start(&consul, &[("LB_WORKERS", "2"), ("LB_DRAIN_DELAY", "0s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let proxy = lb.proxy;
    // One each, so that a new connection wakes only the worker whose queue it is in; with
    // one socket shared, every connection woke both.
    if cfg!(target_os = "linux") {
        assert_eq!(
            listening_sockets(proxy.port()),
            2,
            "a listening socket per worker"
        );
    }
    let opened = || lb.metric(&http, "lb_upstream_connections_total", &[]);
    let opened_before = opened().await.unwrap_or(0.0);
    let before = worker_connections(&lb, &http).await;

    // Eight connections, opened one after another and kept: whichever worker accepts one,
    // the other gets it when it holds two fewer.
    let mut conns = tokio::task::spawn_blocking(move || {
        (0..8)
            .map(|_| {
                let (mut s, mut r) = connect(proxy);
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                assert_eq!(read_response(&mut r).unwrap().1, b"a");
                (s, r)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    wait_parked(&lb, &http, 8, "eight connections parked").await;
    let after = worker_connections(&lb, &http).await;
    let served = [after[0] - before[0], after[1] - before[1]];
    assert_eq!(served[0] + served[1], 8.0, "{served:?}");
    assert!(
        served[0] >= 3.0 && served[1] >= 3.0,
        "both workers hold connections: {served:?}"
    );

    // Three more exchanges on each, every one resumed from its worker's lot, one request at
    // a time: each worker made one upstream connection and reuses it.
    conns = tokio::task::spawn_blocking(move || {
        for _ in 0..3 {
            for (s, r) in &mut conns {
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                assert_eq!(read_response(r).unwrap().1, b"a");
            }
        }
        conns
    })
    .await
    .unwrap();
    assert_eq!(
        opened().await.unwrap_or(0.0) - opened_before,
        2.0,
        "one upstream connection per worker"
    );

    wait_parked(&lb, &http, 8, "parked again").await;
    drains_at_once(&mut lb).await;
    for (s, mut r) in conns {
        let mut rest = Vec::new();
        assert_eq!(r.read_to_end(&mut rest).unwrap(), 0, "closed with a FIN");
        drop(s);
    }
}

/// A Consul, backend `a` and an lb with default settings that routes `/` to it.
async fn routed_to_a() -> (Consul, Backend, Lb) {
    let consul = Consul::start().await;
    let a = Backend::start("a").await;
    consul.register("a", "web", a.port(), &["lb.route=/"]).await;
    let lb = Lb::start(&consul, &[]).await;
    wait_routed(&lb, &Http::new(), "*/", 1).await;
    (consul, a, lb)
}

/// Segments `s` has received so far, and how many of them carried data (`TCP_INFO`).
#[cfg(target_os = "linux")]
fn segments_in(s: &TcpStream) -> (u32, u32) {
    use std::os::fd::AsRawFd;
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a connected socket's descriptor, and a buffer of `len` bytes the call fills.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    (info.tcpi_segs_in, info.tcpi_data_segs_in)
}

/// A new connection's request is acknowledged by the lb's answer, not first by a segment of
/// its own: while the request waits on a slow backend, the client has received nothing but
/// the handshake's SYN-ACK. The kernel's delayed-ACK timer (40 ms or more) acknowledges it
/// alone when the answer takes longer, so the look comes 10 ms after the request, and the
/// fewest of five connections counts.
///
/// And the last response of a connection the client asked to close comes with the FIN in
/// one segment: by the end of input the client has received two segments, the SYN-ACK and
/// that one, where a FIN of its own made three.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_get_no_segment_the_answer_can_carry() {
    let (_consul, _a, lb) = routed_to_a().await;
    let proxy = lb.proxy;
    let (before_answers, at_ends) = tokio::task::spawn_blocking(move || {
        let before_answers = (0..5)
            .map(|_| {
                let (mut s, mut r) = connect(proxy);
                s.write_all(b"GET /slow?ms=100 HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                std::thread::sleep(Duration::from_millis(10));
                let seen = segments_in(&s);
                assert_eq!(read_response(&mut r).unwrap().1, b"a");
                seen
            })
            .collect::<Vec<_>>();
        let at_ends = (0..5)
            .map(|_| {
                let (mut s, mut r) = connect(proxy);
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                assert_eq!(read_response(&mut r).unwrap().1, b"a");
                let mut rest = Vec::new();
                r.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty(), "nothing after the response");
                segments_in(&s)
            })
            .collect::<Vec<_>>();
        (before_answers, at_ends)
    })
    .await
    .unwrap();
    assert!(
        before_answers.iter().all(|&(_, data)| data == 0),
        "no data before the answer: {before_answers:?}"
    );
    assert_eq!(
        before_answers.iter().map(|&(segs, _)| segs).min(),
        Some(1),
        "only the SYN-ACK before the answer (segments in, with data): {before_answers:?}"
    );
    assert_eq!(
        at_ends.iter().min(),
        Some(&(2, 1)),
        "the SYN-ACK, then the response with the FIN (segments in, with data): {at_ends:?}"
    );
}

/// A closing connection's answer is sent even when the client sent more after its request
/// than the lb reads: bytes left unread make the close a reset. The last response is
/// written corked, and a close alone would then reset the connection without sending it.
/// Both ways hyper ends such a connection: shutting it down, and as an upgrade (a request
/// that names an `Upgrade` the lb does not take up, whose socket hyper hands on, dropped,
/// without a shutdown).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_closing_request_do_not_swallow_its_answer() {
    let (_consul, _a, lb) = routed_to_a().await;
    let proxy = lb.proxy;
    let requests: [&[u8]; 2] = [
        b"GET /slow?ms=50 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /slow?ms=50 HTTP/1.1\r\nHost: x\r\nUpgrade: x\r\nConnection: close\r\n\r\n",
    ];
    let answers = tokio::task::spawn_blocking(move || {
        (0..6)
            .map(|i| {
                let (mut s, mut r) = connect(proxy);
                s.write_all(requests[i % 2]).unwrap();
                // After the lb has read the request, before the answer: more than hyper
                // reads ahead, so that some is still queued at the close. The writer stops
                // at the reset that follows the answer.
                std::thread::sleep(Duration::from_millis(10));
                let writer = std::thread::spawn(move || {
                    let chunk = [b'm'; 64 * 1024];
                    for _ in 0..16 {
                        if s.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                });
                let mut out = Vec::new();
                // The reset after the answer is expected.
                let _ = r.read_to_end(&mut out);
                writer.join().unwrap();
                String::from_utf8_lossy(&out).into_owned()
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (i, answer) in answers.iter().enumerate() {
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n\r\na"),
            "request {i}: {answer:?}"
        );
    }
}

/// A body that streams on a connection the client asked to close is not held back by the
/// cork its last response is written under: the first part reaches the client while the
/// backend waits to send the rest. Held, it would wait for the kernel's ceiling of 200 ms;
/// of three connections the quickest must see it within 100 ms.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_last_response_is_not_held_back() {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    use tokio::io::AsyncWriteExt;

    // Answers every request with a chunked body: one chunk at once, the rest 500 ms later.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent: Arc<Mutex<Option<Instant>>> = Arc::default();
    let sent2 = sent.clone();
    let backend = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let sent = sent2.clone();
            tokio::spawn(async move {
                let Some(head) = crate::support::read_head(&mut s).await else {
                    return;
                };
                let first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                if head.starts_with(b"GET /health") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
                *sent.lock().unwrap() = Some(Instant::now());
                let _ = s.write_all(first).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = s.write_all(b"4\r\nlast\r\n0\r\n\r\n").await;
            });
        }
    });
    let consul = Consul::start().await;
    consul.register("s", "web", port, &["lb.route=/"]).await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    let proxy = lb.proxy;
    let waits = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|_| {
                let (mut s, mut r) = connect(proxy);
                s.write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(5).any(|w| w == b"first") {
                    let n = r.read(&mut buf).unwrap();
                    assert!(
                        n > 0,
                        "the response ended early: {:?}",
                        String::from_utf8_lossy(&got)
                    );
                    got.extend_from_slice(&buf[..n]);
                }
                let waited = sent
                    .lock()
                    .unwrap()
                    .take()
                    .expect("the backend sent it")
                    .elapsed();
                let mut rest = Vec::new();
                r.read_to_end(&mut rest).unwrap();
                got.extend_from_slice(&rest);
                let text = String::from_utf8_lossy(&got);
                assert!(
                    text.ends_with("5\r\nfirst\r\n4\r\nlast\r\n0\r\n\r\n"),
                    "{text}"
                );
                waited
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    backend.abort();
    assert!(
        waits.iter().min().unwrap() < &Duration::from_millis(100),
        "the first chunk waited: {waits:?}"
    );
}
