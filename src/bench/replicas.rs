//! `gitfleet bench replicas`: replicas on one PostgreSQL, each with collectors of its own.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{BenchError, ChildGuard, Client, io, proc_rss_kib, push_version, start_loadgens_from, wait_until};

#[derive(Clone, Debug, clap::Args)]
pub struct ReplicasArgs {
    #[arg(long, default_value_t = 5)]
    replicas: usize,
    /// Simulated collectors per replica.
    #[arg(long, default_value_t = 19_500)]
    agents: usize,
    /// Loadgen processes per replica (each may open 20,000 files).
    #[arg(long, default_value_t = 2)]
    processes: usize,
    /// A PostgreSQL database the bench may create another database from (it is dropped at
    /// the end): `postgres://user@host:port/postgres`.
    #[arg(long)]
    database: String,
    #[arg(long)]
    database_password_file: Option<PathBuf>,
    /// Seconds to count database writes for: at least 60 covers a whole minute of
    /// `last_seen` writes.
    #[arg(long, default_value_t = 60)]
    sample_seconds: u64,
    /// Where to put the repository and the replicas' data (a temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One replica's process and addresses.
struct Replica {
    process: ChildGuard,
    web: std::net::SocketAddr,
    opamp: std::net::SocketAddr,
}

fn free_address() -> Result<std::net::SocketAddr, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(io("cannot find a free port"))
}

/// A connection to the bench's database server.
fn connect(url: &str, password: Option<&str>) -> Result<postgres::Client, BenchError> {
    let mut config: postgres::Config =
        url.parse().map_err(|error| BenchError::Failed(format!("--database: {error}")))?;
    if let Some(password) = password {
        config.password(password);
    }
    config
        .connect(postgres::NoTls)
        .map_err(|error| BenchError::Failed(format!("cannot connect to --database: {error}")))
}

/// Transactions committed and rows written in `database` so far.
fn database_activity(client: &mut postgres::Client, database: &str) -> Result<(i64, i64), BenchError> {
    let row = client
        .query_one(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = $1",
            &[&database],
        )
        .map_err(|error| BenchError::Failed(format!("reading pg_stat_database: {error}")))?;
    Ok((row.get(0), row.get(1)))
}

/// The WebSocket collectors connected to the replica itself, from its metrics.
fn connected_here(client: &Client, web: std::net::SocketAddr) -> Result<u64, BenchError> {
    let raw = client.get(web, "/metrics")?;
    Ok(String::from_utf8_lossy(&raw)
        .lines()
        .find(|line| line.starts_with("gitfleet_instances_connected{") && line.contains("websocket"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0))
}

pub fn run(args: &ReplicasArgs) -> Result<(), BenchError> {
    let (replicas, agents, total) = (args.replicas.max(2), args.agents, args.replicas.max(2) * args.agents);
    let temp = tempfile::TempDir::new().map_err(io("cannot create a temporary directory"))?;
    let root = args.dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let _ = std::fs::remove_dir_all(root.join("repo"));
    let repo = crate::demo::prepare_repository(&root).map_err(|error| BenchError::Failed(error.to_string()))?;
    println!(
        "gitfleet bench replicas: {replicas} replicas on one PostgreSQL, {agents} WebSocket agents each ({total} in all), each replica in its own process"
    );
    let password = match &args.database_password_file {
        Some(path) => {
            Some(std::fs::read_to_string(path).map_err(io("reading --database-password-file"))?.trim_end().to_owned())
        }
        None => None,
    };
    let name = format!("gitfleet_bench_{}", std::process::id());
    let mut admin = connect(&args.database, password.as_deref())?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .map_err(|error| BenchError::Failed(format!("cannot create database {name}: {error}")))?;
    let dropped = DropDatabase { url: args.database.clone(), password: password.clone(), name: name.clone() };
    let url = match args.database.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => return Err(BenchError::Failed("--database must be a postgres:// URL".into())),
    };
    let key_file = root.join("secret-key");
    let key = crate::install::seal::SecretKey::generate().map_err(|error| BenchError::Failed(error.to_string()))?;
    std::fs::write(&key_file, key).map_err(io("writing the secret key"))?;

    let exe = std::env::current_exe().map_err(io("cannot find the gitfleet binary"))?;
    let start = |index: usize| -> Result<Replica, BenchError> {
        let (web, opamp) = (free_address()?, free_address()?);
        let data = root.join(format!("data-r{index}"));
        let _ = std::fs::remove_dir_all(&data);
        let mut serve = Command::new(&exe);
        serve
            .args(["serve", "--repo", &repo.display().to_string(), "--poll-interval", "1h"])
            .args(["--web-listen", &web.to_string(), "--listen", &opamp.to_string()])
            .args(["--max-connections", &(agents + 100).to_string()])
            .args(["--new-instances-burst", &(total + 100).to_string()])
            .args(["--database", &url, "--replica-name", &format!("r{index}")])
            .arg("--secret-key-file")
            .arg(&key_file)
            .arg("--data-dir")
            .arg(&data);
        if let Some(file) = &args.database_password_file {
            serve.arg("--database-password-file").arg(file);
        }
        let process = serve
            .env("RUST_LOG", std::env::var("GITFLEET_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(io("cannot start a replica"))?;
        Ok(Replica { process: ChildGuard(process), web, opamp })
    };
    let client = Client { tls: None };
    let mut running: Vec<Option<Replica>> = Vec::new();
    running.push(Some(start(0)?));
    let leader_web = running[0].as_ref().expect("started").web;
    wait_until("the first replica to lead and reconcile", Duration::from_secs(60), || {
        Ok(client.api(leader_web, "/api/v1/fleets/prod-gateway").is_ok_and(|f| f["token"]["id"].is_string()))
    })?;
    for index in 1..replicas {
        running.push(Some(start(index)?));
    }
    for replica in running.iter().flatten() {
        wait_until("every replica to follow", Duration::from_secs(60), || {
            Ok(client.api(replica.web, "/api/v1/repo").is_ok_and(|r| r["commit"].is_string()))
        })?;
    }
    let token = crate::install::token::read_token_file(&root.join("data-r0"), "prod-gateway", Duration::from_secs(10))
        .map_err(io("cannot read the token of prod-gateway"))?;
    std::thread::sleep(Duration::from_secs(1));
    let baseline: Vec<u64> =
        running.iter().flatten().map(|r| proc_rss_kib(r.process.0.id())).collect::<Result<_, _>>()?;

    // Every replica gets its own collectors, dialling it directly.
    let in_sync = |web: std::net::SocketAddr, expected: usize, tag: &'static str| {
        let client = &client;
        move || -> Result<bool, BenchError> {
            let fleet = client.api(web, "/api/v1/fleets/prod-gateway")?;
            Ok(fleet["tag"] == tag && fleet["counts"]["in_sync"].as_u64() >= Some(expected as u64))
        }
    };
    let started = Instant::now();
    let mut loadgens = Vec::new();
    for (index, replica) in running.iter().flatten().enumerate() {
        loadgens.push(start_loadgens_from(
            replica.opamp,
            &token,
            (index * agents, agents),
            (index * args.processes, args.processes),
            "30s",
            None,
            Stdio::null,
        )?);
    }
    wait_until(
        "every agent in sync, seen by the leader",
        Duration::from_secs(900),
        in_sync(leader_web, total, "gateway/v1"),
    )?;
    println!(
        "  {total} agents connected and in sync at gateway/v1 (the leader's count) after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for replica in running.iter().flatten() {
        wait_until(
            "every replica to count every agent",
            Duration::from_secs(60),
            in_sync(replica.web, total, "gateway/v1"),
        )?;
    }
    std::thread::sleep(Duration::from_secs(3));
    let mut per_agent = Vec::new();
    for (replica, before) in running.iter().flatten().zip(&baseline) {
        let after = proc_rss_kib(replica.process.0.id())?;
        per_agent.push(after.saturating_sub(*before) as f64 * 1024.0 / agents as f64);
    }
    let figures: Vec<String> = per_agent.iter().map(|bytes| format!("{bytes:.0}")).collect();
    println!(
        "  memory per connected agent, each replica (holding {agents} and showing {total}): {} bytes",
        figures.join(", ")
    );

    let mut watcher = connect(&url, password.as_deref())?;
    let (commits_before, rows_before) = database_activity(&mut watcher, &name)?;
    let sampled = Instant::now();
    std::thread::sleep(Duration::from_secs(args.sample_seconds));
    let (commits_after, rows_after) = database_activity(&mut watcher, &name)?;
    let seconds = sampled.elapsed().as_secs_f64();
    println!(
        "  database at 30 s heartbeats, {total} agents: {:.1} transactions/s (reads included), {:.1} rows written/s",
        (commits_after - commits_before) as f64 / seconds,
        (rows_after - rows_before) as f64 / seconds,
    );

    let pushed = push_version(&repo, 2, "")?;
    wait_until(
        "every agent in sync at gateway/v2",
        Duration::from_secs(120),
        in_sync(leader_web, total, "gateway/v2"),
    )?;
    println!(
        "  publish + fleet bump → 100% of {total} in sync at gateway/v2, on the leader's count: {:.2} s",
        pushed.elapsed().as_secs_f64()
    );
    for replica in running.iter().flatten() {
        wait_until("every replica to agree", Duration::from_secs(60), in_sync(replica.web, total, "gateway/v2"))?;
    }
    println!("  every replica counts {total} in sync at gateway/v2 after {:.2} s", pushed.elapsed().as_secs_f64());

    // kill -9 of the leader, with every agent connected.
    let killed = Instant::now();
    drop(running[0].take());
    let survivors: Vec<&Replica> = running.iter().flatten().collect();
    let mut new_leader = None;
    wait_until("another replica to lead", Duration::from_secs(30), || {
        for replica in &survivors {
            if client.api(replica.web, "/api/v1/repo").is_ok_and(|r| r["replica"]["leading"] == true) {
                new_leader = Some(replica.web);
                return Ok(true);
            }
        }
        Ok(false)
    })?;
    println!("  leader killed (-9): another replica leads after {:.2} s", killed.elapsed().as_secs_f64());
    let connected: u64 = survivors.iter().map(|r| connected_here(&client, r.web)).sum::<Result<u64, _>>()?;
    println!(
        "  agents still connected to the {} other replicas: {connected} of {} (the dead leader's {agents} dial it alone here; behind a balancer they move)",
        survivors.len(),
        survivors.len() * agents
    );
    let new_leader = new_leader.expect("found above");
    let pushed = push_version(&repo, 3, "")?;
    let expected = survivors.len() * agents;
    wait_until(
        "the surviving agents in sync at gateway/v3",
        Duration::from_secs(120),
        in_sync(new_leader, expected, "gateway/v3"),
    )?;
    println!(
        "  publish + fleet bump through the new leader → {expected} agents in sync at gateway/v3: {:.2} s",
        pushed.elapsed().as_secs_f64()
    );
    drop(loadgens);
    drop(running);
    drop(watcher);
    drop(admin);
    drop(dropped);
    Ok(())
}

/// Drops the bench's database, however the bench ends.
struct DropDatabase {
    url: String,
    password: Option<String>,
    name: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        if let Ok(mut client) = connect(&self.url, self.password.as_deref()) {
            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}
