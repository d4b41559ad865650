//! Protocol switches (WebSocket and the like): the client's request to switch, carried to the
//! backend, and the tunnel that copies bytes both ways once both sides switched.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::Version;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::peer::{Drain, Peer};
use crate::field_list;
use crate::metrics::{Held, UpgradeProtocol};
use crate::time::now_ms;
use crate::Shared;

/// A client's request to switch protocols (WebSocket and the like), carried to the backend.
pub(super) struct Upgrade {
    /// The `Upgrade` header value.
    pub(super) protocol: HeaderValue,
    pub(super) on_client: OnUpgrade,
    pub(super) peer: Arc<Peer>,
    /// Held by the tunnel once both sides switched; dropped with a declined upgrade.
    pub(super) pin: UpgradePin,
}

impl Upgrade {
    /// Carries a client's offer to switch protocols to the backend: the request keeps its
    /// `Upgrade` (hop-by-hop fields were just stripped) and hyper's handle on the client side
    /// of the switch. `None` when hyper gives no such handle (then the pin goes too).
    pub(super) fn carry(
        (protocol, pin): (HeaderValue, UpgradePin),
        parts: &mut http::request::Parts,
        peer: &Arc<Peer>,
    ) -> Option<Upgrade> {
        let on_client = parts.extensions.remove::<OnUpgrade>()?;
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
        Some(Upgrade {
            protocol,
            on_client,
            peer: peer.clone(),
            pin,
        })
    }
}

/// Keeps the client's connection from parking while it may become a tunnel (a parked read
/// would make up an end of input under it), and no longer: dropping it, when the backend
/// declines the upgrade or the request fails, gives the connection back its timeouts.
pub(super) struct UpgradePin(Arc<Peer>);

impl UpgradePin {
    pub(super) fn new(peer: &Arc<Peer>) -> UpgradePin {
        peer.exchanges.pin();
        UpgradePin(peer.clone())
    }
}

impl Drop for UpgradePin {
    fn drop(&mut self) {
        self.0.exchanges.unpin();
    }
}

/// The `Upgrade` header of an HTTP/1.1 request whose `Connection` header asks for it.
/// Only protocols in `allowed` (the lb's list) or `route_allowed` (what every backend of the
/// route opted in to) pass, and only when the client offers nothing else: an offer of
/// `h2c` (never allowed) would reach the backend as a plain request it might switch on anyway.
/// A request whose upgrade does not pass is forwarded without it (`Upgrade` is hop-by-hop).
pub(super) fn upgrade_request(
    headers: &HeaderMap,
    version: Version,
    allowed: &[String],
    route_allowed: &[String],
) -> Option<HeaderValue> {
    if version != Version::HTTP_11 || !field_list::contains(headers, &header::CONNECTION, "upgrade")
    {
        return None;
    }
    let value = headers.get(header::UPGRADE)?;
    let mut offered = field_list::items(value).peekable();
    offered.peek()?;
    offered
        .all(|p| {
            // `protocol-name ["/" protocol-version]` (RFC 9110 7.8)
            let name = p.split('/').next().unwrap_or(p);
            !name.eq_ignore_ascii_case("h2c")
                && (allowed.iter().chain(route_allowed)).any(|a| a.eq_ignore_ascii_case(name))
        })
        .then(|| value.clone())
}

/// Copies bytes both ways between the client and the backend once both sides switched
/// protocols, until either closes or the drain's time is up.
pub(super) fn spawn_tunnel(
    shared: Arc<Shared>,
    up: Upgrade,
    (upstream, early): (tokio::net::TcpStream, Bytes),
    backend: String,
) {
    let label = if up.protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
        UpgradeProtocol::Websocket
    } else {
        UpgradeProtocol::Other
    };
    let Upgrade {
        on_client,
        peer,
        pin,
        ..
    } = up;
    let Drain { alive, mut close } = peer.drain.clone();
    let client_addr = peer.addr;
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        let _alive = alive;
        // The connection is the tunnel's now: it must never park.
        let _pin = pin;
        let client = match on_client.await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(%backend, error = %e, "upgrade did not complete");
                return;
            }
        };
        let metrics = &shared.metrics;
        metrics.upgrades.inc(label);
        // Given back however the tunnel ends, its task dropped at exit included.
        let _open = Held::new(&metrics.upgraded_open);
        // Either direction's bytes keep the tunnel alive; `LB_TUNNEL_IDLE_TIMEOUT` of
        // neither closes it.
        let last = Arc::new(AtomicU64::new(now_ms()));
        let mut client = Active::new(TokioIo::new(client), &last);
        let mut upstream = Active::new(upstream, &last);
        let idle_ms = shared.config.tunnel_idle_timeout.as_millis() as u64;
        tokio::select! {
            r = async {
                // What the backend sent right behind its 101 head goes first.
                client.write_all(&early).await?;
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await
            } => {
                if let Err(e) = r {
                    tracing::debug!(%backend, client = %client_addr, error = %e, "tunnel ended with an error");
                }
            }
            _ = async { let _ = close.wait_for(|c| *c).await; } => {
                let _ = client.shutdown().await;
                let _ = upstream.shutdown().await;
            }
            _ = idle(&last, idle_ms) => {
                metrics.tunnel_idle_timeouts.inc();
                tracing::debug!(%backend, client = %client_addr, "tunnel idle; closed");
                let _ = client.shutdown().await;
                let _ = upstream.shutdown().await;
            }
        }
    });
}

/// Resolves once `last` (ms on `now_ms`'s clock) is `idle_ms` behind.
async fn idle(last: &AtomicU64, idle_ms: u64) {
    loop {
        let quiet = now_ms().saturating_sub(last.load(Ordering::Relaxed));
        if quiet >= idle_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(idle_ms - quiet)).await;
    }
}

/// One side of a tunnel, noting when bytes last came in from it.
struct Active<T> {
    io: T,
    last: Arc<AtomicU64>,
}

impl<T> Active<T> {
    fn new(io: T, last: &Arc<AtomicU64>) -> Active<T> {
        Active {
            io,
            last: last.clone(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(now_ms(), Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::headers::{to_http1_form, to_http2_form};
    use http::Request;

    #[test]
    fn upgrade_requests_and_protocol_forms() {
        let ws = vec!["websocket".to_string()];
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(
            upgrade_request(&h, Version::HTTP_11, &ws, &[])
                .as_ref()
                .map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(upgrade_request(&h, Version::HTTP_10, &ws, &[]), None);
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        assert_eq!(upgrade_request(&h, Version::HTTP_11, &ws, &[]), None);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let offer = |h: &mut HeaderMap, v: &'static str, allowed: &[String]| {
            h.insert(header::UPGRADE, HeaderValue::from_static(v));
            upgrade_request(h, Version::HTTP_11, allowed, &[]).is_some()
        };
        assert!(offer(&mut h, "WebSocket", &ws));
        assert!(!offer(&mut h, "h2c", &ws), "h2c is never forwarded");
        assert!(
            !offer(&mut h, "websocket, h2c", &ws),
            "nor offered beside another"
        );
        assert!(!offer(&mut h, "foo/2", &ws), "only allowed protocols");
        let foo = vec!["foo".to_string(), "h2c".to_string()];
        assert!(offer(&mut h, "foo/2", &foo));
        assert!(!offer(&mut h, "h2c", &foo), "not even when listed");
        assert!(!offer(&mut h, "", &foo));
        // A route's own list adds to the lb's.
        let mqtt = vec!["mqtt".to_string()];
        h.insert(header::UPGRADE, HeaderValue::from_static("MQTT, websocket"));
        assert!(upgrade_request(&h, Version::HTTP_11, &ws, &mqtt).is_some());
        assert!(upgrade_request(&h, Version::HTTP_11, &ws, &[]).is_none());
        assert!(upgrade_request(&h, Version::HTTP_11, &[], &mqtt).is_none());

        let (mut parts, ()) = Request::get("/a?b=1").body(()).unwrap().into_parts();
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("svc.example:8080"));
        to_http2_form(&mut parts);
        assert_eq!(parts.uri, "http://svc.example:8080/a?b=1");
        assert!(!parts.headers.contains_key(header::HOST));
        to_http1_form(&mut parts);
        assert_eq!(parts.uri, "/a?b=1");
        assert_eq!(parts.headers[header::HOST], "svc.example:8080");
        assert_eq!(parts.version, Version::HTTP_11);
    }
}
