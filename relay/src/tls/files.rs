//! A certificate from PEM files (`tls.cert`, `tls.key`, e.g. certbot's `fullchain.pem` and
//! `privkey.pem`), replaced in place while the relay runs.
//!
//! [`FileCert`] is the rustls resolver that HTTPS, TURN over TLS and the QUIC tunnel share, so a
//! swap reaches all three at once: new handshakes get the new certificate, and connections already
//! open (a lesson's WebSocket, its TURN-over-TLS media, a worker's tunnel) keep the one they began
//! with. [`watch`] re-reads the files on SIGHUP (`systemctl reload`, what the certbot hook runs) and
//! when their modification time changes (checked every minute, for a renewal that forgot the
//! hook). A pair that does not load, or whose key does not belong to the certificate, is refused
//! with an error in the log, and the certificate in use stays.
//!
//! Every minute, and after each swap, `relay_tls_cert_expiry_seconds` says how long the
//! certificate in use has left.

use super::{fingerprint, validity, Identity, TlsError};
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// How often the files' modification times are looked at, and the expiry gauge set.
const POLL: Duration = Duration::from_secs(60);

/// The certificate in use and what is known about it.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    fingerprint: String,
    /// Validity period, Unix seconds.
    not_before: i64,
    not_after: i64,
    /// The files' modification times when they were read.
    stamp: (Option<SystemTime>, Option<SystemTime>),
}

/// The relay's certificate from files; see the module docs.
#[derive(Debug)]
pub struct FileCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<Loaded>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    let stamp = (modified(cert), modified(key));
    let identity = Identity::load(cert, key)?;
    let leaf = identity.chain.first().cloned().ok_or_else(|| TlsError::NoCert {
        path: cert.display().to_string(),
    })?;
    let (not_before, not_after) = validity(&leaf).map_err(|reason| TlsError::BadCert {
        path: cert.display().to_string(),
        reason,
    })?;
    // Parses the key and refuses one that does not belong to the certificate.
    let key = CertifiedKey::from_der(identity.chain, identity.key, &super::provider())?;
    Ok(Loaded {
        key: Arc::new(key),
        fingerprint: fingerprint(&leaf),
        not_before,
        not_after,
        stamp,
    })
}

impl FileCert {
    /// Read the pair; at start a failure stops the relay.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(load(cert, key)?),
        })
    }

    /// Read the files again and put the pair in use if it loads. `Ok(false)`: the files have not
    /// changed since they were read (and `force` is off), so nothing was done.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let stamp = (modified(&self.cert), modified(&self.key));
        if !force && stamp == self.current.load().stamp {
            return Ok(false);
        }
        self.current.store(Arc::new(load(&self.cert, &self.key)?));
        Ok(true)
    }

    /// SHA-256 of the certificate in use (what workers pin).
    pub fn fingerprint(&self) -> String {
        self.current.load().fingerprint.clone()
    }

    /// When the certificate in use expires, in Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.current.load().not_after
    }

    /// The validity period of the certificate in use, `(not_before, not_after)` in Unix seconds.
    pub fn validity(&self) -> (i64, i64) {
        let loaded = self.current.load();
        (loaded.not_before, loaded.not_after)
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.load().key))
    }
}

/// Seconds from now until `not_after` (negative once expired), for the gauge.
pub fn seconds_left(not_after: i64, now: SystemTime) -> f64 {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    (not_after - now) as f64
}

/// Re-read `certs` on SIGHUP and when its files change, until `shutdown`; rewrite
/// `fingerprint_file` after a swap; keep `relay_tls_cert_expiry_seconds` current.
pub async fn watch(certs: Arc<FileCert>, fingerprint_file: Option<PathBuf>, shutdown: CancellationToken) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(POLL);
    // Both outcomes exist from the start, so an alert on the first failure sees it rise from 0.
    for result in ["reloaded", "failed"] {
        metrics::counter!("relay_tls_reloads_total", "result" => result).absolute(0);
    }
    loop {
        let force = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let (files, blocking) = (Arc::clone(&certs), force);
        match tokio::task::spawn_blocking(move || files.reload(blocking)).await {
            Ok(Ok(true)) => {
                let fingerprint = certs.fingerprint();
                info!(
                    cert = %certs.cert.display(),
                    %fingerprint,
                    days_left = (seconds_left(certs.not_after(), SystemTime::now()) / 86_400.0).floor(),
                    "certificate reloaded: new connections get it"
                );
                metrics::counter!("relay_tls_reloads_total", "result" => "reloaded").increment(1);
                if let Some(path) = &fingerprint_file {
                    if let Err(e) = std::fs::write(path, format!("{fingerprint}\n")) {
                        error!(path = %path.display(), error = %e, "writing the new fingerprint");
                    }
                }
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                error!(error = %e, "certificate reload failed; the certificate in use stays");
                metrics::counter!("relay_tls_reloads_total", "result" => "failed").increment(1);
            }
            Err(e) => error!(error = %e, "certificate reload task failed"),
        }
        metrics::gauge!("relay_tls_cert_expiry_seconds").set(seconds_left(certs.not_after(), SystemTime::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> String {
        let pair = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("cert");
        std::fs::write(dir.join("cert.pem"), pair.cert.pem()).expect("write");
        std::fs::write(dir.join("key.pem"), pair.signing_key.serialize_pem()).expect("write");
        fingerprint(pair.cert.der())
    }

    #[test]
    fn a_replaced_pair_is_taken_and_a_broken_one_leaves_the_old_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = write_pair(dir.path(), "first.example");
        let certs = FileCert::load(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).expect("load");
        assert_eq!(certs.fingerprint(), first);
        assert!(
            !certs.reload(false).expect("unchanged"),
            "nothing changed, nothing read"
        );

        let second = write_pair(dir.path(), "second.example");
        assert!(certs.reload(true).expect("reload"));
        assert_eq!(certs.fingerprint(), second, "the new pair is in use");

        // A key of another certificate: refused, the second pair stays.
        let other = rcgen::KeyPair::generate().expect("key");
        std::fs::write(dir.path().join("key.pem"), other.serialize_pem()).expect("write");
        let err = certs.reload(true).expect_err("mismatch");
        assert!(err.to_string().to_lowercase().contains("key"), "{err}");
        assert_eq!(certs.fingerprint(), second);
        assert!(seconds_left(certs.not_after(), SystemTime::now()) > 86_400.0);
    }
}
