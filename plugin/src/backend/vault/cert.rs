//! The client certificate's notAfter, for the `kleidi_credential_expiry_seconds` metric. Read from
//! the file at scrape time, so it follows a renewed certificate as the client does (it reloads the
//! file when it changes).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_cert::Certificate;
use x509_cert::der::Decode;

/// Seconds until the first certificate in the PEM file `path` expires (negative once it has);
/// `None` if it cannot be read or parsed now.
pub(super) fn expires_in(path: &Path) -> Option<f64> {
    let cert = CertificateDer::pem_file_iter(path).ok()?.next()?.ok()?;
    let not_after = not_after(&cert)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    #[allow(clippy::cast_precision_loss)] // seconds since 1970 fit in f64's 52 bits
    Some(not_after as f64 - now)
}

/// notAfter of a DER certificate, in seconds since the Unix epoch.
fn not_after(der: &[u8]) -> Option<u64> {
    let cert = Certificate::from_der(der).ok()?;
    Some(
        cert.tbs_certificate()
            .validity()
            .not_after
            .to_unix_duration()
            .as_secs(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl req -x509 -newkey ec -days 3650`: notAfter Nov 30 03:27:59 2036 GMT (a UTCTime).
    const UTC_TIME: &str = "\
-----BEGIN CERTIFICATE-----
MIIBgTCCASegAwIBAgIUDgfv0skGG04uSsRSqPVQBIgm1akwCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLa2xlaWRpLXRlc3QwHhcNMjYxMjAzMDMyNzU5WhcNMzYxMTMw
MDMyNzU5WjAWMRQwEgYDVQQDDAtrbGVpZGktdGVzdDBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABJKrDC/fHpYmcPZMcaTAit9qmKu90ZCAAWDcf5oBQ0lq2UBJDpT3
EgGnMVco5a+d9awG6O6e6RAvL5ZCBeY9ZdqjUzBRMB0GA1UdDgQWBBQ0/XHZKzc1
q7JHhA01tng0CsnqjTAfBgNVHSMEGDAWgBQ0/XHZKzc1q7JHhA01tng0CsnqjTAP
BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIBt3KOWnpCY0dkniatRH
iJy+47UOCNN3i1Iy9NqpFASxAiEApvupuFtHO06AIkWuw8B2Dv9TeAvGjJ917TJi
CDHhfBQ=
-----END CERTIFICATE-----
";
    /// `-days 40000`: notAfter Jun 9 03:27:59 2136 GMT (a GeneralizedTime, after 2049).
    const GENERALIZED_TIME: &str = "\
-----BEGIN CERTIFICATE-----
MIIBgzCCASmgAwIBAgIUai2tCxxWVy69PwwcO0LTtXDnjYkwCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLa2xlaWRpLXRlc3QwIBcNMjYxMjAzMDMyNzU5WhgPMjEzNjA2
MDkwMzI3NTlaMBYxFDASBgNVBAMMC2tsZWlkaS10ZXN0MFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAE2NoZd2PiP6TO4s23tMdYK08eRMCd3eeYvHkLoShFivqHiDKm
gg0aPSHtFo1KoryryuFikKy8z/yQI7/aiZkTK6NTMFEwHQYDVR0OBBYEFI3W81TK
kWFSZCWl2H5OsLDxoE0tMB8GA1UdIwQYMBaAFI3W81TKkWFSZCWl2H5OsLDxoE0t
MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgKX3ZJ6IvkFFzf7mD
manGfk51JRBA6VvHzyN72k7GTF8CIQD1H58Q62zoueE7ud93MVlG+NoZma4tynq0
wR7fnhheLA==
-----END CERTIFICATE-----
";

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn not_after_matches_openssl() {
        // `date -d "Nov 30 03:27:59 2036 GMT" +%s`
        assert_eq!(not_after(&der(UTC_TIME)), Some(2_111_628_479));
        assert_eq!(not_after(&der(GENERALIZED_TIME)), Some(5_252_268_479));
    }

    #[test]
    fn truncated_or_foreign_der_is_none() {
        let cert = der(UTC_TIME);
        for cut in [0, 1, 4, 40, cert.len() / 2] {
            assert_eq!(not_after(cert.get(..cut).unwrap()), None, "{cut}");
        }
        assert_eq!(not_after(b"\x04\x02ab"), None);
    }

    #[test]
    fn a_file_gives_seconds_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.pem");
        std::fs::write(&path, UTC_TIME).unwrap();
        let left = expires_in(&path).unwrap();
        assert!(left > 0.0 && left < 11.0 * 365.0 * 86_400.0, "{left}");
        assert_eq!(expires_in(&dir.path().join("missing.pem")), None);
    }
}
