//! Connections to the agent: plain TCP for `http://` addresses, TLS (rustls) for `https://`,
//! a Unix socket for `unix://`, with the CA and the optional client certificate read from files once, at start. Owns the
//! byte stream only; knows nothing of Consul's API, tokens or what is read.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Where a CA bundle sits on Debian, Ubuntu and Alpine: an `https://` address without a CA
/// file of its own is verified against the system's roots (`SSL_CERT_FILE`, else this).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// A TLS handshake that takes longer is an agent that accepted and stalled.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(5);

/// How to reach an `https://` agent. Every file is read once, when the client is built.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM certificates the agent's certificate must chain to (`CONSUL_CACERT`).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain and key presented to an agent that verifies clients
    /// (`verify_incoming_https`); both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the agent's certificate must carry, when the address's host is not it
    /// (`CONSUL_TLS_SERVER_NAME`; Consul's own certificates name `server.<dc>.consul`).
    pub server_name: Option<String>,
}

/// Why a TLS file cannot be used; names the file, and the setting (after its prefix) that
/// named it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct TlsError {
    pub setting: &'static str,
    pub file: String,
    pub reason: String,
}

const CA: &str = "CONSUL_CACERT";
const CERT: &str = "CONSUL_CLIENT_CERT";
const KEY: &str = "CONSUL_CLIENT_KEY";

fn tls_error(setting: &'static str, file: &Path, reason: impl Into<String>) -> TlsError {
    TlsError {
        setting,
        file: file.display().to_string(),
        reason: reason.into(),
    }
}

fn read(setting: &'static str, file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|e| tls_error(setting, file, e.to_string()))
}

fn certificates(
    setting: &'static str,
    file: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(setting, file)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(setting, file, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(setting, file, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The rustls side of an `https://` client, from `files`.
pub(crate) fn tls_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let ca = match &files.ca_file {
        Some(file) => file.clone(),
        None => {
            let system = std::env::var_os("SSL_CERT_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(SYSTEM_ROOTS));
            if !system.exists() {
                return Err(tls_error(
                    CA,
                    &system,
                    "no CA file is set and the system has no CA bundle here (the Switchyard \
                     images have none): set the CA file the agent's certificate chains to",
                ));
            }
            system
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(CA, &ca)? {
        roots
            .add(cert)
            .map_err(|e| tls_error(CA, &ca, format!("not a usable CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(CA, &ca, e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&files.cert_file, &files.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certificates(CERT, cert)?;
            let pem = read(KEY, key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| tls_error(KEY, key, format!("no PEM private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| tls_error(CERT, cert, format!("does not go with its key: {e}")))?
        }
        (Some(file), None) => {
            return Err(tls_error(
                KEY,
                file,
                "a client certificate needs its key file too",
            ))
        }
        (None, Some(file)) => {
            return Err(tls_error(
                CERT,
                file,
                "a client key needs its certificate file too",
            ))
        }
    };
    // The agent's HTTP API speaks HTTP/1.1 on its TLS port.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the HTTP client dials through: TCP, then TLS when the client was built for it; or
/// the agent's Unix socket, whatever the request's host.
#[derive(Clone)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    tls: Option<(TlsConnector, Option<ServerName<'static>>)>,
    unix: Option<Arc<Path>>,
}

impl Connector {
    pub(crate) fn new(
        tls: Option<(Arc<rustls::ClientConfig>, Option<ServerName<'static>>)>,
    ) -> Connector {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(Duration::from_secs(3)));
        tcp.set_nodelay(true);
        // The scheme was checked when the client was built; TLS is done here, not by it.
        tcp.enforce_http(false);
        Connector {
            tcp,
            tls: tls.map(|(config, name)| (TlsConnector::from(config), name)),
            unix: None,
        }
    }

    pub(crate) fn unix(path: PathBuf) -> Connector {
        Connector {
            unix: Some(Arc::from(path)),
            ..Connector::new(None)
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.tcp, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if let Some(path) = self.unix.clone() {
            return Box::pin(async move {
                let stream = UnixStream::connect(&*path)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                Ok(TokioIo::new(Stream::Unix(stream)))
            });
        }
        let connecting = tower_service::Service::<Uri>::call(&mut self.tcp, uri.clone());
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let Some((tls, name)) = tls else {
                return Ok(TokioIo::new(Stream::Plain(tcp)));
            };
            let name = match name {
                Some(name) => name,
                None => {
                    let host = uri.host().unwrap_or_default();
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    ServerName::try_from(host.to_string())?
                }
            };
            let stream = tokio::time::timeout(HANDSHAKE_WITHIN, tls.connect(name, tcp))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(TokioIo::new(Stream::Tls(Box::new(stream))))
        })
    }
}

/// One connection to the agent.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
