//! Certificates from an ACME CA (Let's Encrypt, or any RFC 8555 server), via `rustls-acme`.
//!
//! The challenge is TLS-ALPN-01: the CA connects to a configured domain on port 443 offering the
//! ALPN protocol `acme-tls/1`, and the HTTPS listener's resolver answers with the challenge
//! certificate. So the relay needs no port 80. The account key and the certificate are cached in
//! `cache_dir`, renewal happens in the background ([`Acme::drive`]), and the shared resolver makes
//! a new certificate live for HTTPS and the QUIC tunnel without a restart.

use super::TlsError;
use crate::config::AcmeConfig;
use futures::StreamExt;
use rustls_acme::caches::DirCache;
use rustls_acme::{AcmeState, ResolvesServerCertAcme};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The ACME client: its resolver (for the TLS listeners) and the state machine to drive.
pub struct Acme {
    resolver: Arc<ResolvesServerCertAcme>,
    state: AcmeState<std::io::Error>,
}

/// The ALPN protocol of the TLS-ALPN-01 challenge; the HTTPS listener must offer it.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

impl Acme {
    pub fn new(config: &AcmeConfig) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        match &config.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| TlsError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|source| TlsError::Read {
                        path: path.display().to_string(),
                        source,
                    })?;
                    roots.add(cert)?;
                }
                if roots.is_empty() {
                    return Err(TlsError::NoCert {
                        path: path.display().to_string(),
                    });
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let client = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let state = rustls_acme::AcmeConfig::new_with_client_config(&config.domains, Arc::new(client))
            .contact(&config.contact)
            .directory(&config.directory)
            .cache(DirCache::new(config.cache_dir.clone()))
            .state();
        Ok(Self {
            resolver: state.resolver(),
            state,
        })
    }

    /// The certificate resolver the TLS listeners use.
    pub fn resolver(&self) -> Arc<ResolvesServerCertAcme> {
        Arc::clone(&self.resolver)
    }

    /// Order, renew and deploy certificates until `shutdown`, logging each step.
    pub async fn drive(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = self.state.next() => match event {
                    Some(Ok(ok)) => info!(event = ?ok, "acme"),
                    Some(Err(e)) => warn!(error = ?e, "acme: will retry"),
                    None => return,
                },
            }
        }
    }
}
