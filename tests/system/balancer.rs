//! Three replicas on one PostgreSQL behind HAProxy, configured by `deploy/haproxy.cfg`
//! itself: collectors dial the balancer only, and ride out a leader killed mid-rollout, a
//! follower killed, and a PostgreSQL restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::postgres::Postgres;
use crate::common::{OpampWs, Server, free_port, http};
use crate::opamp::{full_state, report};
use crate::rollout::{APPLIED, prod_fleet, publish_v2};

const WAIT: Duration = Duration::from_secs(30);
const COLLECTORS: u8 = 6;

/// HAProxy from Debian's package, run in the foreground; killed on drop.
struct Balancer {
    child: Child,
    opamp: SocketAddr,
    web: SocketAddr,
    log: PathBuf,
}

impl Balancer {
    fn start(dir: &Path, (opamp_port, web_port): (u16, u16), replicas: [&str; 3]) -> Self {
        let binary = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
            .unwrap_or_else(|| PathBuf::from("haproxy"));
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg");
        let log = dir.join("haproxy.log");
        let mut command = Command::new(binary);
        command
            .args(["-db", "-f"])
            .arg(&config)
            .env("GITFLEET_LB_ADDRESS", "127.0.0.10")
            .env("GITFLEET_OPAMP_PORT", opamp_port.to_string())
            .env("GITFLEET_WEB_PORT", web_port.to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (n, replica) in replicas.iter().enumerate() {
            command.env(format!("GITFLEET_REPLICA_{}", n + 1), replica);
        }
        let child = command.spawn().expect("haproxy runs (tests/setup.sh installs it)");
        let balancer = Self {
            child,
            opamp: format!("127.0.0.10:{opamp_port}").parse().expect("address"),
            web: format!("127.0.0.10:{web_port}").parse().expect("address"),
            log,
        };
        balancer.wait_ready();
        balancer
    }

    /// Until the balancer has a ready replica behind it.
    fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(self.web).is_err()
            || http(self.web, "GET", "/readyz", &[], b"").status != 200
        {
            assert!(Instant::now() < deadline, "the balancer never got ready: {}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A collector that dials the balancer: it applies every config it is sent, reports what
/// it runs, heartbeats, and connects again (to whichever replica the balancer picks) when
/// its connection drops.
struct Collector {
    running: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    fn start(balancer: SocketAddr, token: String, n: u8) -> Self {
        let running: Arc<Mutex<Vec<u8>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (hash, count, stopping) = (Arc::clone(&running), Arc::clone(&connections), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let uid = [0xc0 + n; 16];
            let mut seq = 0;
            while !stopping.load(Ordering::SeqCst) {
                let Ok(mut ws) = OpampWs::connect(balancer, &token) else {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut hello = full_state(uid, seq, &format!("lb-{n}"));
                let runs: Vec<u8> = hash.lock().expect("lock").clone();
                if !runs.is_empty() {
                    hello.remote_config_status = report(uid, seq, &runs, APPLIED, "").remote_config_status;
                }
                let say = |ws: &mut OpampWs, message: gitfleet::opamp::proto::AgentToServer| {
                    use prost::Message;
                    let mut payload = vec![0];
                    message.encode(&mut payload).expect("encode");
                    ws.socket.send(tungstenite::Message::Binary(payload.into())).is_ok()
                };
                if !say(&mut ws, hello) {
                    continue;
                }
                while !stopping.load(Ordering::SeqCst) {
                    match ws.next() {
                        Ok(message) => {
                            let Some(config) = message.remote_config else { continue };
                            *hash.lock().expect("lock") = config.config_hash.clone();
                            seq += 1;
                            if !say(&mut ws, report(uid, seq, &config.config_hash, APPLIED, "")) {
                                break;
                            }
                        }
                        // The read timed out: a heartbeat, as a collector sends every 30 s.
                        Err(error) if error.contains("temporarily unavailable") || error.contains("timed out") => {
                            seq += 1;
                            let runs = hash.lock().expect("lock").clone();
                            if !say(&mut ws, report(uid, seq, &runs, APPLIED, "")) {
                                break;
                            }
                        }
                        // Closed, or the replica went away: dial the balancer again.
                        Err(_) => break,
                    }
                }
                seq += 1;
            }
        });
        Self { running, connections, stop, thread: Some(thread) }
    }

    fn runs(&self) -> Vec<u8> {
        self.running.lock().expect("lock").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The WebSocket collectors connected to `replica` itself.
fn connected_here(replica: &Server) -> u64 {
    replica
        .get("/metrics")
        .body
        .lines()
        .find(|line| line.starts_with("gitfleet_instances_connected{") && line.contains("transport=\"websocket\""))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// The fleet's page on `replica` counts every collector in sync and lists each one.
fn assert_page_shows_every_collector(replica: &Server) {
    let page = replica.get("/fleets/prod-gateway").body;
    assert!(page.contains(&format!("<b>{COLLECTORS}</b><span>in sync</span>")), "{page}");
    for n in 0..COLLECTORS {
        assert!(page.contains(&format!(">lb-{n}<")), "lb-{n} on the page of {}: {page}", replica.web);
    }
}

fn fleet(replica: &Server) -> Value {
    replica.json("/api/v1/fleets/prod-gateway")
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool, logs: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn collectors_behind_haproxy_ride_out_a_dead_leader_a_dead_follower_and_a_database_restart() {
    let mut postgres = Postgres::start();
    let data = tempfile::tempdir().expect("temp dir");
    let flags = crate::postgres::replica_flags(&postgres, "balanced", data.path());
    let repo = crate::common::example();
    // Batches of 2, then the rest, with a bake long enough to kill the leader in.
    prod_fleet(&repo, "v1", "\n[rollout]\nbake = \"4s\"\n[rollout.batches]\ninitial = 2\nfactor = 2\n");
    repo.commit("Roll out prod in batches");

    let (opamp_port, web_port) = (free_port(), free_port());
    let addresses = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];
    let start = |n: usize| {
        let (opamp, web) = (format!("{}:{opamp_port}", addresses[n]), format!("{}:{web_port}", addresses[n]));
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let name = format!("r{}", n + 1);
        args.extend(["--replica-name", &name]);
        Server::start_on(&opamp, &web, &repo.path().display().to_string(), &data.path().join(&name), &args)
    };
    let mut replicas: Vec<Option<Server>> = (0..3).map(|n| Some(start(n))).collect();
    let balancer = Balancer::start(data.path(), (opamp_port, web_port), addresses);
    let token = replicas[0].as_ref().expect("r1").token("prod-gateway");
    let logs = |replicas: &[Option<Server>]| {
        let mut text = String::new();
        for replica in replicas.iter().flatten() {
            text.push_str(&replica.logs());
        }
        text + &balancer.logs()
    };

    // Collectors spread over the three; each replica, and the balancer, shows all of them.
    let collectors: Vec<Collector> =
        (0..COLLECTORS).map(|n| Collector::start(balancer.opamp, token.clone(), n)).collect();
    for replica in replicas.iter().flatten() {
        replica.wait_for("/api/v1/fleets/prod-gateway", WAIT, "every collector in sync", |f| {
            f["counts"]["in_sync"] == u64::from(COLLECTORS)
        });
    }
    let spread: Vec<u64> = replicas.iter().flatten().map(connected_here).collect();
    assert_eq!(spread.iter().sum::<u64>(), u64::from(COLLECTORS), "{spread:?}");
    assert!(spread.iter().filter(|count| **count > 0).count() >= 2, "spread over replicas: {spread:?}");
    let through = http(balancer.web, "GET", "/api/v1/fleets/prod-gateway", &[], b"");
    let through: Value = serde_json::from_str(&through.body).expect("JSON");
    assert_eq!(through["counts"], fleet(replicas[1].as_ref().expect("r2"))["counts"]);
    for replica in replicas.iter().flatten() {
        assert_page_shows_every_collector(replica);
    }
    let v1 = collectors[0].runs();

    // A rollout; the leader is killed (-9) while the first batch bakes.
    publish_v2(&repo);
    let text = std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml")).expect("read");
    repo.write("fleets/prod-gateway.toml", text.replace("version = \"v1\"", "version = \"v2\""));
    repo.commit("Roll out gateway v2 to prod");
    let leader = replicas[0].take().expect("r1");
    leader.wait_for("/api/v1/fleets/prod-gateway", WAIT, "the first batch on v2", |f| {
        f["rollout"]["state"] == "running" && f["rollout"]["steps"][0]["in_sync"] == 2
    });
    drop(leader);
    let survivor = replicas[1].as_ref().expect("r2");
    survivor.wait_for("/api/v1/fleets/prod-gateway", WAIT, "the rollout finished by a new leader", |f| {
        f["rollout"]["state"] == "complete" && f["counts"]["in_sync"] == u64::from(COLLECTORS)
    });
    let v2 = collectors[0].runs();
    assert_ne!(v2, v1);
    wait_until("every collector on v2", || collectors.iter().all(|c| c.runs() == v2), || logs(&replicas));
    let leaders: Vec<bool> =
        replicas.iter().flatten().map(|r| r.json("/api/v1/repo")["replica"]["leading"] == true).collect();
    assert_eq!(leaders.iter().filter(|leading| **leading).count(), 1, "one leader: {leaders:?}");

    // PostgreSQL restarts: both replicas carry on, and a push still reaches every collector.
    postgres.stop();
    std::thread::sleep(Duration::from_secs(2));
    postgres.run();
    let text = std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml")).expect("read");
    repo.write("fleets/prod-gateway.toml", text.replace("version = \"v2\"", "version = \"v1\""));
    let back = repo.commit("Back to v1");
    for replica in replicas.iter().flatten() {
        replica.wait_for("/api/v1/fleets/prod-gateway", WAIT, "back on v1 after the restart", |f| {
            f["tag"] == "gateway/v1" && f["counts"]["in_sync"] == u64::from(COLLECTORS)
        });
        replica.wait_for("/api/v1/repo", WAIT, "the commit, and no store problem", |r| {
            r["commit"] == back && !r["problems"].to_string().contains("state database")
        });
    }
    wait_until("every collector on v1", || collectors.iter().all(|c| c.runs() == v1), || logs(&replicas));

    // A follower is killed: its collectors come back through the balancer to the last one.
    let follower = (1..3)
        .find(|n| replicas[*n].as_ref().is_some_and(|r| r.json("/api/v1/repo")["replica"]["leading"] == false))
        .expect("a follower");
    let before: usize = collectors.iter().map(|c| c.connections.load(Ordering::SeqCst)).sum();
    drop(replicas[follower].take());
    let last = replicas.iter().flatten().next().expect("one replica left");
    wait_until(
        "every collector on the last replica",
        || connected_here(last) == u64::from(COLLECTORS),
        || logs(&replicas),
    );
    let after: usize = collectors.iter().map(|c| c.connections.load(Ordering::SeqCst)).sum();
    assert!(after > before, "collectors dialled again: {before} → {after}");
    last.wait_for("/api/v1/fleets/prod-gateway", WAIT, "all in sync on the last replica", |f| {
        f["counts"]["in_sync"] == u64::from(COLLECTORS) && f["counts"]["stale"] == 0
    });
    assert_page_shows_every_collector(last);
    drop(collectors);
}
