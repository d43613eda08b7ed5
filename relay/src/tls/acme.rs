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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// The ACME client: its resolver (for the TLS listeners) and the state machine to drive.
pub struct Acme {
    resolver: Arc<ResolvesServerCertAcme>,
    state: AcmeState<std::io::Error>,
    cache_dir: PathBuf,
}

/// When the newest certificate rustls-acme cached in `dir` (`cached_cert_*`: key and chain in
/// PEM) expires, in Unix seconds.
fn newest_cached_not_after(dir: &Path) -> Option<i64> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("cached_cert_"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())?;
    let pem = std::fs::read(newest.path()).ok()?;
    let leaf = rustls_pemfile::certs(&mut pem.as_slice()).next()?.ok()?;
    super::validity(&leaf).ok().map(|(_, not_after)| not_after)
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
            cache_dir: config.cache_dir.clone(),
        })
    }

    /// The certificate resolver the TLS listeners use.
    pub fn resolver(&self) -> Arc<ResolvesServerCertAcme> {
        Arc::clone(&self.resolver)
    }

    /// Order, renew and deploy certificates until `shutdown`, logging each step. A failed order
    /// or renewal is an error in the log (the CA's reason included; rustls-acme retries), and
    /// `relay_tls_cert_expiry_seconds` says, every minute, how long the certificate in use has left.
    pub async fn drive(mut self, shutdown: CancellationToken) {
        // What a restart finds in the cache counts at once, even before the CA answers.
        let mut not_after = newest_cached_not_after(&self.cache_dir);
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                event = self.state.next() => match event {
                    Some(Ok(ok)) => {
                        info!(event = ?ok, "acme");
                        not_after = newest_cached_not_after(&self.cache_dir).or(not_after);
                    }
                    Some(Err(e)) => error!(error = ?e, "acme: ordering or renewing the certificate failed; retrying"),
                    None => return,
                },
            }
            if let Some(t) = not_after {
                metrics::gauge!("relay_tls_cert_expiry_seconds").set(super::files::seconds_left(t, SystemTime::now()));
            }
        }
    }
}
