//! Protocols beyond request/response over HTTP/1.1: WebSocket tunnels (tokio-tungstenite on both
//! ends) and gRPC over HTTP/2 to a tonic backend, unary and bidirectional streaming.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use futures_util::{SinkExt, Stream, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::Service;
use tonic::{Status, Streaming};

use crate::balancing::wait_routed;
use crate::support::{Consul, Http, Lb};

/// A WebSocket server on 127.0.0.1:0 that echoes every text and binary message.
async fn ws_echo_backend() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, task)
}

/// [`ws_echo_backend`], registered as instance `ws-0` of a service routed at `/ws`.
async fn ws_echo_routed(consul: &Consul) -> tokio::task::JoinHandle<()> {
    let (port, backend) = ws_echo_backend().await;
    consul
        .register_with("ws-0", "ws", port, &["lb.route=/ws"], None)
        .await;
    backend
}

/// A WebSocket over TLS is tunnelled as one over plain HTTP is: hyper hands the TLS stream
/// to the tunnel, and the lb's close of a connection whose switch it did not make leaves it
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls_is_tunnelled() {
    let consul = Consul::start().await;
    let _backend = ws_echo_routed(&consul).await;
    let ca = crate::tls::Ca::new("wss");
    let leaf = ca.leaf("a", &["a.test"]);
    let t = crate::tls::start_tls_lb(&consul, &leaf.source(), &[]).await;
    wait_routed(&t.lb, &Http::new(), "*/ws", 1).await;

    let tls = crate::tls::tls_connect(&ca.resuming_client(), t.tls_port, "a.test")
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://a.test/ws/chat", tls)
        .await
        .expect("WebSocket handshake over TLS through the lb");
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap(), format!("hello {i}"));
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_lb_and_its_drain() {
    let consul = Consul::start().await;
    let _backend = ws_echo_routed(&consul).await;
    let mut lb = Lb::start(&consul, &[("LB_SHUTDOWN_TIMEOUT", "2s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/ws", 1).await;

    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws/chat", lb.proxy))
        .await
        .expect("WebSocket handshake through the lb");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap(), format!("hello {i}"));
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data(), blob);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);

    let metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| {
        let (lb, http) = (&lb, &http);
        async move { lb.metric(http, name, labels).await }
    };
    assert_eq!(
        metric("lb_upgrades_total", &[("protocol", "websocket")]).await,
        Some(1.0)
    );
    crate::support::eventually(
        "the tunnel counted closed",
        Duration::from_secs(5),
        || async { metric("lb_upgraded_connections_open", &[]).await == Some(0.0) },
    )
    .await;

    // On SIGTERM an open WebSocket keeps working until the shutdown timeout, then is closed.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", lb.proxy))
        .await
        .unwrap();
    lb.signal(libc::SIGTERM);
    let drain_started = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_text().unwrap(),
        "still here"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the lb closes the tunnel at the end of the drain");
    let closed_after = drain_started.elapsed();
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    assert!(
        closed_after >= Duration::from_millis(1500),
        "{closed_after:?}"
    );
    assert_eq!(lb.wait_exit(Duration::from_secs(10)).await, Some(0));
    println!("WebSocket closed {closed_after:?} after SIGTERM (shutdown timeout 2s)");
}

/// Messages are raw bytes: no protobuf code generation needed for a proxy test.
#[derive(Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> Self {
        *self
    }
    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

type BoxStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// `/test.Echo/Unary`: `pong:<msg>`, or NOT_FOUND for `missing`.
struct Unary;

impl Service<tonic::Request<Bytes>> for Unary {
    type Response = tonic::Response<Bytes>;
    type Error = Status;
    type Future = std::future::Ready<Result<Self::Response, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let msg = req.into_inner();
        std::future::ready(if &msg[..] == b"missing" {
            Err(Status::not_found("no such thing here"))
        } else {
            let mut out = b"pong:".to_vec();
            out.extend_from_slice(&msg);
            Ok(tonic::Response::new(out.into()))
        })
    }
}

/// `/test.Echo/Chat`: answers each message as it arrives with `echo:<msg>`.
struct Chat;

impl Service<tonic::Request<Streaming<Bytes>>> for Chat {
    type Response = tonic::Response<BoxStream>;
    type Error = Status;
    type Future = std::future::Ready<Result<Self::Response, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: tonic::Request<Streaming<Bytes>>) -> Self::Future {
        let replies = req.into_inner().map(|m| {
            m.map(|m| {
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(&m);
                Bytes::from(out)
            })
        });
        std::future::ready(Ok(tonic::Response::new(Box::pin(replies) as BoxStream)))
    }
}

#[derive(Clone)]
struct EchoServer;

impl Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(BytesCodec);
            Ok(match req.uri().path() {
                "/test.Echo/Unary" => grpc.unary(Unary, req).await,
                "/test.Echo/Chat" => grpc.streaming(Chat, req).await,
                _ => Status::unimplemented("unknown method").into_http(),
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_through_the_lb() {
    let consul = Consul::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        EchoServer,
        tonic::transport::server::TcpIncoming::from(listener),
    ));
    consul
        .register_with(
            "grpc-0",
            "grpc",
            port,
            &["lb.route=/test.Echo", "lb.proto=h2c"],
            None,
        )
        .await;
    let lb = Lb::start(&consul, &[("LB_H2C", "true")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/test.Echo", 1).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", lb.proxy))
        .unwrap()
        .connect()
        .await
        .expect("h2c connection to the lb");
    let mut client = tonic::client::Grpc::new(channel);

    for i in 0..50 {
        client.ready().await.unwrap();
        let reply = client
            .unary(
                tonic::Request::new(Bytes::from(format!("ping {i}"))),
                PathAndQuery::from_static("/test.Echo/Unary"),
                BytesCodec,
            )
            .await
            .expect("unary call");
        assert_eq!(reply.into_inner(), format!("pong:ping {i}"));
    }

    // The status travels in trailers: it arrives only if the lb passes them both ways.
    client.ready().await.unwrap();
    let err = client
        .unary(
            tonic::Request::new(Bytes::from_static(b"missing")),
            PathAndQuery::from_static("/test.Echo/Unary"),
            BytesCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "no such thing here");

    // Bidirectional: each message is answered before the next is sent.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    client.ready().await.unwrap();
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let mut inbound = client
        .streaming(
            tonic::Request::new(outbound),
            PathAndQuery::from_static("/test.Echo/Chat"),
            BytesCodec,
        )
        .await
        .expect("streaming call")
        .into_inner();
    assert_eq!(inbound.message().await.unwrap().unwrap(), "echo:first");
    for i in 0..20 {
        tx.send(Bytes::from(format!("m{i}"))).await.unwrap();
        assert_eq!(
            inbound.message().await.unwrap().unwrap(),
            format!("echo:m{i}")
        );
    }
    drop(tx);
    assert_eq!(
        inbound.message().await.unwrap(),
        None,
        "clean end with OK status"
    );

    // One upstream connection carried every call.
    assert_eq!(
        lb.metric(&http, "lb_upstream_connections_total", &[]).await,
        Some(1.0)
    );
}

/// A backend that declines an upgrade (answers 200) leaves a plain HTTP/1.1 connection, which
/// must keep its header timeout: a half-sent head afterwards is closed on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_upgrade_leaves_the_header_timeout_in_force() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let consul = Consul::start().await;
    let backend = crate::support::Backend::start("plain").await;
    consul
        .register("plain", "web", backend.port(), &["lb.route=/"])
        .await;
    let lb = Lb::start(&consul, &[("LB_CLIENT_HEADER_TIMEOUT", "1s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;

    let mut s = tokio::net::TcpStream::connect(lb.proxy).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("plain") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer to the declined upgrade")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Half a head, then silence: closed at the header timeout (1 s), not held open.
    s.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a half-sent head after a declined upgrade was still open after 5 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
}

/// `Upgrade: h2c` through a proxy smuggles an HTTP/2 connection past its per-request policy;
/// an upgrade to a protocol not allowed (`LB_UPGRADE_PROTOCOLS`, default websocket) is not
/// forwarded either. Both reach the backend as plain requests without the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_unlisted_upgrades_are_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let consul = Consul::start().await;
    let backend = crate::support::Backend::start("plain").await;
    consul
        .register("plain", "web", backend.port(), &["lb.route=/"])
        .await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    for (upgrade, connection) in [
        ("h2c", "Upgrade, HTTP2-Settings"),
        ("websocket, h2c", "upgrade"),
        ("foo/1", "upgrade"),
    ] {
        let mut s = tokio::net::TcpStream::connect(lb.proxy).await.unwrap();
        let req = format!(
            "GET /headers HTTP/1.1\r\nHost: x\r\nConnection: {connection}, close\r\n\
             Upgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{upgrade}: {answer}");
        let (_, echoed) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            !echoed.contains("upgrade:"),
            "{upgrade} was forwarded: {echoed}"
        );
        if connection.contains("HTTP2-Settings") {
            // Named in Connection: hop-by-hop, like the Upgrade it goes with.
            assert!(!echoed.contains("http2-settings"), "{upgrade}: {echoed}");
        }
        assert!(
            !echoed.contains("connection: upgrade"),
            "{upgrade}: {echoed}"
        );
    }
}

/// A raw backend that switches to protocol `foo` when asked (then echoes bytes) and otherwise
/// answers 200 with `plain` and closes: what it was offered shows in its answer.
async fn foo_switching_backend() -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Some(head) = crate::support::read_head(&mut s).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&head).to_lowercase();
                if head.contains("\r\nupgrade: foo") {
                    let switch = "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\
                                  Upgrade: foo\r\n\r\n";
                    if s.write_all(switch.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nplain")
                        .await;
                }
            });
        }
    });
    (port, task)
}

/// Beyond the lb's list (`LB_UPGRADE_PROTOCOLS`), a route opts in to a protocol with the tag
/// `lb.upgrade=`, and only when every instance of the route carries it: a switch must not
/// reach an instance that did not ask for it. Elsewhere the offer is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_opts_in_to_an_upgrade_protocol() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let consul = Consul::start().await;
    let (a, _ta) = foo_switching_backend().await;
    let (b, _tb) = foo_switching_backend().await;
    let (c, _tc) = foo_switching_backend().await;
    let (d, _td) = foo_switching_backend().await;
    consul
        .register_with(
            "foo-0",
            "foo",
            a,
            &["lb.route=/foo", "lb.upgrade=FOO"],
            None,
        )
        .await;
    consul
        .register_with("plain-0", "plain", b, &["lb.route=/plain"], None)
        .await;
    // Two instances of one route; only one asked for `foo`.
    consul
        .register_with(
            "mixed-0",
            "mixed",
            c,
            &["lb.route=/mixed", "lb.upgrade=foo"],
            None,
        )
        .await;
    consul
        .register_with("mixed-1", "mixed", d, &["lb.route=/mixed"], None)
        .await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/foo", 1).await;
    wait_routed(&lb, &http, "*/plain", 1).await;
    wait_routed(&lb, &http, "*/mixed", 2).await;

    for (path, switched) in [("/foo/x", true), ("/plain/x", false), ("/mixed/x", false)] {
        let mut s = tokio::net::TcpStream::connect(lb.proxy).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "{path}: closed");
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer).to_lowercase();
        if switched {
            assert!(text.starts_with("http/1.1 101"), "{path}: {text}");
            assert!(text.contains("upgrade: foo"), "{path}: {text}");
            s.write_all(b"ping").await.unwrap();
            let mut echo = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
                .await
                .expect("the tunnel echoes")
                .unwrap();
            assert_eq!(&echo, b"ping");
        } else {
            assert!(text.starts_with("http/1.1 200"), "{path}: {text}");
        }
    }
    let other = lb
        .metric(&http, "lb_upgrades_total", &[("protocol", "other")])
        .await;
    assert_eq!(other, Some(1.0));

    // A malformed or h2c opt-in is refused per tag and counted, as any bad tag.
    consul
        .register_with(
            "bad-0",
            "bad",
            a,
            &["lb.route=/bad", "lb.upgrade=h2c"],
            None,
        )
        .await;
    wait_routed(&lb, &http, "*/bad", 1).await;
    let refused = lb
        .metric(
            &http,
            "lb_route_tag_errors_total",
            &[("reason", "bad_upgrade")],
        )
        .await;
    assert_eq!(refused, Some(1.0));
}

/// A tunnel that carries bytes stays up however long it lasts; one idle for
/// `LB_TUNNEL_IDLE_TIMEOUT` is closed and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_are_closed_and_busy_ones_kept() {
    let consul = Consul::start().await;
    let _backend = ws_echo_routed(&consul).await;
    let lb = Lb::start(&consul, &[("LB_TUNNEL_IDLE_TIMEOUT", "2s")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/ws", 1).await;
    let url = format!("ws://{}/ws/chat", lb.proxy);

    let (mut busy, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    for i in 0..15 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy.send(Message::text(format!("{i}"))).await.unwrap();
        let back = busy.next().await.unwrap().unwrap();
        assert_eq!(
            back.into_text().unwrap(),
            format!("{i}"),
            "busy for twice the timeout, still up"
        );
    }
    busy.close(None).await.unwrap();
    drop(busy);

    let (mut quiet, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        while let Some(Ok(_)) = quiet.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "an idle tunnel was still open after 8 s");
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert_eq!(
        lb.metric(&http, "lb_tunnel_idle_timeouts_total", &[]).await,
        Some(1.0)
    );
}

/// A tunnel keeps its connection's place under `LB_MAX_CONNECTIONS` for as long as it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_against_the_connection_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let consul = Consul::start().await;
    let _backend = ws_echo_routed(&consul).await;
    let lb = Lb::start(&consul, &[("LB_MAX_CONNECTIONS", "2")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/ws", 1).await;
    let url = format!("ws://{}/ws/chat", lb.proxy);
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    first.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        first.next().await.unwrap().unwrap().into_text().unwrap(),
        "still here"
    );

    let mut third = tokio::net::TcpStream::connect(lb.proxy).await.unwrap();
    third
        .write_all(b"GET /ws/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let early = tokio::time::timeout(Duration::from_secs(1), third.read_to_end(&mut answer)).await;
    assert!(
        early.is_err(),
        "served past the limit while two tunnels were open"
    );
    drop(second);
    tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut answer))
        .await
        .expect("served once a tunnel ended")
        .unwrap();
    assert!(!answer.is_empty());
}
