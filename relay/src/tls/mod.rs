//! Certificates: loading PEM files, generating a development certificate, ACME, fingerprints.
//!
//! The same certificate secures the QUIC tunnel and, when enabled, HTTPS/WSS. Workers pin it by
//! its SHA-256 fingerprint ([`fingerprint`]) or trust the CA that issued it. With `[tls.acme]`
//! the certificate comes from an ACME CA ([`acme`]) through a rustls resolver that both
//! listeners share, so a renewal reaches HTTPS and the tunnel at once. Certificate files
//! (`tls.cert`, `tls.key`) go through a resolver of the same kind ([`files`]), re-read on SIGHUP.

pub mod acme;
pub mod files;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCert { path: String },
    #[error("{path}: no PEM private key found")]
    NoKey { path: String },
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: not a certificate the relay can use: {reason}")]
    BadCert { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("ACME: {0}")]
    Acme(String),
}

/// The relay's certificate: fixed, or resolved per handshake (ACME).
#[derive(Clone)]
pub enum ServerCerts {
    Static(Identity),
    /// From `tls.cert` and `tls.key`, replaced in place on SIGHUP ([`files::watch`]).
    Files(std::sync::Arc<files::FileCert>),
    Resolver(std::sync::Arc<dyn rustls::server::ResolvesServerCert>),
}

impl ServerCerts {
    /// A rustls server config offering `alpn`; TLS 1.3 only when `tls13_only` (QUIC).
    pub fn server_config(&self, tls13_only: bool, alpn: Vec<Vec<u8>>) -> Result<rustls::ServerConfig, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider());
        let builder = if tls13_only {
            builder.with_protocol_versions(&[&rustls::version::TLS13])?
        } else {
            builder.with_safe_default_protocol_versions()?
        }
        .with_no_client_auth();
        let mut config = match self {
            ServerCerts::Static(id) => builder.with_single_cert(id.chain.clone(), id.key.clone_key())?,
            ServerCerts::Files(f) => builder.with_cert_resolver(std::sync::Arc::clone(f) as _),
            ServerCerts::Resolver(r) => builder.with_cert_resolver(std::sync::Arc::clone(r)),
        };
        config.alpn_protocols = alpn;
        Ok(config)
    }

    /// The pin for workers; `None` for ACME (the certificate changes at every renewal).
    pub fn fingerprint(&self) -> Option<String> {
        match self {
            ServerCerts::Static(id) => Some(id.fingerprint()),
            ServerCerts::Files(f) => Some(f.fingerprint()),
            ServerCerts::Resolver(_) => None,
        }
    }
}

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let chain = rustls_pemfile::certs(&mut read(cert)?.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Read {
                path: cert.display().to_string(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCert {
                path: cert.display().to_string(),
            });
        }
        let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
            .map_err(|source| TlsError::Read {
                path: key.display().to_string(),
                source,
            })?
            .ok_or_else(|| TlsError::NoKey {
                path: key.display().to_string(),
            })?;
        Ok(Self { chain, key })
    }

    /// A fresh self-signed certificate for `localhost`, `127.0.0.1` and `::1`.
    pub fn self_signed() -> Result<Self, TlsError> {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
        let ck = rcgen::generate_simple_self_signed(names)?;
        Ok(Self {
            chain: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        })
    }

    /// Fingerprint of the leaf certificate.
    pub fn fingerprint(&self) -> String {
        // `load` and `self_signed` both guarantee a non-empty chain.
        self.chain.first().map(|c| fingerprint(c)).unwrap_or_default()
    }
}

/// The validity period of a DER certificate, `(not_before, not_after)` in Unix seconds.
pub fn validity(der: &[u8]) -> Result<(i64, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Lowercase hex SHA-256 of a DER certificate, as workers' `fingerprint` setting expects.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The crypto provider every TLS config of ours uses: ring, no aws-lc build needed.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
