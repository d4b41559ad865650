//! Test certificates: a CA made for one test and the leaves it signs, written as PEM files
//! under `target/it-certs`, for the lb's TLS listener and for Consul agents with TLS on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;

/// A test CA that signs leaf certificates into PEM files.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub dir: PathBuf,
}

/// A leaf certificate written to `<name>.crt` and `<name>.key`.
pub struct Leaf {
    pub der: CertificateDer<'static>,
    pub crt: PathBuf,
    pub key: PathBuf,
}

impl Leaf {
    /// The `LB_TLS_CERTS` entry for this leaf.
    pub fn source(&self) -> String {
        format!("{}:{}", self.crt.display(), self.key.display())
    }
}

impl Ca {
    pub fn new(tag: &str) -> Ca {
        let dir = crate::workspace_root()
            .join("target")
            .join("it-certs")
            .join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("switchyard test CA {tag}"));
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Ca { cert, key, dir }
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A leaf for `names`, valid from `from` to `to` (years), written as `file`.crt/.key.
    pub fn leaf_valid(&self, file: &str, names: &[&str], from: i32, to: i32) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let (crt, keyf) = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
        );
        write_atomically(&crt, cert.pem().as_bytes());
        write_atomically(&keyf, key.serialize_pem().as_bytes());
        Leaf {
            der: cert.der().clone(),
            crt,
            key: keyf,
        }
    }

    pub fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        self.leaf_valid(file, names, 2024, 2049)
    }

    /// A rustls client config that trusts this CA.
    pub fn client(&self) -> tokio_rustls::TlsConnector {
        let mut config = self.client_config();
        // A resumed session shows the certificate of the first handshake, not the current one.
        config.resumption = rustls::client::Resumption::disabled();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// A client that keeps the sessions servers give it and offers one on its next
    /// connection (rustls' default), with a store of its own.
    pub fn resuming_client(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::new(self.client_config()))
    }

    /// A client of TLS 1.2 only, keeping sessions as [`Ca::resuming_client`] does.
    pub fn tls12_client(&self) -> tokio_rustls::TlsConnector {
        let config = self.client_config_with(
            rustls::crypto::ring::default_provider(),
            &[&rustls::version::TLS12],
        );
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// The configuration behind [`Ca::resuming_client`], for a test to change.
    pub fn client_config(&self) -> rustls::ClientConfig {
        self.client_config_with(
            rustls::crypto::ring::default_provider(),
            rustls::DEFAULT_VERSIONS,
        )
    }

    /// A client trusting this CA, with the given algorithms and protocol versions.
    pub fn client_config_with(
        &self,
        provider: rustls::crypto::CryptoProvider,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}

/// Replaces a file the way secret managers do: write beside it, then rename over it.
pub fn write_atomically(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
