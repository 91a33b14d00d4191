//! TLS on both ports (`--tls-cert`, `--tls-key`).
//!
//! The certificate is loaded and checked against its key before any socket is bound.
//! Handshakes run beside the accept loop, so a slow client holds up nobody else. The files
//! are checked for changes and read again, so a renewed certificate needs no restart; one
//! that cannot be used is reported and the previous one stays in use.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::problem::{Problem, Severity};
use crate::reconciler::{Event, ProblemSource};

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once on one port; further connections wait in the backlog.
const HANDSHAKES_AT_ONCE: usize = 256;
/// How often the certificate files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// The PEM files of the server's certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: String },
    #[error("{path}: not a usable certificate chain ({message})")]
    BadCertificate { path: String, message: String },
    #[error("{path}: no unencrypted PEM private key in it (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("{path}: {message}")]
    BadKey { path: String, message: String },
    #[error("{key} is not the private key of the certificate in {cert}")]
    Mismatch { cert: String, key: String },
}

impl TlsFiles {
    /// Reads and checks both files: a chain, a key the provider can sign with, and the
    /// key belonging to the first certificate.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let (cert_path, key_path) = (self.cert.display().to_string(), self.key.display().to_string());
        let chain = CertificateDer::pem_slice_iter(&read(&self.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::BadCertificate { path: cert_path.clone(), message: error.to_string() })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { path: cert_path });
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?).map_err(|error| match error {
            pem::Error::NoItemsFound => TlsError::NoKey { path: key_path.clone() },
            other => TlsError::BadKey { path: key_path.clone(), message: other.to_string() },
        })?;
        match CertifiedKey::from_der(chain, key, &provider()) {
            Ok(certified) => Ok(Arc::new(certified)),
            Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::Mismatch { cert: cert_path, key: key_path }),
            Err(rustls::Error::InvalidCertificate(reason)) => {
                Err(TlsError::BadCertificate { path: cert_path, message: format!("{reason:?}") })
            }
            Err(error) => Err(TlsError::BadKey { path: key_path, message: error.to_string() }),
        }
    }

    /// What tells a changed file: modification time and size of both.
    fn stamp(&self) -> Stamp {
        let stamp = |path: &Path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        [stamp(&self.cert), stamp(&self.key)]
    }
}

type Stamp = [Option<(SystemTime, u64)>; 2];

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// A client configuration trusting only the certificates in the PEM file `ca_file` (the
/// server's own certificate, or its CA's): for `loadgen` and `bench` reaching a server
/// with a private certificate.
pub fn client_trusting(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(ca_file).map_err(|error| format!("{}: {error}", ca_file.display()))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default protocol versions")
        .with_root_certificates(roots(&pem, ca_file)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The text of a PEM file of CA certificates for collectors to trust, once every
/// certificate in it parses.
pub fn read_ca_bundle(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
    roots(text.as_bytes(), path)?;
    Ok(text)
}

/// Every certificate in `pem` (read from `path`) as a trust anchor; at least one.
fn roots(pem: &[u8], path: &Path) -> Result<rustls::RootCertStore, String> {
    let bad = |message: String| format!("{}: {message}", path.display());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(pem) {
        roots.add(certificate.map_err(|error| bad(error.to_string()))?).map_err(|error| bad(error.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificate in use, replaced whole when the files change.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The server side of TLS, shared by both ports.
#[derive(Clone, Debug)]
pub struct Tls {
    files: TlsFiles,
    /// What the files looked like when the pair in use was read.
    loaded_stamp: Stamp,
    current: Arc<Current>,
    config: Arc<ServerConfig>,
}

impl Tls {
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        // Taken before reading, so that a change made while loading is seen later.
        let loaded_stamp = files.stamp();
        let current = Arc::new(Current(RwLock::new(files.load()?)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the default provider supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { files, loaded_stamp, current, config: Arc::new(config) })
    }

    /// Accepts on `listener` (bound to `local`) and hands out connections once their
    /// handshake is done.
    pub fn listen(
        &self,
        listener: TcpListener,
        local: SocketAddr,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> TlsListener {
        let (done, accepted) = mpsc::channel(HANDSHAKES_AT_ONCE);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config));
        tokio::spawn(accept_and_handshake(listener, acceptor, done, metrics, cancel));
        TlsListener { accepted, local }
    }

    /// Reads the files again whenever they change, checking every `every`. A pair that
    /// cannot be used (a renewal caught half-written, a wrong key) is reported as a problem
    /// and the previous certificate stays in use. A certificate near or past its end is
    /// reported too, and its end is exported as a metric.
    pub async fn keep_fresh(
        self,
        every: Duration,
        metrics: Arc<Metrics>,
        events: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) {
        let mut seen = self.loaded_stamp;
        let mut reload_problem = None;
        let mut reported = Vec::new();
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let stamp = self.files.stamp();
            if stamp != seen {
                seen = stamp;
                let files = self.files.clone();
                let loaded = tokio::task::spawn_blocking(move || files.load()).await.expect("loading does not panic");
                reload_problem = match loaded {
                    Ok(certified) => {
                        *self.current.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = certified;
                        info!(cert = %self.files.cert.display(), "TLS certificate loaded again");
                        None
                    }
                    Err(error) => {
                        warn!(%error, "the changed TLS files cannot be used; the previous certificate stays in use");
                        let message = format!("TLS: {error}; the previous certificate stays in use");
                        Some(Problem::general(Severity::Warning, message))
                    }
                };
            }
            let validity = validity(self.current.get().end_entity_cert().map(|cert| cert.as_ref()).unwrap_or_default());
            metrics.tls_certificate_not_after.store(validity.map_or(0, |v| v.not_after), Ordering::Relaxed);
            let expiry = validity.and_then(|v| v.problem(&self.files.cert, crate::time::now_unix()));
            if let Some(expiry) = &expiry
                && !reported.contains(expiry)
            {
                warn!(message = %expiry.message, "the TLS certificate needs renewing");
            }
            let problems: Vec<Problem> = reload_problem.iter().chain(&expiry).cloned().collect();
            if problems != reported {
                reported = problems.clone();
                if events.send(Event::Problems { source: ProblemSource::Tls, problems }).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Current {
    fn get(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

/// When a certificate is valid, in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Validity {
    not_before: i64,
    not_after: i64,
}

impl Validity {
    /// An error once the certificate has expired; a warning in the last third of its
    /// lifetime, and at most 14 days before the end: renewers act at two thirds, so a
    /// certificate still served then was not renewed.
    fn problem(self, path: &Path, now: i64) -> Option<Problem> {
        const WARN_AT_MOST: i64 = 14 * 24 * 3600;
        let left = self.not_after - now;
        let end = crate::time::rfc3339(self.not_after);
        if left <= 0 {
            let message = format!("TLS: the certificate in {} expired at {end}; collectors refuse it", path.display());
            return Some(Problem::general(Severity::Error, message));
        }
        let warn_from = ((self.not_after - self.not_before) / 3).min(WARN_AT_MOST);
        (left < warn_from).then(|| {
            let within = if left >= 2 * 24 * 3600 {
                format!("{} days", left / 86_400)
            } else {
                format!("{} hours", left / 3600)
            };
            let message = format!("TLS: the certificate in {} expires at {end}, in {within}; renew it", path.display());
            Problem::general(Severity::Warning, message)
        })
    }
}

/// The validity of an X.509 certificate in DER. Only the path to `validity` is read:
/// `Certificate → TBSCertificate → [version], serial, signature, issuer, validity`.
fn validity(der: &[u8]) -> Option<Validity> {
    let (certificate, _) = element(der, SEQUENCE)?;
    let (mut fields, _) = element(certificate, SEQUENCE)?;
    if fields.first() == Some(&VERSION) {
        fields = skip(fields)?;
    }
    for _serial_signature_issuer in 0..3 {
        fields = skip(fields)?;
    }
    let (validity, _) = element(fields, SEQUENCE)?;
    let (not_before, rest) = time(validity)?;
    let (not_after, _) = time(rest)?;
    Some(Validity { not_before, not_after })
}

const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The content of the DER element starting `input` when its tag is `tag`, and what follows.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let length = match first {
        0..=0x7f => usize::from(first),
        0x81..=0x84 => {
            let (bytes, after) = rest.split_at_checked(usize::from(first & 0x7f))?;
            rest = after;
            bytes.iter().fold(0, |length, &byte| length << 8 | usize::from(byte))
        }
        _ => return None,
    };
    rest.split_at_checked(length)
}

fn skip(input: &[u8]) -> Option<&[u8]> {
    element(input, *input.first()?).map(|(_, rest)| rest)
}

/// A `UTCTime` (years 1950–2049) or `GeneralizedTime`, in UTC with whole seconds.
fn time(input: &[u8]) -> Option<(i64, &[u8])> {
    let tag = *input.first()?;
    let (text, rest) = element(input, tag)?;
    let digits = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, digits) = match tag {
        UTC_TIME => {
            let short: u32 = digits.get(..2)?.parse().ok()?;
            (if short >= 50 { 1900 + short } else { 2000 + short }, digits.get(2..)?)
        }
        GENERALIZED_TIME => (digits.get(..4)?.parse().ok()?, digits.get(4..)?),
        _ => return None,
    };
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rfc3339 = format!(
        "{year:04}-{}-{}T{}:{}:{}Z",
        &digits[0..2],
        &digits[2..4],
        &digits[4..6],
        &digits[6..8],
        &digits[8..10]
    );
    let at = humantime::parse_rfc3339(&rfc3339).ok()?;
    let seconds = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    Some((i64::try_from(seconds).ok()?, rest))
}

async fn accept_and_handshake(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    done: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_AT_ONCE));
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => return,
            permit = Arc::clone(&handshakes).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
        };
        crate::app::nodelay(&stream);
        let (acceptor, done, metrics) = (acceptor.clone(), done.clone(), Arc::clone(&metrics));
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = done.send((tls, peer)).await;
                    return;
                }
                Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
            Metrics::count(&metrics.tls_handshake_failures);
        });
    }
}

/// A connection that failed before it was accepted is the client's business; anything
/// else (out of file descriptors) is waited out, as axum does for plain TCP.
async fn accept_failed(error: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    warn!(%error, "accepting a connection failed; retrying in 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Connections with their handshake done, for `axum::serve`.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop stopped for shutdown; the server stops accepting too.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl req -x509 … -days 30`: UTCTime validity, 2026-11-25T10:30:25Z to 2026-12-25T10:30:25Z.
    const THIRTY_DAYS: &str = "-----BEGIN CERTIFICATE-----
MIIBejCCASCgAwIBAgIUAmPfmMBkSEgWGGZgcW0FygszUo4wCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJZXhwaXJ5LTMwMB4XDTI2MTEyNTEwMzAyNVoXDTI2MTIyNTEw
MzAyNVowFDESMBAGA1UEAwwJZXhwaXJ5LTMwMFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAE8fsdv7YpkKPBs8dlDm+E+/u1ySg+Jaa61osTIOtxcgs6Ilh9tuWcv2Q/
gKuU6S7CyCGvhkQ7v3GdpVFGF7ZtC6NQME4wHQYDVR0OBBYEFPcQwc6YgdEh/WMo
gITcSnPQnf4LMB8GA1UdIwQYMBaAFPcQwc6YgdEh/WMogITcSnPQnf4LMAwGA1Ud
EwEB/wQCMAAwCgYIKoZIzj0EAwIDSAAwRQIhALfymdpzmvZZ8obtc8EYE+AVsTQ2
vOf2IxsZ+DyUyl0qAiBSbR4WHorzsRtD8Xovv2WAgB0g1gkVcbowftGBVLrRJQ==
-----END CERTIFICATE-----
";

    /// `-days 10000`: the end is in 2054, so it is a GeneralizedTime.
    const INTO_2054: &str = "-----BEGIN CERTIFICATE-----
MIIBgzCCASigAwIBAgIUDf+OPV4gpR+Vd08D2ovZDWXTZlwwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMZXhwaXJ5LTEwMDAwMCAXDTI2MTEyNTEwMzAyNVoYDzIwNTQw
NDEyMTAzMDI1WjAXMRUwEwYDVQQDDAxleHBpcnktMTAwMDAwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAATRWEbx0dHRREK6fKDzYAe++GPV6q3REuXwZTXOnRcuShqB
1gHex/DLqGAk0x55LttRiiVYdVAwVXOMBE9vCebyo1AwTjAdBgNVHQ4EFgQUemKL
CiRyiCN6LUhK4SKfGzUzomAwHwYDVR0jBBgwFoAUemKLCiRyiCN6LUhK4SKfGzUz
omAwDAYDVR0TAQH/BAIwADAKBggqhkjOPQQDAgNJADBGAiEAuzC5DK80vArS1I27
X725xe7/sP1gzBk4/6prYAIAmUsCIQC6wDcFrnx/X05q3/QT/AQOFpb2vasJXFUZ
94s5C9KnhQ==
-----END CERTIFICATE-----
";

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate").to_vec()
    }

    #[test]
    fn validity_is_read_from_utc_and_generalized_times() {
        // The figures are `date -u -d "<openssl x509 -startdate/-enddate>" +%s`.
        assert_eq!(validity(&der(THIRTY_DAYS)), Some(Validity { not_before: 1_795_602_625, not_after: 1_798_194_625 }));
        assert_eq!(validity(&der(INTO_2054)), Some(Validity { not_before: 1_795_602_625, not_after: 2_659_602_625 }));
    }

    #[test]
    fn anything_but_a_certificate_has_no_validity() {
        let whole = der(THIRTY_DAYS);
        for cut in [0, 1, 4, 40, 80, whole.len() / 2] {
            assert_eq!(validity(&whole[..cut]), None, "cut at {cut}");
        }
        assert_eq!(validity(b"\x30\x80\x30\x80"), None, "indefinite lengths are not DER");
        assert_eq!(validity(b"\x30\x85\xff\xff\xff\xff\xff"), None, "a length over four bytes");
    }

    #[test]
    fn a_certificate_is_reported_in_the_last_third_of_its_life_and_at_most_fourteen_days_ahead() {
        let day = 24 * 3600;
        let path = Path::new("/etc/gitfleet/tls.crt");
        // 90 days: a warning from 14 days before the end.
        let ninety = Validity { not_before: 0, not_after: 90 * day };
        assert_eq!(ninety.problem(path, 75 * day), None);
        let soon = ninety.problem(path, 77 * day).expect("13 days left");
        assert_eq!(soon.severity, Severity::Warning);
        assert_eq!(
            soon.message,
            "TLS: the certificate in /etc/gitfleet/tls.crt expires at 1970-04-01T00:00:00Z, in 13 days; renew it"
        );
        let hours = ninety.problem(path, 90 * day - 5 * 3600).expect("5 hours left");
        assert!(hours.message.ends_with("in 5 hours; renew it"), "{}", hours.message);
        let expired = ninety.problem(path, 90 * day).expect("expired");
        assert_eq!(expired.severity, Severity::Error);
        assert_eq!(
            expired.message,
            "TLS: the certificate in /etc/gitfleet/tls.crt expired at 1970-04-01T00:00:00Z; collectors refuse it"
        );
        // A 6-day certificate is renewed every 4 days: quiet for its first two thirds.
        let short = Validity { not_before: 0, not_after: 6 * day };
        assert_eq!(short.problem(path, 3 * day), None);
        assert!(short.problem(path, 4 * day + 3600).is_some());
    }
}
