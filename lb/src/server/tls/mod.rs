//! TLS termination: certificates from PEM files chosen by SNI, reloaded when their files change
//! or on SIGHUP, and the handshake with its failure accounting.
//!
//! The rustls `ServerConfig` is built once; its certificate resolver reads an `ArcSwap`ped
//! store, so a reload swaps certificates for new handshakes while open connections keep theirs,
//! and session tickets stay valid. A certificate that fails to load at reload time is reported
//! and the one it would have replaced stays in service.

mod socket;
pub mod x509;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::CertSource;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

pub use self::socket::TlsIo;
use crate::metrics::{CertReload, HandshakeFailure, Metrics, TlsAlpn, TlsVersion};
use crate::time::format_utc;

/// ALPN protocol ids.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a certificate could not be used. The message names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no PEM CERTIFICATE block found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key block found (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: unreadable certificate: {detail}")]
    BadCertificate { path: PathBuf, detail: String },
    #[error("{path}: the private key does not belong to certificate {cert} ({detail})")]
    KeyMismatch {
        path: PathBuf,
        cert: PathBuf,
        detail: String,
    },
    #[error("{path}: certificate expired at {at}")]
    Expired { path: PathBuf, at: String },
    #[error("{path}: certificate not valid before {at}")]
    NotYetValid { path: PathBuf, at: String },
}

/// A certificate in service, with what its files held when it was loaded.
struct Loaded {
    source: CertSource,
    files: (Vec<u8>, Vec<u8>),
    key: Arc<CertifiedKey>,
    info: x509::CertInfo,
    /// The metric label: its first DNS name, else its file name.
    label: String,
}

/// The certificates and the SNI index over them.
struct Store {
    certs: Vec<Arc<Loaded>>,
    exact: HashMap<String, usize>,
    /// `*.example.com` indexed as `example.com`.
    wildcard: HashMap<String, usize>,
}

impl Store {
    fn new(certs: Vec<Arc<Loaded>>) -> Store {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // Earlier entries win a name two certificates both cover.
        for (i, c) in certs.iter().enumerate().rev() {
            for name in &c.info.dns_names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.insert(parent.to_string(), i),
                    None => exact.insert(name.clone(), i),
                };
            }
        }
        Store {
            certs,
            exact,
            wildcard,
        }
    }

    /// The certificate for a server name: an exact name, then a wildcard one label up, then
    /// the first certificate (also for clients that send no SNI).
    fn pick(&self, sni: Option<&str>) -> &Arc<Loaded> {
        let i = sni
            .and_then(|name| {
                let name = name.trim_end_matches('.');
                let lower;
                let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    lower = name.to_ascii_lowercase();
                    &lower
                } else {
                    name
                };
                self.exact.get(name).copied().or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .unwrap_or(0);
        &self.certs[i]
    }
}

#[derive(Debug)]
struct Resolver {
    store: ArcSwap<Store>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("certs", &self.certs.len())
            .finish()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.store.load().pick(hello.server_name()).key.clone())
    }
}

/// The TLS side of the lb: the acceptor for the listener and the certificates behind it.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
    handshake_timeout: Duration,
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub replaced: usize,
    pub rejected: usize,
}

impl Tls {
    /// Loads every certificate; at start-up any failure is fatal, with every error listed.
    pub fn new(
        sources: &[CertSource],
        http2: bool,
        handshake_timeout: Duration,
        metrics: &Metrics,
    ) -> Result<Tls, String> {
        let mut certs = Vec::new();
        let mut errors = Vec::new();
        for s in sources {
            match load(s) {
                Ok(c) => certs.push(Arc::new(c)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("\n"));
        }
        if certs.is_empty() {
            return Err("no certificates configured".into());
        }
        for c in &certs {
            if c.info.dns_names.is_empty() {
                tracing::warn!(cert = %c.source.cert.display(), "certificate has no DNS names: only served to clients without a matching SNI");
            }
            publish_expiry(metrics, c, None);
        }
        let resolver = Arc::new(Resolver {
            store: ArcSwap::from_pointee(Store::new(certs)),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS settings: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = if http2 {
            vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
        } else {
            vec![ALPN_HTTP11.to_vec()]
        };
        config.ignore_client_order = true;
        // Sessions travel in the client's ticket, sealed with keys rustls makes at start and
        // rotates every 6 hours. rustls' default kept them in a cache of 256 sessions, two
        // per handshake: after some 130 other clients a client's session was gone, and its
        // next connection paid a full handshake (a signature and a key exchange, where a
        // resumption needs only the exchange). A TLS 1.3 resumption still exchanges keys, so
        // a ticket key that leaks opens none of those sessions; a TLS 1.2 resumption takes
        // its keys from the ticket, as with nginx's and HAProxy's default tickets. Early data,
        // which a ticket used twice could replay, stays off (rustls allows none with
        // stateless tickets).
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| format!("TLS session ticket keys: {e}"))?;
        // One ticket per handshake, for the client's next connection, where rustls sends two.
        // OpenSSL servers (nginx, HAProxy) send one after each resumption and two after a full
        // handshake; a client that opens several connections at once right after its first
        // then resumes one of them, not two. Each ticket costs the client a key derivation
        // and a session to store, and the lb three draws of randomness and a sealing. A
        // client that asks for more (RFC 9149 `ticket_request`) gets up to two.
        config.send_tls13_tickets = 1;
        config.max_tls13_tickets = 2;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            handshake_timeout,
        })
    }

    /// Re-reads every certificate whose files changed. A file that fails to load is reported
    /// and the certificate it would have replaced stays.
    pub fn reload(&self, metrics: &Metrics) -> ReloadOutcome {
        let current = self.resolver.store.load_full();
        let mut outcome = ReloadOutcome::default();
        let mut next = Vec::with_capacity(current.certs.len());
        for old in &current.certs {
            let files = match read_files(&old.source) {
                Ok(f) => f,
                Err(e) => {
                    reject(metrics, &mut outcome, &e);
                    next.push(old.clone());
                    continue;
                }
            };
            if files == old.files {
                next.push(old.clone());
                continue;
            }
            match load_settled(&old.source, files) {
                Ok(new) => {
                    tracing::info!(cert = %new.source.cert.display(), names = ?new.info.dns_names,
                        not_after = %format_utc(new.info.not_after), "certificate reloaded");
                    metrics.tls_cert_reloads.inc(CertReload::Replaced);
                    publish_expiry(metrics, &new, Some(old));
                    outcome.replaced += 1;
                    next.push(Arc::new(new));
                }
                Err(e) => {
                    reject(metrics, &mut outcome, &e);
                    next.push(old.clone());
                }
            }
        }
        if outcome.replaced > 0 {
            self.resolver.store.store(Arc::new(Store::new(next)));
        }
        outcome
    }

    /// The DNS names of the certificate a client asking for `sni` gets (admin and tests).
    pub fn names_for(&self, sni: Option<&str>) -> Vec<String> {
        self.resolver.store.load().pick(sni).info.dns_names.clone()
    }

    /// The handshake, bounded by the handshake timeout. A client that speaks plain HTTP to the
    /// TLS port gets a 400 that says so instead of a silent close. Failures are counted by
    /// reason and come back as `None`.
    pub async fn accept(&self, stream: TcpStream, metrics: &Metrics) -> Option<TlsStream<TlsIo>> {
        let fail = |reason: HandshakeFailure| {
            metrics.tls_handshake_failures.inc(reason);
            None
        };
        let handshake = async {
            // A real read, not a peek: the bytes go to the handshake through `TlsIo`, and
            // the look costs no system call of its own.
            let mut stream = stream;
            let first =
                std::future::poll_fn(|cx| super::poll_first_read(&mut stream, cx, <[u8]>::to_vec));
            let first = match first.await {
                Ok(Some(first)) => first,
                Ok(None) => return Err(HandshakeFailure::Eof),
                Err(_) => return Err(HandshakeFailure::Io),
            };
            // 0x16 opens every TLS handshake record.
            if first[0] != 0x16 {
                if first[0].is_ascii_alphabetic() {
                    let _ = stream.write_all(PLAIN_HTTP_ON_TLS_PORT).await;
                }
                let _ = stream.shutdown().await;
                return Err(HandshakeFailure::NotTls);
            }
            match self
                .acceptor
                .accept(TlsIo::new(stream, first))
                .into_fallible()
                .await
            {
                Ok(mut tls) => {
                    let tls13 = tls.get_ref().1.protocol_version()
                        == Some(rustls::ProtocolVersion::TLSv1_3);
                    let io = tls.get_mut().0;
                    io.handshake_done();
                    if !tls13 {
                        std::future::poll_fn(|cx| io.poll_send_held(cx))
                            .await
                            .map_err(|_| HandshakeFailure::Io)?;
                    }
                    Ok(tls)
                }
                Err((e, mut io)) => {
                    // The alert that says why; the timeout around this bounds the wait.
                    let _ = std::future::poll_fn(|cx| io.poll_send_held(cx)).await;
                    Err(handshake_failure_reason(&e))
                }
            }
        };
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Err(_) => fail(HandshakeFailure::Timeout),
            Ok(Err(reason)) => fail(reason),
            Ok(Ok(tls)) => {
                let conn = tls.get_ref().1;
                let version = match conn.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::V1_3,
                    _ => TlsVersion::V1_2,
                };
                let alpn = match conn.alpn_protocol() {
                    Some(ALPN_H2) => TlsAlpn::H2,
                    Some(ALPN_HTTP11) => TlsAlpn::Http1,
                    _ => TlsAlpn::None,
                };
                metrics
                    .tls_handshakes
                    .with_label_values(&[version.as_str(), alpn.as_str()])
                    .inc();
                Some(tls)
            }
        }
    }
}

const PLAIN_HTTP_ON_TLS_PORT: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: 71\r\n\r\n\
switchyard: this port speaks HTTPS; the request was sent as plain HTTP\n";

/// Bounded label values for handshake failures.
fn handshake_failure_reason(e: &io::Error) -> HandshakeFailure {
    use rustls::{AlertDescription as A, Error as E};
    use HandshakeFailure as F;
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => F::Eof,
            _ => F::Io,
        };
    };
    match tls {
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::PeerMisbehaved(_) => {
            F::Malformed
        }
        E::InappropriateHandshakeMessage { .. } => F::Malformed,
        E::PeerIncompatible(_) | E::NoApplicationProtocol => F::Incompatible,
        E::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::UnsupportedCertificate
            | A::CertificateRevoked,
        ) => F::CertRejected,
        E::AlertReceived(A::ProtocolVersion | A::HandshakeFailure | A::InsufficientSecurity) => {
            F::Incompatible
        }
        E::AlertReceived(_) => F::Alert,
        _ => F::Other,
    }
}

/// How long a reload waits for the second file of a pair that is being replaced.
const PAIR_SETTLE: Duration = Duration::from_millis(250);

/// Loads a certificate from files just read; when its key does not match, reads both again
/// once after `PAIR_SETTLE`. Certificate and key are replaced as two files (each atomically,
/// as secret managers do), and a reload between the two sees a new chain with the old key:
/// that is a pair in the middle of its replacement, not a bad one.
fn load_settled(s: &CertSource, files: (Vec<u8>, Vec<u8>)) -> Result<Loaded, CertError> {
    match load_from(s, files.clone()) {
        Err(CertError::KeyMismatch { .. }) => {
            std::thread::sleep(PAIR_SETTLE);
            let again = read_files(s)?;
            if again == files {
                return load_from(s, files);
            }
            load_from(s, again)
        }
        loaded => loaded,
    }
}

fn reject(metrics: &Metrics, outcome: &mut ReloadOutcome, e: &CertError) {
    tracing::error!(error = %e, "certificate rejected; the one in service stays");
    metrics.tls_cert_reloads.inc(CertReload::Rejected);
    outcome.rejected += 1;
}

fn publish_expiry(metrics: &Metrics, new: &Loaded, old: Option<&Arc<Loaded>>) {
    if let Some(old) = old.filter(|o| o.label != new.label) {
        let _ = metrics
            .tls_cert_not_after
            .remove_label_values(&[&old.label]);
    }
    metrics
        .tls_cert_not_after
        .with_label_values(&[&new.label])
        .set(new.info.not_after);
}

fn read_files(s: &CertSource) -> Result<(Vec<u8>, Vec<u8>), CertError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| CertError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let cert = read(&s.cert)?;
    let key = if s.key == s.cert {
        cert.clone()
    } else {
        read(&s.key)?
    };
    Ok((cert, key))
}

fn load(s: &CertSource) -> Result<Loaded, CertError> {
    let files = read_files(s)?;
    load_from(s, files)
}

/// Parses and checks one certificate: a chain, a key that belongs to it, and a validity window
/// that includes now.
fn load_from(s: &CertSource, files: (Vec<u8>, Vec<u8>)) -> Result<Loaded, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.0)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadCertificate {
            path: s.cert.clone(),
            detail: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: s.cert.clone(),
        });
    };
    let info = x509::parse(leaf).map_err(|detail| CertError::BadCertificate {
        path: s.cert.clone(),
        detail: detail.to_string(),
    })?;
    let key = PrivateKeyDer::from_pem_slice(&files.1).map_err(|_| CertError::NoKey {
        path: s.key.clone(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let key =
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| CertError::KeyMismatch {
            path: s.key.clone(),
            cert: s.cert.clone(),
            detail: e.to_string(),
        })?;
    let now = switchyard_daemon::clock::since_epoch().as_secs() as i64;
    if now > info.not_after {
        return Err(CertError::Expired {
            path: s.cert.clone(),
            at: format_utc(info.not_after),
        });
    }
    if now < info.not_before {
        return Err(CertError::NotYetValid {
            path: s.cert.clone(),
            at: format_utc(info.not_before),
        });
    }
    let label = info.dns_names.first().cloned().unwrap_or_else(|| {
        s.cert
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    Ok(Loaded {
        source: s.clone(),
        files,
        key: Arc::new(key),
        info,
        label,
    })
}

/// Reloads certificates every `interval` (when not zero) and on SIGHUP until `stop` flips.
pub async fn watch_certificates(
    tls: Arc<Tls>,
    shared: Arc<crate::Shared>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; certificates reload on the timer only");
            None
        }
    };
    let mut ticker = (!interval.is_zero()).then(|| {
        let mut t = tokio::time::interval(interval);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    if let Some(t) = ticker.as_mut() {
        // The first tick is immediate; the certificates were just loaded.
        t.tick().await;
    }
    loop {
        let tick = async {
            match ticker.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let hup_recv = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick => {}
            _ = hup_recv => tracing::info!("SIGHUP: reloading certificates"),
            _ = stop.changed() => return,
        }
        let tls = tls.clone();
        let shared2 = shared.clone();
        // File reads and key parsing stay off the request threads' hot loop.
        let _ = tokio::task::spawn_blocking(move || tls.reload(&shared2.metrics)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_answer_is_well_formed() {
        let text = std::str::from_utf8(PLAIN_HTTP_ON_TLS_PORT).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }

    #[test]
    fn utc_formatting() {}
}
