//! TLS on both ports (`--tls-cert`, `--tls-key`).
//!
//! The certificate is loaded and checked against its key before any socket is bound.
//! Handshakes run beside the accept loop, so a slow client holds up nobody else. The files
//! are checked for changes and read again, so a renewed certificate needs no restart; one
//! that cannot be used is reported and the previous one stays in use.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    fn stamp(&self) -> [Option<(SystemTime, u64)>; 2] {
        let stamp = |path: &Path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        [stamp(&self.cert), stamp(&self.key)]
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// A client configuration trusting only the certificates in the PEM file `ca_file` (the
/// server's own certificate, or its CA's): for `loadgen` and `bench` reaching a server
/// with a private certificate.
pub fn client_trusting(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let bad = |message: String| format!("{}: {message}", ca_file.display());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca_file).map_err(|error| bad(error.to_string()))? {
        roots.add(certificate.map_err(|error| bad(error.to_string()))?).map_err(|error| bad(error.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificate in use, replaced whole when the files change.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner())))
    }
}

/// The server side of TLS, shared by both ports.
#[derive(Clone, Debug)]
pub struct Tls {
    files: TlsFiles,
    current: Arc<Current>,
    config: Arc<ServerConfig>,
}

impl Tls {
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let current = Arc::new(Current(RwLock::new(files.load()?)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the default provider supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { files, current, config: Arc::new(config) })
    }

    /// Accepts on `listener` (bound to `local`) and hands out connections once their
    /// handshake is done.
    pub fn listen(&self, listener: TcpListener, local: SocketAddr, cancel: CancellationToken) -> TlsListener {
        let (done, accepted) = mpsc::channel(HANDSHAKES_AT_ONCE);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config));
        tokio::spawn(accept_and_handshake(listener, acceptor, done, cancel));
        TlsListener { accepted, local }
    }

    /// Reads the files again whenever they change, checking every `every`. A pair that
    /// cannot be used (a renewal caught half-written, a wrong key) is reported as a problem
    /// and the previous certificate stays in use.
    pub async fn keep_fresh(self, every: Duration, events: mpsc::Sender<Event>, cancel: CancellationToken) {
        let mut seen = self.files.stamp();
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let stamp = self.files.stamp();
            if stamp == seen {
                continue;
            }
            seen = stamp;
            let files = self.files.clone();
            let loaded = tokio::task::spawn_blocking(move || files.load()).await.expect("loading does not panic");
            let problems = match loaded {
                Ok(certified) => {
                    *self.current.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = certified;
                    info!(cert = %self.files.cert.display(), "TLS certificate loaded again");
                    Vec::new()
                }
                Err(error) => {
                    warn!(%error, "the changed TLS files cannot be used; the previous certificate stays in use");
                    let message = format!("TLS: {error}; the previous certificate stays in use");
                    vec![Problem::general(Severity::Warning, message)]
                }
            };
            if events.send(Event::Problems { source: ProblemSource::Tls, problems }).await.is_err() {
                return;
            }
        }
    }
}

async fn accept_and_handshake(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    done: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
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
        let (acceptor, done) = (acceptor.clone(), done.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = done.send((tls, peer)).await;
                }
                Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
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
