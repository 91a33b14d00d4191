//! Helpers shared by the integration tests: Git repositories built with real history, the
//! real `gitfleet` binary as a server, and a small HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_rustls::rustls::{ClientConfig, ClientConnection, StreamOwned};

/// The `gitfleet` binary Cargo built for these tests.
pub fn gitfleet() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gitfleet"));
    command.env("RUST_LOG", "info,gix=warn").env_remove("GITFLEET_REPO").env_remove("GITFLEET_WEBHOOK_SECRET");
    command
}

/// `gitfleet` as a user that file permissions apply to: itself when the tests do not run as
/// root, otherwise `nobody` (through `setpriv`), running a copy of the binary in `dir`
/// (which is made traversable for it).
pub fn gitfleet_unprivileged(dir: &Path) -> Command {
    if !running_as_root() {
        return gitfleet();
    }
    use std::os::unix::fs::PermissionsExt as _;
    let binary = dir.join("gitfleet");
    if !binary.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_gitfleet"), &binary).expect("copy the binary");
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .env("RUST_LOG", "info,gix=warn")
        .env_remove("GITFLEET_REPO")
        .env("HOME", dir);
    command
}

/// A loopback port for a process a test starts, which binds it a moment later. Ports are
/// handed out below Linux's ephemeral range (32768 and up), each once per test run: a port
/// the kernel picked for `bind(0)` and released at once could be picked again for another
/// socket (a test's backend, another test's server) before its process binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const LAST: u16 = 32_000;
    // Apart per test binary run, so two runs at once rarely meet.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ =
        NEXT.compare_exchange(0, FIRST + (std::process::id() % 97) as u16 * 100, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < LAST, "out of test ports");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Whether the tests run as root, where file permissions do not apply (and PostgreSQL
/// refuses to run).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| l.strip_prefix("Uid:").map(|ids| ids.split_whitespace().next() == Some("0")))
        })
        .unwrap_or(false)
}

/// A Git repository in a temporary directory, driven through the `git` command line with
/// no user or system configuration.
pub struct GitRepo {
    pub dir: tempfile::TempDir,
}

impl GitRepo {
    pub fn new() -> Self {
        let repo = Self { dir: tempfile::tempdir().expect("temp dir") };
        repo.git(&["init", "--quiet", "--initial-branch=main"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path().display())
    }

    /// Runs git and returns its stdout; panics with stderr on failure.
    pub fn git(&self, args: &[&str]) -> String {
        let output = self.try_git(args);
        assert!(output.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn try_git(&self, args: &[&str]) -> Output {
        git_command(self.path()).args(args).output().expect("git runs")
    }

    pub fn write(&self, path: &str, content: impl AsRef<[u8]>) {
        let target = self.path().join(path);
        std::fs::create_dir_all(target.parent().expect("files have a parent")).expect("create dirs");
        std::fs::write(target, content).expect("write file");
    }

    pub fn remove(&self, path: &str) {
        std::fs::remove_file(self.path().join(path)).expect("remove file");
    }

    /// Stages everything and commits; returns the commit id.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "--allow-empty", "--message", message]);
        self.head()
    }

    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }

    pub fn tag(&self, name: &str) {
        self.git(&["tag", name]);
    }

    pub fn annotated_tag(&self, name: &str, message: &str) {
        self.git(&["tag", "--annotate", name, "--message", message]);
    }

    /// Copies the bundled example repository in and commits it.
    pub fn with_example(&self) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("example-repo");
        copy_dir(&root, self.path());
        self.commit("Example fleets and configurations")
    }
}

/// The bundled example repository with every configuration published as `v1` (annotated
/// tags, whose messages are the release notes).
pub fn example() -> GitRepo {
    let repo = GitRepo::new();
    repo.with_example();
    repo.annotated_tag("gateway/v1", "First gateway");
    repo.annotated_tag("node-agent/v1", "First node agent");
    repo.annotated_tag("sdk-agent/v1", "First SDK settings");
    repo
}

pub fn git_command(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test Author")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "Test Author")
        .env("GIT_COMMITTER_EMAIL", "author@example.com")
        .env("GIT_AUTHOR_DATE", "2026-01-02T03:04:05Z")
        .env("GIT_COMMITTER_DATE", "2026-01-02T03:04:05Z");
    command
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            std::fs::create_dir_all(&target).expect("create dir");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// A `gitfleet serve` process on a free port, killed on drop.
pub struct Server {
    child: Child,
    pub web: SocketAddr,
    pub opamp: SocketAddr,
    pub data_dir: PathBuf,
    logs: Arc<Mutex<String>>,
    /// Set when the server speaks TLS: how the helpers reach it.
    pub tls: Option<Arc<ClientConfig>>,
}

impl Server {
    /// Starts `gitfleet serve --repo <repo> <extra args>` and waits until it listens.
    pub fn start(repo: &str, data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", "127.0.0.1:0", repo, data_dir, extra)
    }

    /// Starts it on given addresses: collectors dial a fixed endpoint, so a restart must
    /// come back on the same port.
    pub fn start_on(opamp: &str, web: &str, repo: &str, data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = gitfleet()
            .args(["serve", "--repo", repo, "--web-listen", web, "--listen", opamp, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gitfleet starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(String::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("gitfleet serving") {
                    let field = |name: &str| {
                        line.split(name).nth(1).and_then(|rest| rest.split_whitespace().next()).map(str::to_owned)
                    };
                    if let (Some(web), Some(opamp)) = (field(" web="), field(" opamp=")) {
                        let _ = address_tx.send((web, opamp));
                    }
                }
                let mut logs = sink.lock().expect("log lock");
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let (web, opamp) = match address_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addresses) => addresses,
            Err(_) => {
                let _ = child.kill();
                panic!("gitfleet did not start listening; logs:\n{}", logs.lock().expect("log lock"));
            }
        };
        Self {
            child,
            web: web.parse().expect("a socket address"),
            opamp: opamp.parse().expect("a socket address"),
            data_dir: data_dir.to_owned(),
            logs,
            tls: None,
        }
    }

    /// Starts a server with `--tls-cert`/`--tls-key`; its helpers trust that certificate.
    pub fn start_tls(repo: &str, data_dir: &Path, cert: &Path, key: &Path, extra: &[&str]) -> Self {
        let (cert_text, key_text) = (cert.display().to_string(), key.display().to_string());
        let mut args = vec!["--tls-cert", &cert_text, "--tls-key", &key_text];
        args.extend_from_slice(extra);
        let mut server = Self::start(repo, data_dir, &args);
        server.tls = Some(tls_client(&[cert]));
        server
    }

    /// The fleet's install token from the operator's token file, once the server accepts it
    /// (the API shows its id: the API and the token index come from the same state).
    pub fn token(&self, fleet: &str) -> String {
        let path = self.data_dir.join("install").join(fleet).join("token");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let text = text.trim().to_owned();
                let id = text.split('.').next().unwrap_or_default().to_owned();
                let response = self.get(&format!("/api/v1/fleets/{fleet}"));
                if response.status == 200 && response.body.contains(&format!("\"{id}\"")) {
                    return text;
                }
            }
            assert!(Instant::now() < deadline, "no accepted token for fleet {fleet}; logs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The fleet's token once the server has issued one other than `old` (after a rotation
    /// or a revocation).
    pub fn new_token(&self, fleet: &str, old: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let token = self.token(fleet);
            if token != old {
                return token;
            }
            assert!(Instant::now() < deadline, "no new token for fleet {fleet}; logs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("log lock").clone()
    }

    pub fn get(&self, path: &str) -> Response {
        match &self.tls {
            None => http(self.web, "GET", path, &[], b""),
            Some(tls) => https(self.web, tls, "GET", path, &[], b""),
        }
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        let response = self.get(path);
        assert_eq!(response.status, 200, "GET {path}: {}", response.body);
        serde_json::from_str(&response.body).expect("JSON body")
    }

    /// Polls `path` until `check` accepts its JSON, or panics after `timeout` naming `what`.
    pub fn wait_for(
        &self,
        path: &str,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let response = self.get(path);
            if response.status == 200 {
                let value: serde_json::Value = serde_json::from_str(&response.body).expect("JSON body");
                if check(&value) {
                    return value;
                }
                if Instant::now() > deadline {
                    panic!("timed out waiting for {what}; last {path}: {value:#}\nlogs:\n{}", self.logs());
                }
            } else if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; {path} answered {}: {}\nlogs:\n{}",
                    response.status,
                    response.body,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit code.
    pub fn stop(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gitfleet did not stop within 15 s of SIGTERM; logs:\n{}", self.logs());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: String,
    pub body: String,
    pub bytes: Vec<u8>,
}

impl Response {
    /// The value of a response header (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
    }
}

/// One HTTP/1.1 request with `Connection: close`; enough for a test to talk to gitfleet.
pub fn http(address: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    exchange(Restarting(connect(address)), address, method, path, headers, body)
}

/// The same over TLS, trusting what `tls` trusts.
pub fn https(
    address: SocketAddr,
    tls: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    exchange(Restarting(tls_connect(address, tls)), address, method, path, headers, body)
}

fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(address).expect("connect to gitfleet");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("set timeout");
    stream
}

/// A self-signed certificate for `127.0.0.1` and its key, made by `openssl`.
pub struct SelfSigned {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl SelfSigned {
    /// Writes `<name>.crt` and `<name>.key` into `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        let output = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
            .args(["-subj", &format!("/CN={name}"), "-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the TLS tests need `openssl` (.ci/run installs it)");
        assert!(output.status.success(), "openssl: {}", String::from_utf8_lossy(&output.stderr));
        Self { cert, key }
    }
}

/// A TLS client that trusts only the certificates in `trusted` (PEM files).
pub fn tls_client(trusted: &[&Path]) -> Arc<ClientConfig> {
    tls_client_at(trusted, None)
}

/// The same, checking validity at the Unix time `at` instead of now when given.
pub fn tls_client_at(trusted: &[&Path], at: Option<u64>) -> Arc<ClientConfig> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
    #[derive(Debug)]
    struct At(u64);
    impl tokio_rustls::rustls::time_provider::TimeProvider for At {
        fn current_time(&self) -> Option<UnixTime> {
            Some(UnixTime::since_unix_epoch(Duration::from_secs(self.0)))
        }
    }
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for path in trusted {
        for cert in CertificateDer::pem_file_iter(path).expect("a PEM file") {
            roots.add(cert.expect("a certificate")).expect("a usable root");
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let builder = match at {
        None => ClientConfig::builder_with_provider(provider),
        Some(at) => ClientConfig::builder_with_details(provider, Arc::new(At(at))),
    };
    let config = builder
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A TLS stream to `address`, its handshake done; the server name is the IP address.
pub fn tls_connect(address: SocketAddr, tls: &Arc<ClientConfig>) -> TlsStream {
    tls_handshake(address, tls).expect("the TLS handshake")
}

/// The handshake, or why the client refused it.
pub fn tls_handshake(address: SocketAddr, tls: &Arc<ClientConfig>) -> std::io::Result<TlsStream> {
    let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(address.ip().into());
    let connection = ClientConnection::new(Arc::clone(tls), name).expect("a client connection");
    let mut stream = StreamOwned::new(connection, connect(address));
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut Restarting(&mut stream.sock))?;
    }
    Ok(stream)
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

fn exchange(
    mut stream: impl Read + Write,
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    // A server may answer before it has read the whole body (413) and close, which resets
    // the connection while the body is still being sent. Real clients still read that
    // answer (it arrived before the reset), and so does this one.
    let early_answer =
        |error: &std::io::Error| matches!(error.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset);
    match stream.write_all(request.as_bytes()).and_then(|()| stream.write_all(body)) {
        Err(error) if !early_answer(&error) => panic!("send request: {error}"),
        _ => {}
    }
    let mut raw = Vec::new();
    if let Err(error) = stream.read_to_end(&mut raw) {
        assert!(early_answer(&error) && !raw.is_empty(), "read response: {error}");
    }
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("HTTP response has a head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut bytes = raw[split + 4..].to_vec();
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).expect("status code");
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        bytes = dechunk(&bytes);
    }
    Response { status, headers: head, body: String::from_utf8_lossy(&bytes).into_owned(), bytes }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") {
        let Ok(size) = usize::from_str_radix(String::from_utf8_lossy(&body[..line_end]).trim(), 16) else { break };
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
    out
}

/// A stream whose reads and writes are retried when a signal interrupts them.
///
/// Socket calls on a socket with a timeout are never restarted by the kernel: a signal, or
/// the process being stopped and continued (signal(7)), makes them fail with `EINTR`. The
/// standard library retries that inside `read_exact` and `write_all`, but a WebSocket
/// calls plain `read` and `write` and takes the error as fatal, so its stream retries here.
pub struct Restarting<S>(pub S);

impl<S: Read> Read for Restarting<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        retry(|| self.0.read(buf))
    }
}

impl<S: Write> Write for Restarting<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        retry(|| self.0.write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        retry(|| self.0.flush())
    }
}

fn retry<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            done => return done,
        }
    }
}

/// A blocking stream, plain or TLS.
pub trait Stream: Read + Write + Send {}

impl<S: Read + Write + Send> Stream for S {}

/// A WebSocket client on a blocking stream that gives up after `timeout` without data.
pub type WebSocket = tungstenite::WebSocket<Restarting<Box<dyn Stream>>>;

/// Opens a WebSocket to `request`'s host (over TLS with `tls`), with reads that time out
/// after `timeout`.
pub fn websocket(
    request: impl tungstenite::client::IntoClientRequest,
    tls: Option<&Arc<ClientConfig>>,
    timeout: Duration,
) -> Result<WebSocket, tungstenite::Error> {
    let request = request.into_client_request()?;
    let uri = request.uri();
    let address = format!("{}:{}", uri.host().unwrap_or("127.0.0.1"), uri.port_u16().unwrap_or(80));
    let stream: Box<dyn Stream> = match tls {
        None => {
            let stream = TcpStream::connect(address)?;
            stream.set_read_timeout(Some(timeout))?;
            Box::new(stream)
        }
        Some(tls) => Box::new(tls_connect(address.parse().expect("an IP address and port"), tls)),
    };
    match tungstenite::client(request, Restarting(stream)) {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::HandshakeError::Failure(error)) => Err(error),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("a blocking handshake does not pause"),
    }
}

/// A scripted OpAMP agent over WebSocket.
pub struct OpampWs {
    pub socket: WebSocket,
}

impl OpampWs {
    /// Connects to `/v1/opamp` with `Authorization: Bearer <token>`; the error is the
    /// handshake failure (for example 401).
    pub fn connect(address: SocketAddr, token: &str) -> Result<Self, tungstenite::Error> {
        Self::connect_over(address, None, token)
    }

    /// Connects over `wss://` when `tls` is given.
    pub fn connect_over(
        address: SocketAddr,
        tls: Option<&Arc<ClientConfig>>,
        token: &str,
    ) -> Result<Self, tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let mut request = format!("{scheme}://{address}/v1/opamp").into_client_request().expect("a valid request");
        request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().expect("header value"));
        websocket(request, tls, Duration::from_secs(10)).map(|socket| Self { socket })
    }

    pub fn send(&mut self, message: &gitfleet::opamp::proto::AgentToServer) {
        use prost::Message;
        let mut payload = vec![0];
        message.encode(&mut payload).expect("encode");
        self.socket.send(tungstenite::Message::Binary(payload.into())).expect("send");
    }

    /// The next ServerToAgent (skipping pings); panics on anything else.
    pub fn recv(&mut self) -> gitfleet::opamp::proto::ServerToAgent {
        match self.next() {
            Ok(message) => message,
            Err(other) => panic!("expected a ServerToAgent, got {other}"),
        }
    }

    /// The next ServerToAgent, or a description of what came instead (`close 1009`, …).
    pub fn next(&mut self) -> Result<gitfleet::opamp::proto::ServerToAgent, String> {
        use prost::Message;
        loop {
            match self.socket.read() {
                Ok(tungstenite::Message::Binary(payload)) => {
                    assert_eq!(payload.first(), Some(&0), "replies carry the 0x00 header");
                    return Ok(gitfleet::opamp::proto::ServerToAgent::decode(&payload[1..]).expect("a ServerToAgent"));
                }
                Ok(tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_)) => continue,
                Ok(tungstenite::Message::Close(frame)) => {
                    return Err(format!("close {}", frame.map(|f| u16::from(f.code)).unwrap_or(0)));
                }
                Ok(other) => return Err(format!("unexpected message {other:?}")),
                Err(error) => return Err(format!("error {error}")),
            }
        }
    }
}

/// A bare clone of `work` in a new directory, as a server would hold it: the directory and
/// the clone's path in it (`fleet.git`).
pub fn bare_clone(work: &GitRepo) -> (tempfile::TempDir, PathBuf) {
    let served = tempfile::tempdir().expect("temp dir");
    let bare = served.path().join("fleet.git");
    let status = git_command(served.path()).args(["clone", "--quiet", "--bare"]).arg(work.path()).arg(&bare).status();
    assert!(status.expect("git clone runs").success());
    (served, bare)
}

/// A smart-HTTP Git server for the tests: `git http-backend` run as CGI behind a small HTTP
/// server on a loopback port. Serves every repository under `root` at `/<name>`.
pub struct GitHttpServer {
    pub address: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl GitHttpServer {
    pub fn start(root: &Path) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let root = root.to_owned();
        std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let root = root.clone();
                        std::thread::spawn(move || serve_cgi(stream, &root));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { address, stop }
    }

    pub fn url(&self, repo: &str) -> String {
        format!("http://{}/{repo}", self.address)
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn serve_cgi(mut stream: TcpStream, root: &Path) {
    stream.set_nonblocking(false).expect("blocking");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("GET").to_owned(), parts.next().unwrap_or("/").to_owned());
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.trim_end().split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).expect("chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).expect("chunk");
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(length, 0);
        reader.read_exact(&mut body).expect("body");
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut command = Command::new("git");
    command
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(content_type) = header("content-type") {
        command.env("CONTENT_TYPE", content_type);
    }
    if let Some(protocol) = header("git-protocol") {
        command.env("GIT_PROTOCOL", protocol);
    }
    if let Some(encoding) = header("content-encoding") {
        command.env("HTTP_CONTENT_ENCODING", encoding);
    }
    let mut child = command.spawn().expect("git http-backend runs");
    let mut stdin = child.stdin.take().expect("stdin");
    std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let output = child.wait_with_output().expect("http-backend output");
    let raw = output.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((end, separator)) = split else { return };
    let cgi_headers = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut status = "200 OK".to_owned();
    let mut response = Vec::new();
    let mut forwarded = String::new();
    for line in cgi_headers.lines() {
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("status") => status = value.trim().to_owned(),
            Some(_) => forwarded.push_str(&format!("{line}\r\n")),
            None => {}
        }
    }
    let payload = &raw[end + separator..];
    response.extend_from_slice(
        format!("HTTP/1.1 {status}\r\n{forwarded}Content-Length: {}\r\nConnection: close\r\n\r\n", payload.len())
            .as_bytes(),
    );
    response.extend_from_slice(payload);
    let _ = stream.write_all(&response);
}
pub mod postgres;
