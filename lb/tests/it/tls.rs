//! TLS termination with real clients: curl over HTTP/1.1 and HTTP/2 with SNI, h2load, a rustls
//! client counting certificates through rotations, and refusals of bad certificate files.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
pub use testkit::pki::{write_atomically, Ca, Leaf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::balancing::wait_routed;
use crate::support::{eventually, free_port, Backend, Consul, Http, Lb};

/// One plain HTTP backend, `web-0`, routed at `/`.
async fn routed_backend(consul: &Consul) -> Backend {
    let b = Backend::start("web-0").await;
    consul
        .register("web-0", "web", b.port(), &["lb.route=/"])
        .await;
    b
}

/// One request on a new TLS connection: the certificate the server presented and the status.
async fn tls_get(
    connector: &tokio_rustls::TlsConnector,
    port: u16,
    sni: &str,
) -> Result<(CertificateDer<'static>, u16), String> {
    tls_exchange(connector, port, sni)
        .await
        .map(|(cert, status, _)| (cert, status))
}

/// A connection to the lb's TLS port on loopback, its handshake done as `sni`.
pub async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    port: u16,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    connector.connect(name, tcp).await
}

/// [`tls_get`], and whether the connection resumed a session. The response is read to the
/// end, tickets the server sent after the handshake included.
async fn tls_exchange(
    connector: &tokio_rustls::TlsConnector,
    port: u16,
    sni: &str,
) -> Result<(CertificateDer<'static>, u16, bool), String> {
    let mut tls = tls_connect(connector, port, sni)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    Ok((cert, status, resumed))
}

/// A Consul, [`routed_backend`], a CA named `ca` and an lb serving its certificate for
/// `a.test` on its TLS port, with the route in its table.
async fn one_site(ca: &str) -> (Consul, Backend, Ca, TlsLb) {
    let consul = Consul::start().await;
    let b = routed_backend(&consul).await;
    let ca = Ca::new(ca);
    let leaf = ca.leaf("a", &["a.test"]);
    let t = start_tls_lb(&consul, &leaf.source(), &[]).await;
    wait_routed(&t.lb, &Http::new(), "*/", 1).await;
    (consul, b, ca, t)
}

/// curl with the test CA, `host` resolved to loopback; returns (http_version, status, body).
fn curl(
    ca: &Ca,
    proto: &str,
    host: &str,
    port: u16,
    path: &str,
    extra: &[&str],
) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", proto, "--cacert"])
        .arg(ca.ca_pem())
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(["-w", "\n%{http_version} %{http_code}"])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "curl {proto} {host}: {stderr}");
    let (body, tail) = stdout.rsplit_once('\n').unwrap();
    (tail.to_string(), body.to_string())
}

pub struct TlsLb {
    pub lb: Lb,
    pub tls_port: u16,
}

pub async fn start_tls_lb(consul: &Consul, certs: &str, extra: &[(&str, &str)]) -> TlsLb {
    let tls_port = free_port();
    let listen = format!("127.0.0.1:{tls_port}");
    let mut env: Vec<(&str, &str)> = vec![("LB_TLS_LISTEN", &listen), ("LB_TLS_CERTS", certs)];
    env.extend_from_slice(extra);
    let lb = Lb::start(consul, &env).await;
    TlsLb { lb, tls_port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_each_hosts_certificate_over_http1_and_http2() {
    let consul = Consul::start().await;
    let _b = routed_backend(&consul).await;
    let ca = Ca::new("sni");
    let default = ca.leaf("default", &["default.test"]);
    let a = ca.leaf("a", &["a.test"]);
    let wild = ca.leaf("wild", &["*.b.test"]);
    let certs = [&default, &a, &wild].map(Leaf::source).join(",");
    let t = start_tls_lb(&consul, &certs, &[]).await;
    let http = Http::new();
    wait_routed(&t.lb, &http, "*/", 1).await;

    // curl verifies the certificate against the name it asked for: a wrong one fails.
    for host in ["a.test", "x.b.test", "default.test"] {
        let (v, body) = curl(&ca, "--http1.1", host, t.tls_port, "/", &[]);
        assert_eq!((v.as_str(), body.as_str()), ("1.1 200", "web-0"), "{host}");
        let (v, body) = curl(&ca, "--http2", host, t.tls_port, "/", &[]);
        assert_eq!((v.as_str(), body.as_str()), ("2 200", "web-0"), "{host}");
    }
    // A body over HTTP/2 reaches the HTTP/1.1 backend whole, and the backend learns it was HTTPS.
    let (v, body) = curl(
        &ca,
        "--http2",
        "a.test",
        t.tls_port,
        "/",
        &["--data-binary", "0123456789"],
    );
    assert_eq!((v.as_str(), body.as_str()), ("2 200", "web-0 len=10"));
    let (_, headers) = curl(&ca, "--http2", "a.test", t.tls_port, "/headers", &[]);
    assert!(headers.contains("x-forwarded-proto: https"), "{headers}");
    assert!(
        headers.contains(&format!("host: a.test:{}", t.tls_port)),
        "{headers}"
    );

    // The exact certificate, seen by a rustls client: an unknown name gets the default one.
    let client = ca.client();
    assert_eq!(
        tls_get(&client, t.tls_port, "a.test").await.unwrap().0,
        a.der
    );
    assert_eq!(
        tls_get(&client, t.tls_port, "y.b.test").await.unwrap().0,
        wild.der
    );
    let err = tls_get(&client, t.tls_port, "unknown.test")
        .await
        .unwrap_err();
    assert!(err.contains("handshake"), "{err}");

    let m = |name: &'static str, labels: &'static [(&'static str, &'static str)]| {
        let (lb, http) = (&t.lb, &http);
        async move { lb.metric(http, name, labels).await.unwrap_or(0.0) }
    };
    assert!(m("lb_tls_handshakes_total", &[("alpn", "h2")]).await >= 4.0);
    assert!(m("lb_tls_handshakes_total", &[("alpn", "http/1.1")]).await >= 3.0);
    assert!(
        m(
            "lb_client_connections_total",
            &[("protocol", "h2"), ("tls", "true")]
        )
        .await
            >= 4.0
    );
    assert!(
        m(
            "lb_tls_handshake_failures_total",
            &[("reason", "cert_rejected")]
        )
        .await
            >= 1.0,
        "the client refusing the default certificate for unknown.test is counted"
    );
    let not_after = m(
        "lb_tls_certificate_not_after_timestamp_seconds",
        &[("cert", "a.test")],
    )
    .await;
    assert_eq!(not_after, 2_493_072_000.0, "2049-01-01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_gets_a_clear_answer_and_silence_times_out() {
    let consul = Consul::start().await;
    let ca = Ca::new("plain");
    let leaf = ca.leaf("a", &["a.test"]);
    let certs = leaf.source();
    let t = start_tls_lb(&consul, &certs, &[("LB_TLS_HANDSHAKE_TIMEOUT", "1s")]).await;
    let http = Http::new();

    let r = http
        .get(&format!("http://127.0.0.1:{}/", t.tls_port))
        .await
        .expect("an HTTP answer, not a hang or a reset");
    assert_eq!(r.status, 400);
    assert!(r.body.contains("speaks HTTPS"), "{}", r.body);

    // A client that connects and says nothing is let go after the handshake timeout.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", t.tls_port))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed by the lb")
        .unwrap_or(0);
    assert_eq!(n, 0);
    for (reason, want) in [("not_tls", 1.0), ("timeout", 1.0)] {
        let got =
            t.lb.metric(
                &http,
                "lb_tls_handshake_failures_total",
                &[("reason", reason)],
            )
            .await;
        assert_eq!(got, Some(want), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_are_refused_at_start_and_at_reload() {
    let consul = Consul::start().await;
    let _b = routed_backend(&consul).await;
    let ca = Ca::new("bad");
    let good = ca.leaf("site", &["a.test"]);
    let certs = good.source();

    // At start: an expired certificate stops the lb with a message naming the file.
    let expired = ca.leaf_valid("old", &["a.test"], 2020, 2021);
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .env_clear()
        .env("LB_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("LB_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("LB_CONSUL_ADDR", consul.addr())
        .env("LB_TLS_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("LB_TLS_CERTS", expired.source())
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("old.crt: certificate expired at 2021-01-01T00:00:00Z"),
        "{stderr}"
    );

    let t = start_tls_lb(&consul, &certs, &[("LB_TLS_RELOAD_INTERVAL", "0s")]).await;
    let http = Http::new();
    wait_routed(&t.lb, &http, "*/", 1).await;
    let client = ca.client();
    let rejected = || {
        t.lb.metric(
            &http,
            "lb_tls_certificate_reloads_total",
            &[("result", "rejected")],
        )
    };

    // Each bad replacement is refused on SIGHUP, and the good certificate keeps serving.
    let other = ca.leaf("other", &["a.test"]);
    let bad_files: [(&str, Vec<u8>, Vec<u8>); 4] = [
        (
            "expired",
            std::fs::read(&expired.crt).unwrap(),
            std::fs::read(&expired.key).unwrap(),
        ),
        (
            "key of another certificate",
            std::fs::read(&other.crt).unwrap(),
            std::fs::read(&good.key).unwrap(),
        ),
        (
            "not PEM",
            b"garbage".to_vec(),
            std::fs::read(&good.key).unwrap(),
        ),
        ("no key", std::fs::read(&other.crt).unwrap(), b"".to_vec()),
    ];
    for (i, (what, crt, key)) in bad_files.iter().enumerate() {
        write_atomically(&good.crt, crt);
        write_atomically(&good.key, key);
        t.lb.signal(libc::SIGHUP);
        let want = (i + 1) as f64;
        eventually(
            &format!("{what} refused"),
            Duration::from_secs(10),
            || async { rejected().await == Some(want) },
        )
        .await;
        let (cert, status) = tls_get(&client, t.tls_port, "a.test").await.unwrap();
        assert_eq!((cert, status), (good.der.clone(), 200), "after {what}");
    }
    let log = t.lb.log();
    for needle in [
        "certificate expired at",
        "does not belong to certificate",
        "no PEM private key",
    ] {
        assert!(log.contains(needle), "{needle} not logged:\n{log}");
    }

    // A good replacement is taken.
    let fresh = ca.leaf("fresh", &["a.test"]);
    write_atomically(&good.crt, &std::fs::read(&fresh.crt).unwrap());
    write_atomically(&good.key, &std::fs::read(&fresh.key).unwrap());
    t.lb.signal(libc::SIGHUP);
    eventually(
        "the fresh certificate served",
        Duration::from_secs(10),
        || async {
            tls_get(&client, t.tls_port, "a.test")
                .await
                .is_ok_and(|(c, _)| c == fresh.der)
        },
    )
    .await;
}

/// Whether a new TLS connection resumed a session, after a request on it.
async fn resumed(connector: &tokio_rustls::TlsConnector, port: u16) -> bool {
    let (_, status, resumed) = tls_exchange(connector, port, "a.test").await.unwrap();
    assert_eq!(status, 200);
    resumed
}

/// A client's session resumes however many other clients came in between: the session
/// travels in the client's ticket. It was kept in a cache of the lb's, 256 sessions and two
/// per handshake, that some 130 clients pushed it out of, for a full handshake the next time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_however_many_clients_came_since() {
    let (_consul, _b, ca, t) = one_site("resume").await;

    let client = ca.resuming_client();
    assert!(
        !resumed(&client, t.tls_port).await,
        "the first connection has no session"
    );
    assert!(
        resumed(&client, t.tls_port).await,
        "the second resumes the first's"
    );
    // 200 other clients, each with sessions of its own.
    for _ in 0..200 {
        let other = ca.resuming_client();
        assert!(!resumed(&other, t.tls_port).await);
    }
    assert!(
        resumed(&client, t.tls_port).await,
        "the session outlived 200 other clients'"
    );
}

/// The session ticket a TLS 1.3 handshake ends with leaves with the first response, not in a
/// segment of its own that woke the client for it alone; and a handshake that fails still
/// tells the client why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_ticket_leaves_with_the_first_response() {
    let (_consul, _b, ca, t) = one_site("ticket").await;

    // The client's handshake is over once it has sent its Finished; the lb's, once it has
    // read it.
    let mut tls = tls_connect(&ca.resuming_client(), t.tls_port, "a.test")
        .await
        .unwrap();
    let mut peek = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), tls.get_ref().0.peek(&mut peek));
    assert!(
        early.await.is_err(),
        "the lb sent something before the request: the ticket, alone"
    );
    tls.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"), "{out:?}");
    assert_eq!(
        tls.get_ref().1.tls13_tickets_received(),
        1,
        "the ticket came with the response"
    );

    // A client with no protocol in common is told so by an alert before the lb lets go.
    let mut config = ca.client_config();
    config.alpn_protocols = vec![b"spdy/1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let err = tls_connect(&connector, t.tls_port, "a.test")
        .await
        .expect_err("no protocol in common");
    assert!(
        err.to_string().contains("NoApplicationProtocol"),
        "the client learnt no reason: {err}"
    );
}

/// A TLS connection on which a request offered a switch of protocols the lb did not make
/// still ends with the lb's `close_notify` (RFC 8446 6.1), which tells the client that it
/// has every byte. hyper ends such a connection as an upgrade and hands the stream on, where
/// it was dropped unclosed: the client saw an end of input that could have been a cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_upgrade_still_ends_with_close_notify() {
    let (_consul, _b, ca, t) = one_site("notify").await;
    let connector = ca.resuming_client();
    for offer in [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        "Upgrade: x",
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ] {
        let mut tls = tls_connect(&connector, t.tls_port, "a.test").await.unwrap();
        let requests = format!(
            "GET / HTTP/1.1\r\nHost: a.test\r\n{offer}\r\n\r\n\
             GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(requests.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let end = tls.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{offer}: {text}");
        if let Err(e) = end {
            panic!("{offer}: the connection ended without close_notify: {e}");
        }
    }
}

/// Flights the lb holds until it waits for the client reach the client: TLS 1.2's last one
/// (ticket, ChangeCipherSpec, Finished), which the client needs before it may send a request,
/// in a full handshake and a resumed one; and a TLS 1.3 HelloRetryRequest, which asks the
/// client for another key share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_and_retried_hellos_get_every_flight() {
    let consul = Consul::start().await;
    let _b = routed_backend(&consul).await;
    let ca = Ca::new("flights");
    let leaf = ca.leaf("a", &["a.test"]);
    let t = start_tls_lb(
        &consul,
        &leaf.source(),
        &[("LB_TLS_HANDSHAKE_TIMEOUT", "30s")],
    )
    .await;
    let http = Http::new();
    wait_routed(&t.lb, &http, "*/", 1).await;

    let tls12 = ca.tls12_client();
    for resumes in [false, true] {
        let exchange = tls_exchange(&tls12, t.tls_port, "a.test");
        let (_, status, resumed) = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("a TLS 1.2 client waited for the server's last flight")
            .unwrap();
        assert_eq!((status, resumed), (200, resumes));
    }

    // The client's one key share is for a group the lb does not have: it asks for another.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups.insert(0, &UNKNOWN_GROUP);
    let mut config = ca.client_config_with(provider, rustls::DEFAULT_VERSIONS);
    config.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = tls_connect(&connector, t.tls_port, "a.test");
    let tls = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .expect("the retried hello waited")
        .unwrap();
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::FullWithHelloRetryRequest)
    );
}

/// A key-exchange group the lb has not (P-521), with a share of the right length and no
/// key behind it: never chosen.
#[derive(Debug)]
struct UnknownGroup;
static UNKNOWN_GROUP: UnknownGroup = UnknownGroup;
struct UnknownShare([u8; 133]);

impl rustls::crypto::SupportedKxGroup for UnknownGroup {
    fn start(&self) -> Result<Box<dyn rustls::crypto::ActiveKeyExchange>, rustls::Error> {
        let mut share = [7u8; 133];
        share[0] = 4;
        Ok(Box::new(UnknownShare(share)))
    }
    fn name(&self) -> rustls::NamedGroup {
        rustls::NamedGroup::secp521r1
    }
}

impl rustls::crypto::ActiveKeyExchange for UnknownShare {
    fn complete(
        self: Box<Self>,
        _peer: &[u8],
    ) -> Result<rustls::crypto::SharedSecret, rustls::Error> {
        Err(rustls::Error::General("a share of no key".into()))
    }
    fn pub_key(&self) -> &[u8] {
        &self.0
    }
    fn group(&self) -> rustls::NamedGroup {
        rustls::NamedGroup::secp521r1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_nothing() {
    let consul = Consul::start().await;
    let _b = routed_backend(&consul).await;
    let ca = Ca::new("rotate");
    let live = ca.leaf("live", &["a.test"]);
    let certs = live.source();
    let t = start_tls_lb(&consul, &certs, &[("LB_TLS_RELOAD_INTERVAL", "100ms")]).await;
    let http = Http::new();
    wait_routed(&t.lb, &http, "*/", 1).await;

    // Clients on new connections (each one a handshake) and one long keep-alive h2load run.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, seen) = (stop.clone(), ok.clone(), failed.clone(), seen.clone());
        let client = ca.client();
        let port = t.tls_port;
        clients.push(tokio::spawn(async move {
            for _ in 0..5000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match tls_get(&client, port, "a.test").await {
                    Ok((cert, 200)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        seen.lock().unwrap().insert(cert.to_vec());
                    }
                    Ok((_, s)) => failed.lock().unwrap().push(format!("status {s}")),
                    Err(e) => failed.lock().unwrap().push(e),
                }
            }
        }));
    }
    let port = t.tls_port;
    let h2load = tokio::task::spawn_blocking(move || {
        Command::new("h2load")
            .args(["-c", "2", "-m", "4", "-D", "3"])
            .arg(format!("https://127.0.0.1:{port}/"))
            .output()
            .expect("h2load runs")
    });
    let mut rotated = vec![live.der.clone()];
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let next = ca.leaf(&format!("next-{i}"), &["a.test"]);
        write_atomically(&live.crt, &std::fs::read(&next.crt).unwrap());
        write_atomically(&live.key, &std::fs::read(&next.key).unwrap());
        rotated.push(next.der);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let h2 = h2load.await.unwrap();
    let h2out = String::from_utf8_lossy(&h2.stdout);

    let failed = failed.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let seen = seen.lock().unwrap().clone();
    let served = rotated.iter().filter(|c| seen.contains(c.as_ref())).count();
    println!("rotation: {ok} new-connection requests ok, 0 failed, {served}/6 certificates served");
    assert!(
        served >= 4,
        "rotations were picked up: {served} of 6 served"
    );
    let requests_line = h2out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("");
    println!("h2load during rotation: {requests_line}");
    assert!(requests_line.contains(" 0 failed, 0 errored"), "{h2out}");
    assert_eq!(
        t.lb.metric(
            &http,
            "lb_tls_certificate_reloads_total",
            &[("result", "rejected")]
        )
        .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_share_pooled_upstream_connections() {
    let consul = Consul::start().await;
    let _b = routed_backend(&consul).await;
    let ca = Ca::new("h2load");
    let leaf = ca.leaf("a", &["a.test"]);
    let certs = leaf.source();
    let t = start_tls_lb(&consul, &certs, &[("LB_H2C", "true")]).await;
    let http = Http::new();
    wait_routed(&t.lb, &http, "*/", 1).await;

    for url in [
        format!("https://127.0.0.1:{}/", t.tls_port),
        format!("http://{}/", t.lb.proxy),
    ] {
        let out = Command::new("h2load")
            .args(["-n", "4000", "-c", "4", "-m", "16"])
            .arg(&url)
            .output()
            .expect("h2load runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("requests:"))
            .unwrap_or("");
        println!("h2load {url}: {line}");
        assert!(
            line.contains("4000 succeeded, 0 failed, 0 errored"),
            "{text}"
        );
        assert!(
            text.contains("Application protocol: h2") || text.contains("h2c"),
            "{text}"
        );
    }
    // 64 streams at most in flight: the upstream pool holds about that many, not 8,000.
    let upstream =
        t.lb.metric(&http, "lb_upstream_connections_total", &[])
            .await
            .unwrap();
    println!("{upstream} upstream connections for 8000 requests");
    assert!(
        upstream <= 128.0,
        "{upstream} upstream connections for 8000 requests"
    );
    let h2c =
        t.lb.metric(
            &http,
            "lb_client_connections_total",
            &[("protocol", "h2"), ("tls", "false")],
        )
        .await;
    assert_eq!(h2c, Some(4.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_are_redirected_to_https_where_asked() {
    let consul = Consul::start().await;
    let secure = Backend::start("secure").await;
    let open = Backend::start("open").await;
    consul
        .register(
            "secure",
            "secure",
            secure.port(),
            &["lb.route=/account", "lb.redirect=https"],
        )
        .await;
    consul
        .register("open", "open", open.port(), &["lb.route=/"])
        .await;
    let ca = Ca::new("redirect");
    let leaf = ca.leaf("a", &["a.test"]);
    let certs = leaf.source();
    let t = start_tls_lb(&consul, &certs, &[("LB_HTTPS_PORT", "8443")]).await;
    let http = Http::new();
    wait_routed(&t.lb, &http, "*/account", 1).await;
    wait_routed(&t.lb, &http, "*/", 1).await;

    let r = http
        .get_host(&t.lb.url("/account/x?y=1"), "a.test")
        .await
        .unwrap();
    assert_eq!(r.status, 308);
    assert_eq!(r.headers["location"], "https://a.test:8443/account/x?y=1");
    let r = http.get_host(&t.lb.url("/home"), "a.test").await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "open"));
    let (v, body) = curl(&ca, "--http2", "a.test", t.tls_port, "/account/x", &[]);
    assert_eq!((v.as_str(), body.as_str()), ("2 200", "secure"));
    assert_eq!(
        t.lb.metric(&http, "lb_https_redirects_total", &[]).await,
        Some(1.0)
    );
}

/// `LB_MAX_CONNECTIONS` counts open connections, not accept loops: with a TLS listener beside
/// the plain one and two workers, four loops wait for connections, and all four places still
/// go to plain clients. The limit then holds the next one back, and the pause is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_place_under_the_connection_limit_serves_the_listener_in_use() {
    let consul = Consul::start().await;
    let _b = routed_backend(&consul).await;
    let ca = Ca::new("limit");
    let leaf = ca.leaf("a", &["a.test"]);
    let certs = leaf.source();
    let t = start_tls_lb(
        &consul,
        &certs,
        &[("LB_MAX_CONNECTIONS", "4"), ("LB_WORKERS", "2")],
    )
    .await;
    let http = Http::new();
    // Routing is checked on the admin listener, which holds no place.
    wait_routed(&t.lb, &http, "*/", 1).await;

    async fn ask(s: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        answer(s, within).await
    }
    /// The response to what was sent, up to the backend's name ending its body.
    async fn answer(s: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
        let mut got = Vec::new();
        let read = async {
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"web-0") {
                match s.read(&mut buf).await.unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(within, read).await.ok()?;
        Some(String::from_utf8_lossy(&got).into_owned())
    }
    let mut held = Vec::new();
    for i in 0..4 {
        let mut s = tokio::net::TcpStream::connect(t.lb.proxy).await.unwrap();
        let answer = ask(&mut s, Duration::from_secs(5)).await;
        let answer = answer.unwrap_or_else(|| panic!("connection {i} of 4 was not served"));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(s);
    }
    let mut waiting = tokio::net::TcpStream::connect(t.lb.proxy).await.unwrap();
    let early = ask(&mut waiting, Duration::from_secs(1)).await;
    assert_eq!(early, None, "served past the limit");
    assert_eq!(
        t.lb.metric(&http, "lb_accept_paused_total", &[]).await,
        Some(1.0),
        "one pause, whichever loops wait"
    );
    drop(held.pop());
    let late = answer(&mut waiting, Duration::from_secs(5)).await;
    let late = late.expect("served once a connection ended");
    assert!(late.starts_with("HTTP/1.1 200"), "{late}");
}
