//! `gitfleet loadgen`: simulated collectors that behave like the OpAMP Supervisor, for the
//! demo, tests and benchmarks. Each agent sends its full state first, answers a remote config
//! with APPLYING then APPLIED (or FAILED with a message, then rolls back to its previous
//! config as the supervisor's automatic rollback does), reports its effective config (a
//! local config until a remote one is applied) and health, heartbeats, honours
//! ReportFullState and new instance ids, takes a token offered in connection settings (and
//! reconnects with it, as after a rotation), and reconnects with backoff (the first retry
//! immediate, like opamp-go). Figures are printed as JSON.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use prost::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::duration::parse_duration;
use crate::opamp::proto::{
    AgentConfigFile, AgentConfigMap, AgentDescription, AgentDisconnect, AgentToServer, AnyValue, ComponentHealth,
    EffectiveConfig, KeyValue, RemoteConfigStatus, ServerToAgent, any_value,
};

/// What a supervisor with remote config enabled and `accepts_opamp_connection_settings`
/// announces (opamp.md §4.2).
const CAPABILITIES: u64 = 0x3847 | 0x100;
const REPORT_FULL_STATE: u64 = 0x1;

/// The config a simulated collector runs before any remote config (a host's own
/// `config.yaml`): what it reports as its effective config until one is applied.
const LOCAL_CONFIG: &str = "receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 0.0.0.0:4317
      http:
        endpoint: 0.0.0.0:4318
processors:
  memory_limiter:
    check_interval: 1s
    limit_percentage: 80
  batch: {}
exporters:
  debug: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter, batch]
      exporters: [debug]
";

#[derive(Clone, Debug, clap::Args)]
pub struct LoadgenArgs {
    /// The OpAMP endpoint: ws://host:4320/v1/opamp (WebSocket), wss://… (WebSocket over
    /// TLS, with --ca-file) or http://… (plain HTTP).
    #[arg(long)]
    pub url: String,
    /// The PEM certificate (the server's own, or its CA's) that wss:// connections trust.
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// The fleet's install token.
    #[arg(long, env = "GITFLEET_LOADGEN_TOKEN", hide_env_values = true)]
    pub token: String,
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// Index of the first agent: several processes use disjoint ranges, so that instance
    /// ids and host names do not collide.
    #[arg(long, default_value_t = 0)]
    pub first_agent: usize,
    /// Heartbeat (WebSocket) or polling (HTTP) interval.
    #[arg(long, default_value = "30s")]
    pub heartbeat: String,
    /// Share of configs (0 to 1) an agent fails to apply, chosen per agent and config.
    #[arg(long, default_value_t = 0.0)]
    pub fail_ratio: f64,
    /// Source addresses to spread connections over, e.g. 127.0.0.2-127.0.0.41.
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<String>,
    /// New connections per second while starting up.
    #[arg(long, default_value_t = 2000)]
    pub connect_rate: u32,
    /// Also print figures every this often (one JSON line each).
    #[arg(long)]
    pub report_every: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("--url `{0}`: expected ws://host:port/path, wss://host:port/path or http://host:port/path")]
    BadUrl(String),
    #[error("--url `{url}`: cannot resolve {host}: {message}")]
    Unresolved { url: String, host: String, message: String },
    #[error("{0}")]
    Failed(String),
    #[error("--ca-file: {0}")]
    BadCaFile(String),
    #[error("--url wss://… needs --ca-file, the certificate to trust")]
    NoCaFile,
    #[error("--{flag}: {message}")]
    BadFlag { flag: &'static str, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    WebSocket,
    Http,
}

struct Target {
    transport: Transport,
    address: SocketAddr,
    host_header: String,
    /// The host as written in the URL (a name, or an address without brackets).
    host: String,
    path: String,
    /// For wss://: what the server's certificate is checked against.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Target {
    /// The name the server's certificate must carry: the URL's host name, or its address.
    fn server_name(&self) -> tokio_rustls::rustls::pki_types::ServerName<'static> {
        tokio_rustls::rustls::pki_types::ServerName::try_from(self.host.clone())
            .unwrap_or_else(|_| tokio_rustls::rustls::pki_types::ServerName::IpAddress(self.address.ip().into()))
    }
}

/// Parses the URL and resolves its host once (names included, like `localhost`).
fn parse_url(url: &str, ca_file: Option<&std::path::Path>) -> Result<Target, LoadgenError> {
    let bad = || LoadgenError::BadUrl(url.to_owned());
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let (transport, secure, default_port) = match scheme {
        "ws" => (Transport::WebSocket, false, 80),
        "wss" => (Transport::WebSocket, true, 443),
        "http" => (Transport::Http, false, 80),
        _ => return Err(bad()),
    };
    let (authority, path) =
        rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/v1/opamp".to_owned()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, port.parse::<u16>().map_err(|_| bad())?),
        _ => (authority, default_port),
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(['@', '/', '?', '#']) {
        return Err(bad());
    }
    let unresolved = |message: String| LoadgenError::Unresolved { url: url.to_owned(), host: host.to_owned(), message };
    let address = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|error| unresolved(error.to_string()))?
        .next()
        .ok_or_else(|| unresolved("no address".to_owned()))?;
    let tls = match (secure, ca_file) {
        (false, _) => None,
        (true, None) => return Err(LoadgenError::NoCaFile),
        (true, Some(ca_file)) => {
            let config = crate::tls::client_trusting(ca_file).map_err(LoadgenError::BadCaFile)?;
            Some(tokio_rustls::TlsConnector::from(config))
        }
    };
    Ok(Target { transport, address, host_header: authority.to_owned(), host: host.to_owned(), path, tls })
}

/// `127.0.0.2-127.0.0.41` → every address in the range.
pub fn parse_ip_range(text: &str) -> Result<Vec<IpAddr>, String> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let first: Ipv4Addr = first.trim().parse().map_err(|_| format!("`{first}` is not an IPv4 address"))?;
    let last: Ipv4Addr = last.trim().parse().map_err(|_| format!("`{last}` is not an IPv4 address"))?;
    let (first, last) = (u32::from(first), u32::from(last));
    if last < first || last - first > 65_535 {
        return Err(format!("`{text}` is not an ascending range of at most 65,536 addresses"));
    }
    Ok((first..=last).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))).collect())
}

/// Figures, shared by every agent.
#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    configs_received: AtomicU64,
    applied: AtomicU64,
    failed: AtomicU64,
    heartbeats: AtomicU64,
    errors: AtomicU64,
    refused: AtomicU64,
    /// Agents refused for good (401): the token is wrong, revoked or expired.
    unauthorized: AtomicU64,
    /// Agents that tried to connect (not those stopped before their turn), and those that
    /// connected at least once.
    tried: AtomicU64,
    reached: AtomicU64,
    /// What went wrong last, for the one line a failed run ends with.
    last_error: Mutex<Option<String>>,
    /// Microseconds from receiving a config to sending its final status.
    apply_micros: Mutex<Vec<u32>>,
}

#[derive(Debug, Serialize)]
pub struct Figures {
    pub agents: usize,
    pub transport: &'static str,
    pub elapsed_seconds: f64,
    pub connected: u64,
    pub connects: u64,
    pub disconnects: u64,
    pub configs_received: u64,
    pub applied: u64,
    pub failed: u64,
    pub heartbeats: u64,
    pub errors: u64,
    pub refused: u64,
    /// Agents refused with 401 (they stop).
    pub unauthorized: u64,
    /// Agents that tried to connect and never did during the run.
    pub never_connected: u64,
    pub last_error: Option<String>,
    pub apply_latency_ms: Option<Latency>,
}

impl Figures {
    /// Why the run failed, in one line: agents refused for good, or agents that never got
    /// through. Throttling and errors that agents recovered from are only counted.
    pub fn failure(&self) -> Option<String> {
        if self.unauthorized > 0 {
            return Some(format!(
                "{} of {} agents were refused (401): the token is not valid for this server, or it was revoked or expired",
                self.unauthorized, self.agents
            ));
        }
        if self.never_connected > 0 {
            let why = self.last_error.as_deref().unwrap_or("no answer");
            return Some(format!("{} of {} agents never connected: {why}", self.never_connected, self.agents));
        }
        None
    }
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    fn error(&self, what: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(what.to_string());
    }

    fn figures(&self, agents: usize, transport: Transport, started: Instant) -> Figures {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut samples = self.apply_micros.lock().unwrap_or_else(|p| p.into_inner()).clone();
        samples.sort_unstable();
        let at = |q: f64| f64::from(samples[((samples.len() - 1) as f64 * q).round() as usize]) / 1000.0;
        Figures {
            agents,
            transport: if transport == Transport::WebSocket { "websocket" } else { "http" },
            elapsed_seconds: started.elapsed().as_secs_f64(),
            connected: load(&self.connected),
            connects: load(&self.connects),
            disconnects: load(&self.disconnects),
            configs_received: load(&self.configs_received),
            applied: load(&self.applied),
            failed: load(&self.failed),
            heartbeats: load(&self.heartbeats),
            errors: load(&self.errors),
            refused: load(&self.refused),
            unauthorized: load(&self.unauthorized),
            never_connected: load(&self.tried).saturating_sub(load(&self.reached)),
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            apply_latency_ms: (!samples.is_empty()).then(|| Latency {
                p50: at(0.5),
                p90: at(0.9),
                p99: at(0.99),
                max: at(1.0),
            }),
        }
    }
}

/// One simulated collector's state.
struct Agent {
    index: usize,
    uid: Vec<u8>,
    sequence: u64,
    /// The config it runs (hash, body) and the one before.
    running: Option<(Vec<u8>, Vec<u8>)>,
    previous: Option<(Vec<u8>, Vec<u8>)>,
    status: RemoteConfigStatus,
    fail_ratio: f64,
    /// The token of an accepted connection-settings offer: what the agent dials with from
    /// now on, as the Supervisor does after a token rotation.
    offered_token: Option<String>,
}

impl Agent {
    fn new(index: usize, fail_ratio: f64) -> Self {
        let digest = Sha256::digest(format!("gitfleet-loadgen-{index}").as_bytes());
        let mut uid = digest[..16].to_vec();
        uid[6] = (uid[6] & 0x0f) | 0x40;
        uid[8] = (uid[8] & 0x3f) | 0x80;
        Self {
            index,
            uid,
            sequence: 0,
            running: None,
            previous: None,
            status: RemoteConfigStatus::default(),
            fail_ratio,
            offered_token: None,
        }
    }

    /// The token to dial with: the offered one once accepted, else the one given.
    fn token<'a>(&'a self, given: &'a str) -> &'a str {
        self.offered_token.as_deref().unwrap_or(given)
    }

    fn next(&mut self, mut message: AgentToServer) -> AgentToServer {
        message.instance_uid = self.uid.clone();
        message.sequence_num = self.sequence;
        message.capabilities = CAPABILITIES;
        self.sequence += 1;
        message
    }

    fn full_state(&mut self) -> AgentToServer {
        let text = |key: &str, value: String| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value)) }),
        };
        let effective =
            self.running.as_ref().map(|(_, body)| body.clone()).unwrap_or_else(|| LOCAL_CONFIG.as_bytes().to_vec());
        let message = AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![
                    text("service.name", "otelcol-contrib".into()),
                    text("service.version", "0.115.0".into()),
                ],
                non_identifying_attributes: vec![
                    text("host.name", format!("loadgen-{:05}", self.index)),
                    text("os.type", "linux".into()),
                    text("host.arch", if self.index % 4 == 0 { "arm64".into() } else { "amd64".into() }),
                ],
            }),
            health: Some(ComponentHealth { healthy: true, status: "StatusOK".into(), ..Default::default() }),
            effective_config: Some(effective_config(effective)),
            remote_config_status: Some(self.status.clone()),
            ..Default::default()
        };
        self.next(message)
    }

    fn heartbeat(&mut self) -> AgentToServer {
        self.next(AgentToServer::default())
    }

    fn disconnect(&mut self) -> AgentToServer {
        self.next(AgentToServer { agent_disconnect: Some(AgentDisconnect {}), ..Default::default() })
    }

    /// What to send after a reply: nothing, a full state, or the statuses of applying a config.
    fn on_reply(&mut self, reply: &ServerToAgent, stats: &Stats) -> Vec<AgentToServer> {
        if let Some(identification) = &reply.agent_identification
            && identification.new_instance_uid.len() == 16
        {
            self.uid = identification.new_instance_uid.clone();
        }
        let mut out = Vec::new();
        if reply.flags & REPORT_FULL_STATE != 0 {
            out.push(self.full_state());
        }
        if let Some(token) = offered_token(reply) {
            // Taken at the next connection, as the Supervisor reconnects with new settings.
            self.offered_token = Some(token);
        }
        let Some(remote) = &reply.remote_config else { return out };
        let received = Instant::now();
        stats.configs_received.fetch_add(1, Ordering::Relaxed);
        let body =
            remote.config.as_ref().and_then(|c| c.config_map.get("")).map(|f| f.body.clone()).unwrap_or_default();
        let hash = remote.config_hash.clone();
        if self.running.as_ref().is_some_and(|(running, _)| *running == hash) {
            // Functionally the same config: the supervisor answers APPLIED at once.
            self.status = RemoteConfigStatus { last_remote_config_hash: hash, status: 1, error_message: String::new() };
            out.push(self.status_message(None));
            return out;
        }
        self.status =
            RemoteConfigStatus { last_remote_config_hash: hash.clone(), status: 2, error_message: String::new() };
        out.push(self.status_message(None));
        if self.fails(&hash) {
            self.status = RemoteConfigStatus {
                last_remote_config_hash: hash,
                status: 3,
                error_message: "simulated: exporter \"otlphttp\": connection refused; rolled back".into(),
            };
            out.push(self.status_message(None));
            stats.failed.fetch_add(1, Ordering::Relaxed);
            // Automatic rollback: the previous config runs again and is reported APPLIED.
            if let Some((previous, _)) = &self.running {
                self.status = RemoteConfigStatus {
                    last_remote_config_hash: previous.clone(),
                    status: 1,
                    error_message: String::new(),
                };
                out.push(self.status_message(None));
            }
        } else {
            self.previous = self.running.replace((hash.clone(), body.clone()));
            self.status = RemoteConfigStatus { last_remote_config_hash: hash, status: 1, error_message: String::new() };
            out.push(self.status_message(Some(body)));
            stats.applied.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u32::try_from(received.elapsed().as_micros()).unwrap_or(u32::MAX);
        let mut samples = stats.apply_micros.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < 1_000_000 {
            samples.push(micros);
        }
        out
    }

    fn status_message(&mut self, effective: Option<Vec<u8>>) -> AgentToServer {
        let message = AgentToServer {
            remote_config_status: Some(self.status.clone()),
            effective_config: effective.map(effective_config),
            ..Default::default()
        };
        self.next(message)
    }

    /// Whether this agent fails this config: a stable choice per agent and hash.
    fn fails(&self, hash: &[u8]) -> bool {
        if self.fail_ratio <= 0.0 {
            return false;
        }
        let digest = Sha256::digest([&self.uid[..], hash].concat());
        let draw = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
        draw < self.fail_ratio
    }
}

/// The bearer token of a connection-settings offer for the OpAMP connection, if any.
fn offered_token(reply: &ServerToAgent) -> Option<String> {
    let headers = reply.connection_settings.as_ref()?.opamp.as_ref()?.headers.as_ref()?;
    let authorization = headers.headers.iter().find(|h| h.key.eq_ignore_ascii_case("authorization"))?;
    let token = authorization.value.strip_prefix("Bearer ")?;
    Some(token.to_owned()).filter(|token| !token.is_empty())
}

/// The first message loadgen agent `index` sends: a full state report.
pub(crate) fn full_state_of(index: usize) -> AgentToServer {
    Agent::new(index, 0.0).full_state()
}

fn effective_config(body: Vec<u8>) -> EffectiveConfig {
    let file = AgentConfigFile { body, content_type: String::new() };
    EffectiveConfig { config_map: Some(AgentConfigMap { config_map: [(String::new(), file)].into_iter().collect() }) }
}

/// Runs until `--duration` has passed or Ctrl-C.
pub async fn run(args: &LoadgenArgs) -> Result<Figures, LoadgenError> {
    let stop = CancellationToken::new();
    let duration = args
        .duration
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|message| LoadgenError::BadFlag { flag: "duration", message })?;
    let stopper = stop.clone();
    tokio::spawn(async move {
        match duration {
            Some(duration) => {
                tokio::select! {
                    () = tokio::time::sleep(duration) => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        stopper.cancel();
    });
    run_until(args, stop).await
}

/// Runs until `stop` is cancelled.
pub async fn run_until(args: &LoadgenArgs, stop: CancellationToken) -> Result<Figures, LoadgenError> {
    let target = Arc::new(parse_url(&args.url, args.ca_file.as_deref())?);
    let heartbeat =
        parse_duration(&args.heartbeat).map_err(|message| LoadgenError::BadFlag { flag: "heartbeat", message })?;
    let report_every = args
        .report_every
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|message| LoadgenError::BadFlag { flag: "report-every", message })?;
    if !(0.0..=1.0).contains(&args.fail_ratio) {
        return Err(LoadgenError::BadFlag { flag: "fail-ratio", message: "must be between 0 and 1".into() });
    }
    let sources = match &args.source_ips {
        Some(range) => {
            parse_ip_range(range).map_err(|message| LoadgenError::BadFlag { flag: "source-ips", message })?
        }
        None => Vec::new(),
    };
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let token = Arc::new(args.token.clone());
    let mut tasks = Vec::with_capacity(args.agents);
    let pause = Duration::from_secs_f64(1.0 / f64::from(args.connect_rate.max(1)));
    for offset in 0..args.agents {
        if stop.is_cancelled() {
            // The run ended before every agent's turn: the rest never start.
            break;
        }
        let index = args.first_agent + offset;
        let source = (!sources.is_empty()).then(|| sources[offset % sources.len()]);
        let agent = Agent::new(index, args.fail_ratio);
        let (target, token, stats, stop) = (Arc::clone(&target), Arc::clone(&token), Arc::clone(&stats), stop.clone());
        tasks.push(tokio::spawn(async move {
            match target.transport {
                Transport::WebSocket => run_websocket(agent, &target, &token, source, heartbeat, &stats, stop).await,
                Transport::Http => run_http(agent, &target, &token, source, heartbeat, &stats, stop).await,
            }
        }));
        tokio::time::sleep(pause).await;
    }
    let reporting = report_every.map(|every| {
        let (stats, stop, agents, transport) = (Arc::clone(&stats), stop.clone(), args.agents, target.transport);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => println!("{}", serde_json::to_string(&stats.figures(agents, transport, started)).expect("figures serialize")),
                }
            }
        })
    });
    stop.cancelled().await;
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    if let Some(reporting) = reporting {
        let _ = reporting.await;
    }
    Ok(stats.figures(args.agents, target.transport, started))
}

async fn connect_tcp(target: &Target, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if target.address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(target.address).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// opamp-go's reconnect: immediate, then 0.5 s × 1.5ⁿ with jitter, at most 60 s; or the
/// server's Retry-After when it is longer.
fn backoff(attempt: u32, index: usize) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    let base = 0.5 * 1.5f64.powi(attempt.min(20) as i32 - 1);
    let jitter =
        0.5 + ((index as u64).wrapping_mul(2_654_435_761).wrapping_add(u64::from(attempt)) % 1000) as f64 / 1000.0;
    Duration::from_secs_f64((base * jitter).min(60.0))
}

async fn run_websocket(
    mut agent: Agent,
    target: &Target,
    token: &str,
    source: Option<IpAddr>,
    heartbeat: Duration,
    stats: &Stats,
    stop: CancellationToken,
) {
    let mut attempt = 0u32;
    let mut reached = false;
    while !stop.is_cancelled() {
        let delay = backoff(attempt, agent.index);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        attempt += 1;
        let url = format!("ws://{}{}", target.host_header, target.path);
        let Ok(mut request) = tungstenite::client::IntoClientRequest::into_client_request(url.as_str()) else { return };
        let Ok(authorization) = format!("Bearer {}", agent.token(token)).parse() else { return };
        request.headers_mut().insert("Authorization", authorization);
        if attempt == 1 && !reached {
            stats.tried.fetch_add(1, Ordering::Relaxed);
        }
        let tcp = match connect_tcp(target, source).await {
            Ok(tcp) => tcp,
            Err(error) => {
                stats.error(format_args!("cannot connect to {}: {error}", target.address));
                continue;
            }
        };
        let stream = match &target.tls {
            None => Either::Left(tcp),
            Some(connector) => match connector.connect(target.server_name(), tcp).await {
                Ok(tls) => Either::Right(tls),
                Err(error) => {
                    stats.error(format_args!("TLS with {}: {error}", target.host_header));
                    continue;
                }
            },
        };
        let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        let mut socket = match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
            Ok((socket, _)) => socket,
            Err(tungstenite::Error::Http(response)) if response.status() == 401 => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(tungstenite::Error::Http(response)) if matches!(response.status().as_u16(), 429 | 503) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("the server answered {} (busy)", response.status().as_u16()));
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or_default();
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(retry_after) => {}
                }
                continue;
            }
            Err(tungstenite::Error::Http(response)) => {
                stats.error(format_args!("the WebSocket upgrade was answered {}", response.status()));
                continue;
            }
            Err(error) => {
                stats.error(format_args!("WebSocket handshake: {error}"));
                continue;
            }
        };
        if !reached {
            reached = true;
            stats.reached.fetch_add(1, Ordering::Relaxed);
        }
        attempt = 0;
        stats.connects.fetch_add(1, Ordering::Relaxed);
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let send = |message: AgentToServer| {
            let mut payload = vec![0];
            message.encode(&mut payload).expect("a Vec grows");
            tungstenite::Message::Binary(payload.into())
        };
        let mut ok = socket.send(send(agent.full_state())).await.is_ok();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        while ok {
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = socket.send(send(agent.disconnect())).await;
                    let _ = socket.close(None).await;
                    stats.connected.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                _ = tick.tick() => {
                    stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                    ok = socket.send(send(agent.heartbeat())).await.is_ok();
                }
                received = socket.next() => match received {
                    Some(Ok(tungstenite::Message::Binary(payload))) => {
                        let protobuf = payload.strip_prefix(&[0]).unwrap_or(&payload);
                        let Ok(reply) = ServerToAgent::decode(protobuf) else {
                            stats.error("the server sent a message that is not a ServerToAgent");
                            break;
                        };
                        let dialled_with = agent.token(token).to_owned();
                        for message in agent.on_reply(&reply, stats) {
                            if socket.send(send(message)).await.is_err() {
                                ok = false;
                                break;
                            }
                        }
                        if agent.token(token) != dialled_with {
                            // New connection settings: reconnect with them at once.
                            let _ = socket.close(None).await;
                            break;
                        }
                    }
                    Some(Ok(tungstenite::Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        stats.disconnects.fetch_add(1, Ordering::Relaxed);
    }
}

async fn run_http(
    mut agent: Agent,
    target: &Target,
    token: &str,
    source: Option<IpAddr>,
    poll: Duration,
    stats: &Stats,
    stop: CancellationToken,
) {
    let mut connection: Option<BufReader<TcpStream>> = None;
    let mut pending = vec![agent.full_state()];
    let mut attempt = 0u32;
    let mut counted = false;
    let mut tried = false;
    while !stop.is_cancelled() {
        let message = if pending.is_empty() { agent.heartbeat() } else { pending.remove(0) };
        let body = message.encode_to_vec();
        if !tried {
            tried = true;
            stats.tried.fetch_add(1, Ordering::Relaxed);
        }
        if connection.is_none() {
            match connect_tcp(target, source).await {
                Ok(stream) => connection = Some(BufReader::new(stream)),
                Err(error) => {
                    stats.error(format_args!("cannot connect to {}: {error}", target.address));
                    attempt += 1;
                    pending.insert(0, message);
                    tokio::select! { () = stop.cancelled() => break, () = tokio::time::sleep(backoff(attempt, agent.index)) => {} }
                    continue;
                }
            }
        }
        let stream = connection.as_mut().expect("connected above");
        match post(stream, target, agent.token(token), &body).await {
            Ok((200, reply)) => {
                attempt = 0;
                if !counted {
                    counted = true;
                    stats.reached.fetch_add(1, Ordering::Relaxed);
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                }
                stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                match ServerToAgent::decode(reply.as_slice()) {
                    Ok(reply) => pending.extend(agent.on_reply(&reply, stats)),
                    Err(_) => stats.error("the server sent a body that is not a ServerToAgent"),
                }
            }
            Ok((401, _)) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok((status, _)) => {
                if matches!(status, 429 | 503) {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    *stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("the server answered {status} (busy)"));
                } else {
                    stats.error(format_args!("the server answered {status}"));
                }
                attempt += 1;
                connection = None;
                tokio::select! { () = stop.cancelled() => break, () = tokio::time::sleep(backoff(attempt, agent.index)) => {} }
                continue;
            }
            Err(error) => {
                stats.error(format_args!("POST {}: {error}", target.path));
                connection = None;
                pending.insert(0, message);
                attempt += 1;
                tokio::select! { () = stop.cancelled() => break, () = tokio::time::sleep(backoff(attempt, agent.index)) => {} }
                continue;
            }
        }
        if pending.is_empty() {
            tokio::select! { () = stop.cancelled() => break, () = tokio::time::sleep(poll) => {} }
        }
    }
    if let Some(stream) = connection.as_mut() {
        let disconnect = agent.disconnect().encode_to_vec();
        let _ = post(stream, target, agent.token(token), &disconnect).await;
    }
    if counted {
        stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One HTTP/1.1 POST on a kept-alive connection; returns the status and the body.
async fn post(
    stream: &mut BufReader<TcpStream>,
    target: &Target,
    token: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
        target.path,
        target.host_header,
        body.len()
    );
    let socket = stream.get_mut();
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body).await?;
    let mut status_line = String::new();
    if stream.read_line(&mut status_line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 =
        status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(std::io::ErrorKind::InvalidData)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().map_err(|_| std::io::ErrorKind::InvalidData)?;
        }
    }
    let mut reply = vec![0; length];
    stream.read_exact(&mut reply).await?;
    Ok((status, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_ranges_and_urls() {
        assert_eq!(parse_ip_range("127.0.0.2-127.0.0.4").map(|r| r.len()), Ok(3));
        assert!(parse_ip_range("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_ip_range("localhost").is_err());
        let target = parse_url("ws://127.0.0.1:4320/v1/opamp", None).expect("url");
        assert_eq!((target.transport, target.path.as_str()), (Transport::WebSocket, "/v1/opamp"));
        assert!(target.tls.is_none());
        let named = parse_url("ws://localhost:4320/v1/opamp", None).expect("a host name");
        assert_eq!((named.address.port(), named.host_header.as_str()), (4320, "localhost:4320"));
        assert!(named.address.ip().is_loopback());
        assert_eq!(parse_url("http://[::1]:9/x", None).expect("IPv6").address, "[::1]:9".parse().expect("address"));
        assert_eq!(parse_url("ws://127.0.0.1/v1/opamp", None).expect("default port").address.port(), 80);
        for bad in ["ws://:4320/x", "ws://a@b:1/x", "ws://host:port/x", "ftp://127.0.0.1:1/x"] {
            assert!(matches!(parse_url(bad, None), Err(LoadgenError::BadUrl(_))), "{bad}");
        }
        assert!(matches!(parse_url("ws://no-such-host.invalid:4320/x", None), Err(LoadgenError::Unresolved { .. })));
        assert!(matches!(parse_url("wss://127.0.0.1:4320/v1/opamp", None), Err(LoadgenError::NoCaFile)));
        let missing = std::path::Path::new("/nonexistent/ca.pem");
        assert!(matches!(parse_url("wss://127.0.0.1:4320/v1/opamp", Some(missing)), Err(LoadgenError::BadCaFile(_))));
    }

    #[test]
    fn agents_apply_fail_and_roll_back_like_the_supervisor() {
        let stats = Stats::default();
        let mut agent = Agent::new(1, 0.0);
        let config = |hash: u8| ServerToAgent {
            remote_config: Some(crate::opamp::proto::AgentRemoteConfig { config: None, config_hash: vec![hash; 32] }),
            ..Default::default()
        };
        let sent = agent.on_reply(&config(1), &stats);
        let statuses: Vec<i32> = sent.iter().map(|m| m.remote_config_status.as_ref().map_or(0, |s| s.status)).collect();
        assert_eq!(statuses, vec![2, 1], "APPLYING then APPLIED");
        let mut failing = Agent::new(2, 1.0);
        failing.on_reply(&config(1), &stats);
        let mut always = Agent::new(3, 0.0);
        always.on_reply(&config(1), &stats);
        always.fail_ratio = 1.0;
        let sent = always.on_reply(&config(2), &stats);
        let reported: Vec<(i32, u8)> = sent
            .iter()
            .filter_map(|m| m.remote_config_status.as_ref().map(|s| (s.status, s.last_remote_config_hash[0])))
            .collect();
        assert_eq!(reported, vec![(2, 2), (3, 2), (1, 1)], "APPLYING, FAILED, then APPLIED for the previous hash");
        let sequence: Vec<u64> = sent.iter().map(|m| m.sequence_num).collect();
        assert_eq!(sequence, vec![2, 3, 4], "sequence numbers follow each other");
    }
}
