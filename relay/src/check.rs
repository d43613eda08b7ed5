//! `relay --check-config`: what a start needs beyond a valid file, checked without binding a port
//! or touching a running relay, so an edit is proved before the relay is restarted or reloaded
//! (docs/deploy.md, step 4; the unit runs it before every start and every reload).
//!
//! [`RelayConfig::validate`] has already read the file. This checks what the file points at:
//! * `tls.cert` and `tls.key`: readable PEM, and the key belongs to the certificate (what the
//!   relay loads at start, [`FileCert::load`]). Its validity is reported, not enforced: an expired
//!   certificate is a WARNING line (browsers will refuse it, but a worker that pins it does not),
//!   and one that expires within [`EXPIRY_NOTE`] says so;
//! * `[policies.auth]`, `[policies.router]`: each module compiles and passes its checks, as at start;
//! * the places the relay writes at start: `tls.acme.cache_dir`, the folder of
//!   `tls.fingerprint_file` and, with `[[webhooks]]`, `webhook_delivery.dir` must be writable by
//!   the user that runs the check.
//!
//! [`check`] returns one line per thing it looked at, or the first failure.

use crate::config::RelayConfig;
use crate::policy::{LoadError, Policies};
use crate::tls::files::FileCert;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A certificate this close to its end is reported (the alert in deploy/ fires at the same age).
pub const EXPIRY_NOTE: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Tls(crate::tls::TlsError),
    #[error("{key} does not belong to the certificate in {cert} ({reason})")]
    KeyMismatch { cert: String, key: String, reason: String },
    #[error("policy: {0}")]
    Policy(#[from] LoadError),
    #[error("{path}: the relay must write here, and cannot: {source}")]
    NotWritable { path: String, source: std::io::Error },
}

/// Check what `config` points at, as of `now`.
pub fn check(config: &RelayConfig, now: SystemTime) -> Result<Vec<String>, CheckError> {
    let mut report = Vec::new();
    if config.tls.acme.is_none() {
        if let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) {
            report.push(certificate(cert, key, now)?);
        }
    }
    if !config.webhooks.is_empty() {
        let dir = &config.webhook_delivery.dir;
        writable(dir)?;
        report.push(format!("webhook queue {}: writable", dir.display()));
    }
    if let Some(acme) = &config.tls.acme {
        writable(&acme.cache_dir)?;
        report.push(format!("ACME cache {}: writable", acme.cache_dir.display()));
    }
    if let Some(dir) = config
        .tls
        .fingerprint_file
        .as_deref()
        .and_then(Path::parent)
        .filter(|d| !d.as_os_str().is_empty())
    {
        writable(dir)?;
        report.push(format!("fingerprint folder {}: writable", dir.display()));
    }
    let modules = [&config.policies.auth, &config.policies.router]
        .into_iter()
        .flatten()
        .count();
    if Policies::load(&config.policies)?.is_some() {
        report.push(format!("{modules} policy module(s): compiled and checked"));
    }
    Ok(report)
}

/// The certificate and key at these paths: readable and matching (an error otherwise), and how
/// long the certificate is valid as of `now` (a warning once it is not).
fn certificate(cert: &Path, key: &Path, now: SystemTime) -> Result<String, CheckError> {
    let cert_name = cert.display().to_string();
    let loaded = FileCert::load(cert, key).map_err(|e| match e {
        // The pair parsed; rustls refused the key for this certificate.
        crate::tls::TlsError::Rustls(reason) => CheckError::KeyMismatch {
            cert: cert_name.clone(),
            key: key.display().to_string(),
            reason: reason.to_string(),
        },
        other => CheckError::Tls(other),
    })?;
    let (from, until) = loaded.validity();
    let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let date = |t: i64| {
        x509_parser::time::ASN1Time::from_timestamp(t)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| format!("{t} (Unix time)"))
    };
    let validity = if now < from {
        format!(
            "WARNING: not valid before {} (is this machine's clock right?)",
            date(from)
        )
    } else if now >= until {
        format!("WARNING: expired on {}; browsers refuse it (renew it)", date(until))
    } else if (until - now) as u64 <= EXPIRY_NOTE.as_secs() {
        format!(
            "valid until {} ({} days; renew it soon)",
            date(until),
            (until - now) / 86_400
        )
    } else {
        format!("valid until {} ({} days)", date(until), (until - now) / 86_400)
    };
    Ok(format!("certificate {cert_name}: the key matches; {validity}"))
}

/// `dir`, or the nearest folder above it that exists (the relay creates the rest), takes a new file.
fn writable(dir: &Path) -> Result<(), CheckError> {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(Path::new("."));
    if !existing.is_dir() {
        return Err(CheckError::NotWritable {
            path: existing.display().to_string(),
            source: std::io::Error::other("a file where a folder must be"),
        });
    }
    // A new file under a random name (`O_EXCL`, so never through a link someone left there, and
    // never colliding with another check running at once); removed when dropped.
    tempfile::Builder::new()
        .prefix(".avatar-edge-check-")
        .tempfile_in(existing)
        .map(drop)
        .map_err(|source| CheckError::NotWritable {
            path: existing.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_files(
        dir: &Path,
        not_after: (i32, u8, u8),
        key_of_another: bool,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["relay.example.com".to_owned()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let cert = params.self_signed(&key).expect("cert");
        let written_key = if key_of_another {
            rcgen::KeyPair::generate().expect("key")
        } else {
            key
        };
        let (c, k) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, written_key.serialize_pem()).expect("write");
        (c, k)
    }

    fn config_with(cert: &Path, key: &Path) -> RelayConfig {
        let mut config = RelayConfig::dev();
        config.tls.self_signed = false;
        config.tls.cert = Some(cert.to_path_buf());
        config.tls.key = Some(key.to_path_buf());
        config
    }

    fn at(y: i32, m: u8, d: u8) -> SystemTime {
        let t = rcgen::date_time_ymd(y, m, d).unix_timestamp();
        UNIX_EPOCH + Duration::from_secs(t as u64)
    }

    #[test]
    fn a_matching_current_certificate_passes_and_says_until_when() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = pem_files(dir.path(), (2030, 1, 1), false);
        let report = check(&config_with(&cert, &key), at(2029, 12, 25)).expect("good certificate");
        assert!(
            report[0].contains("the key matches") && report[0].contains("renew it soon"),
            "{report:?}"
        );
        let report = check(&config_with(&cert, &key), at(2029, 1, 1)).expect("good certificate");
        assert!(!report[0].contains("renew"), "{report:?}");
    }

    #[test]
    fn missing_files_and_a_foreign_key_fail_by_name_and_an_expired_certificate_is_a_warning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = check(
            &config_with(&dir.path().join("nope.pem"), &dir.path().join("key.pem")),
            SystemTime::now(),
        )
        .expect_err("missing");
        assert!(missing.to_string().contains("nope.pem"), "{missing}");

        let (cert, key) = pem_files(dir.path(), (2030, 1, 1), true);
        let foreign = check(&config_with(&cert, &key), at(2029, 1, 1)).expect_err("foreign key");
        assert!(matches!(foreign, CheckError::KeyMismatch { .. }), "{foreign}");
        assert!(foreign.to_string().contains("privkey.pem"), "{foreign}");

        let (cert, key) = pem_files(dir.path(), (2030, 1, 1), false);
        // Expired: reported, not refused (a worker that pins it still connects).
        let expired = check(&config_with(&cert, &key), at(2031, 1, 1)).expect("expired is a warning");
        assert!(expired[0].contains("WARNING: expired on"), "{expired:?}");
    }

    #[test]
    fn an_unwritable_state_folder_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").expect("write");
        let mut config = RelayConfig::dev();
        // A folder below a plain file can never be made.
        config.tls.fingerprint_file = Some(file.join("sub/fingerprint"));
        let err = check(&config, SystemTime::now()).expect_err("unwritable");
        assert!(matches!(err, CheckError::NotWritable { .. }), "{err}");
        config.tls.fingerprint_file = Some(dir.path().join("new/fingerprint"));
        let report = check(&config, SystemTime::now()).expect("writable");
        assert!(report.iter().any(|l| l.contains("writable")), "{report:?}");
    }
}
