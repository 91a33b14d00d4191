//! `gitfleet bench hostile`: what clients that mean harm cost a running server, in figures:
//! slow requests, idle sockets up to the descriptor limit, unfinished fragmented messages,
//! megabyte reports and a flood of made-up instance ids. The server runs in its own
//! process (`--server` may name another build of gitfleet, to compare).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message as _;

use super::{BenchError, ChildGuard, Client, io, proc_rss_kib, reconciled_token};
use crate::opamp::proto::{AgentToServer, any_value};
use crate::opamp::ws::masked_frame;

#[derive(Clone, Debug, clap::Args)]
pub struct HostileArgs {
    /// Slow clients: each sends its request head one byte every `--slow-every`.
    #[arg(long, default_value_t = 1000)]
    slow: usize,
    #[arg(long, default_value = "2s")]
    slow_every: String,
    /// Sockets opened and left silent (the bench itself may open 20,000 files).
    #[arg(long, default_value_t = 19_600)]
    idle: usize,
    /// WebSockets that each send `--fragment-mib` of a message's fragments, then go quiet.
    #[arg(long, default_value_t = 100)]
    fragmented: usize,
    #[arg(long, default_value_t = 8)]
    fragment_mib: usize,
    /// Plain-HTTP reports whose `host.name` is `--huge-mib` long, each from a new instance.
    #[arg(long, default_value_t = 50)]
    huge: usize,
    #[arg(long, default_value_t = 7)]
    huge_mib: usize,
    /// Made-up instance ids posted with one token (more than the 20,000 a token may
    /// create at once by default).
    #[arg(long, default_value_t = 25_000)]
    made_up: usize,
    /// The gitfleet binary to run as the server (this one by default).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Where to put the repository and the server's data (a temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The server under attack: its process, addresses, data and the token of one fleet.
struct Target {
    process: ChildGuard,
    web: SocketAddr,
    opamp: SocketAddr,
    data: PathBuf,
    token: String,
    client: Client,
}

impl Target {
    fn rss_mib(&self) -> Result<f64, BenchError> {
        Ok(proc_rss_kib(self.process.0.id())? as f64 / 1024.0)
    }

    /// How long `GET /healthz` on the people port takes, or why it failed.
    fn healthz(&self) -> String {
        let started = Instant::now();
        match get_with_timeout(self.web, "/healthz", Duration::from_secs(5)) {
            Ok(status) => format!("{status} in {:.1} ms", started.elapsed().as_secs_f64() * 1000.0),
            Err(error) => format!("no answer ({error})"),
        }
    }

    /// What a new collector is answered when it asks to upgrade to a WebSocket.
    fn new_collector(&self) -> String {
        match upgrade(self.opamp, &self.token) {
            Ok((_, status)) => status,
            Err(error) => format!("no answer ({error})"),
        }
    }
}

pub fn run(args: &HostileArgs) -> Result<(), BenchError> {
    let temp = tempfile::TempDir::new().map_err(io("cannot create a temporary directory"))?;
    let root = args.dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let exe = match &args.server {
        Some(path) => path.clone(),
        None => std::env::current_exe().map_err(io("cannot find the gitfleet binary"))?,
    };
    println!("gitfleet bench hostile: against {}, in its own process", exe.display());
    let target = start(&exe, &root)?;
    println!("  server memory at the start: {:.1} MiB", target.rss_mib()?);
    slow_requests(&target, args.slow, crate::duration::parse_duration(&args.slow_every).map_err(BenchError::Failed)?)?;
    idle_sockets(&target, args.idle)?;
    // Twice: what the first leaves behind must not grow with the second.
    fragments(&target, args.fragmented, args.fragment_mib)?;
    fragments(&target, args.fragmented, args.fragment_mib)?;
    huge_reports(&target, args.huge, args.huge_mib)?;
    made_up_ids(&target, args.made_up)?;
    Ok(())
}

fn start(exe: &std::path::Path, root: &std::path::Path) -> Result<Target, BenchError> {
    let _ = std::fs::remove_dir_all(root.join("repo"));
    let data = root.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let repo = crate::demo::prepare_repository(root).map_err(|error| BenchError::Failed(error.to_string()))?;
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(io("cannot find a free port"))
    };
    let (web, opamp) = (free()?, free()?);
    // Only flags every build has, so that an older one can be measured the same way.
    let process = Command::new(exe)
        .args(["serve", "--repo", &repo.display().to_string(), "--poll-interval", "1h"])
        .args(["--web-listen", &web.to_string(), "--listen", &opamp.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", std::env::var("GITFLEET_BENCH_SERVER_LOG").unwrap_or_else(|_| "error".into()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(io("cannot start the server"))?;
    let process = ChildGuard(process);
    let client = Client { tls: None };
    let token = reconciled_token(&client, web, &data)?;
    Ok(Target { process, web, opamp, data, token, client })
}

/// A connection from `source` (a loopback address) to `to`, nonblocking. Only tokio's
/// `TcpSocket` binds a source address before connecting; its stream is handed back as a
/// std one.
fn connect_from(source: std::net::Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    static RUNTIME: std::sync::LazyLock<tokio::runtime::Runtime> = std::sync::LazyLock::new(|| {
        tokio::runtime::Builder::new_current_thread().enable_io().build().expect("a runtime to connect with")
    });
    RUNTIME.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source.into(), 0))?;
        socket.connect(to).await?.into_std()
    })
}

/// `GET path` answered within `timeout`: the status line.
fn get_with_timeout(to: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n")?;
    status_line(&mut stream)
}

/// Reads up to the end of an HTTP status line.
fn status_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match stream.read(&mut byte)? {
            0 => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed without an answer")),
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

/// Asks for a WebSocket with `token`: the socket, and the status line it was answered.
fn upgrade(to: SocketAddr, token: &str) -> std::io::Result<(TcpStream, String)> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    // A server past its limit may answer and close before the request is written: what
    // it answered is still there to read.
    let _ = write!(
        stream,
        "GET /v1/opamp HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte)? {
            0 if head.is_empty() => {
                return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed without an answer"));
            }
            0 => break,
            _ => head.push(byte[0]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((stream, status))
}

/// Whether the server has closed `stream` (without blocking).
fn closed(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) if error.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Times from `start` at which each socket was closed: median and max, and how many stayed.
fn closings(mut times: Vec<Duration>, total: usize) -> String {
    times.sort();
    match times.last() {
        None => format!("none of {total} closed"),
        Some(last) => format!(
            "{} of {total} closed, after {:.1} s (median) to {:.1} s",
            times.len(),
            times[times.len() / 2].as_secs_f64(),
            last.as_secs_f64()
        ),
    }
}

fn slow_requests(target: &Target, count: usize, every: Duration) -> Result<(), BenchError> {
    const HEAD: &[u8] =
        b"POST /v1/opamp HTTP/1.1\r\nHost: gitfleet\r\nContent-Type: application/x-protobuf\r\nX-Slow: ";
    const WATCHED: Duration = Duration::from_secs(90);
    let mut sockets = Vec::with_capacity(count);
    for index in 0..count {
        let source = std::net::Ipv4Addr::new(127, 0, 1, 1 + (index % 200) as u8);
        let stream = connect_from(source, target.opamp).map_err(io("a slow client cannot connect"))?;
        sockets.push(Some((stream, 0usize)));
    }
    let started = Instant::now();
    let mut closed_after = Vec::new();
    let mut healthz = None;
    while started.elapsed() < WATCHED && closed_after.len() < count {
        for slot in sockets.iter_mut() {
            let Some((stream, sent)) = slot else { continue };
            // One more byte of the head (the header value goes on forever).
            let byte = HEAD.get(*sent).copied().unwrap_or(b'a');
            let wrote = stream.write(&[byte]);
            if closed(stream) || wrote.is_err() {
                closed_after.push(started.elapsed());
                *slot = None;
            } else {
                *sent += 1;
            }
        }
        if healthz.is_none() && started.elapsed() > Duration::from_secs(5) {
            healthz = Some(target.healthz());
        }
        std::thread::sleep(every);
    }
    println!(
        "  {count} slow clients (a byte of the request head every {every:?}): {} within {} s; /healthz meanwhile: {}; memory {:.1} MiB",
        closings(closed_after, count),
        WATCHED.as_secs(),
        healthz.unwrap_or_default(),
        target.rss_mib()?
    );
    Ok(())
}

fn idle_sockets(target: &Target, count: usize) -> Result<(), BenchError> {
    const WATCHED: Duration = Duration::from_secs(60);
    let mut sockets = Vec::with_capacity(count);
    let mut refused = 0usize;
    for index in 0..count {
        let source = std::net::Ipv4Addr::new(127, 0, 2 + (index / 10_000) as u8, 1 + (index % 200) as u8);
        match connect_from(source, target.opamp) {
            Ok(stream) => sockets.push(Some(stream)),
            Err(_) => refused += 1,
        }
    }
    let opened = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let healthz = target.healthz();
    let collector = target.new_collector();
    let mut closed_after = Vec::new();
    while opened.elapsed() < WATCHED && closed_after.len() < sockets.len() {
        for slot in sockets.iter_mut() {
            if let Some(stream) = slot
                && closed(stream)
            {
                closed_after.push(opened.elapsed());
                *slot = None;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let answered_503 = closed_after.iter().filter(|after| **after < Duration::from_secs(2)).count();
    println!(
        "  {count} silent sockets ({refused} not connected): /healthz {healthz}; a new collector: {collector}; {} ({answered_503} within 2 s, past the limit); a new collector after: {}",
        closings(closed_after, sockets.len()),
        target.new_collector()
    );
    drop(sockets);
    Ok(())
}

fn fragments(target: &Target, count: usize, mib: usize) -> Result<(), BenchError> {
    const PIECE: usize = 64 * 1024;
    let before = target.rss_mib()?;
    let piece = vec![0x0au8; PIECE];
    let mut sockets = Vec::new();
    let mut cut_off = 0usize;
    for _ in 0..count {
        let (mut stream, status) = upgrade(target.opamp, &target.token).map_err(io("a WebSocket cannot connect"))?;
        if !status.contains(" 101 ") {
            return Err(BenchError::Failed(format!("the WebSocket upgrade was answered {status}")));
        }
        stream.set_write_timeout(Some(Duration::from_secs(5))).map_err(io("write timeout"))?;
        let mut sent = 0;
        let mut opcode = 0x2;
        while sent < mib * 1024 * 1024 {
            if stream.write_all(&masked_frame(false, opcode, [0; 4], &piece)).is_err() {
                cut_off += 1;
                break;
            }
            opcode = 0x0;
            sent += PIECE;
        }
        stream.set_nonblocking(true).map_err(io("nonblocking"))?;
        sockets.push(Some(stream));
    }
    std::thread::sleep(Duration::from_secs(1));
    let sent = target.rss_mib()?;
    let started = Instant::now();
    let mut closed_after = Vec::new();
    while started.elapsed() < Duration::from_secs(45) && closed_after.len() < sockets.len() {
        for slot in sockets.iter_mut() {
            if let Some(stream) = slot
                && closed(stream)
            {
                closed_after.push(started.elapsed());
                *slot = None;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let later = target.rss_mib()?;
    println!(
        "  {count} WebSockets sending {mib} MiB of one message's fragments each, then silent: memory {before:.1} MiB before, {sent:.1} MiB once sent ({cut_off} cut off while sending), {later:.1} MiB {:.0} s later; {}",
        started.elapsed().as_secs_f64(),
        closings(closed_after, count)
    );
    Ok(())
}

/// A full report of a new instance whose `host.name` is `host`.
fn described(index: usize, host: &str) -> AgentToServer {
    let mut message = crate::loadgen::full_state_of(1_000_000 + index);
    let attributes = message.agent_description.as_mut().map(|d| &mut d.non_identifying_attributes);
    for attribute in attributes.into_iter().flatten() {
        if attribute.key == "host.name" {
            attribute.value =
                Some(crate::opamp::proto::AnyValue { value: Some(any_value::Value::StringValue(host.to_owned())) });
        }
    }
    message
}

/// POSTs one OpAMP message over plain HTTP: the status code.
fn post(target: &Target, message: &AgentToServer) -> Result<u16, BenchError> {
    let body = message.encode_to_vec();
    let mut stream = TcpStream::connect(target.opamp).map_err(io("cannot reach the OpAMP port"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io("read timeout"))?;
    let head = format!(
        "POST /v1/opamp HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-protobuf\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        target.opamp,
        target.token,
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body)).map_err(io("posting a report"))?;
    let status = status_line(&mut stream).map_err(io("reading the answer to a report"))?;
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    Ok(status.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0))
}

/// The size of the store's files in the data directory.
fn store_mib(data: &std::path::Path) -> f64 {
    let bytes: u64 = ["state.db", "state.db-wal"]
        .iter()
        .filter_map(|name| std::fs::metadata(data.join(name)).ok())
        .map(|metadata| metadata.len())
        .sum();
    bytes as f64 / (1024.0 * 1024.0)
}

fn huge_reports(target: &Target, count: usize, mib: usize) -> Result<(), BenchError> {
    let before = (target.rss_mib()?, store_mib(&target.data));
    let host = "h".repeat(mib * 1024 * 1024);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for index in 0..count {
        *statuses.entry(post(target, &described(index, &host))?).or_default() += 1;
    }
    // A write every 250 ms: let it land.
    std::thread::sleep(Duration::from_secs(2));
    let after = (target.rss_mib()?, store_mib(&target.data));
    let uid = crate::opamp::codec::InstanceUid(
        described(0, "").instance_uid.as_slice().try_into().expect("the loadgen's ids are 16 bytes"),
    );
    let detail = target.client.get(target.web, &format!("/api/v1/instances/{uid}"))?.len();
    let list = target.client.get(target.web, "/api/v1/instances")?.len();
    let answered: Vec<String> = statuses.iter().map(|(code, n)| format!("{n} × {code}")).collect();
    println!(
        "  {count} reports with a {mib} MiB host.name, each a new instance ({}): memory {:.1} → {:.1} MiB, store {:.1} → {:.1} MiB; GET /api/v1/instances/<one of them> {:.1} KiB, GET /api/v1/instances {:.1} KiB",
        answered.join(", "),
        before.0,
        after.0,
        before.1,
        after.1,
        detail as f64 / 1024.0,
        list as f64 / 1024.0
    );
    Ok(())
}

fn made_up_ids(target: &Target, count: usize) -> Result<(), BenchError> {
    let before = target.rss_mib()?;
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for index in 0..count {
        *statuses.entry(post(target, &described(10_000_000 + index, "made-up"))?).or_default() += 1;
    }
    let after = target.rss_mib()?;
    let accepted = statuses.get(&200).copied().unwrap_or(0);
    let answered: Vec<String> = statuses.iter().map(|(code, n)| format!("{n} × {code}")).collect();
    println!(
        "  {count} made-up instance ids with one token in {:.1} s: {}; memory {before:.1} → {after:.1} MiB ({:.0} bytes per id taken in)",
        started.elapsed().as_secs_f64(),
        answered.join(", "),
        (after - before) * 1024.0 * 1024.0 / accepted.max(1) as f64
    );
    Ok(())
}
