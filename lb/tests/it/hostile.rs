//! Hostile and malformed input at the edge, as raw bytes or with real clients that can say what
//! a polite client would not: the lb must route on the name it forwards, refuse what the RFCs
//! call malformed, and never let one request's input change how another is handled.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::balancing::wait_routed;
use crate::support::{Backend, Consul, Http, Lb};

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
