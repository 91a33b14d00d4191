//! `gitfleet bench reconcile`: figures on a generated repository, measured through the same
//! code the server runs (gix mirror fetch, snapshot read, compile, and for push-to-reconciled
//! the whole running server). Prints figures; never judges them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::{self, AppError};
use crate::git::GitError;
use crate::git::mirror::Mirror;
use crate::git::snapshot::SnapshotReader;
use crate::repo::desired::{self, DesiredState};
use crate::settings::{ServeArgs, SettingsError};

#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub bench: Bench,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum Bench {
    /// OpAMP at scale, server and load generators as separate processes: memory per
    /// connected instance and idle CPU, publish + fleet bump until every instance is in
    /// sync, and CPU with every instance heartbeating each second.
    Opamp {
        /// Simulated collectors, spread over `--processes` loadgen processes.
        #[arg(long, default_value_t = 19_500)]
        agents: usize,
        #[arg(long, default_value_t = 3)]
        processes: usize,
        /// Seconds to sample CPU for.
        #[arg(long, default_value_t = 10)]
        sample_seconds: u64,
        /// Where to put the repository and the server's data (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Serve over TLS with this certificate (one valid for 127.0.0.1); agents dial wss://.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Replicas on one PostgreSQL, each with its own simulated collectors: whole-fleet
    /// publish + bump, database writes per second, memory per collector per replica, and a
    /// leader killed under load.
    Replicas(replicas::ReplicasArgs),
    /// What hostile clients cost a running server: slow requests, idle sockets up to the
    /// descriptor limit, unfinished fragmented messages, megabyte reports, made-up ids.
    Hostile(hostile::HostileArgs),
    /// Reconcile a generated repository: cold, after a one-file push, and push-to-reconciled
    /// through a running server watching a local repository.
    Reconcile {
        #[arg(long, default_value_t = 1000)]
        fleets: usize,
        /// Tags to publish, spread over `--configs` configurations.
        #[arg(long, default_value_t = 10_000)]
        tags: usize,
        #[arg(long, default_value_t = 100)]
        configs: usize,
        /// How many times each incremental measurement is repeated.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Where to generate the repository (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("`git {args}` failed: {stderr}")]
    Git { args: String, stderr: String },
    #[error(transparent)]
    Gix(#[from] GitError),
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("{0}")]
    Failed(String),
}

mod hostile;
mod replicas;

pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    match &args.bench {
        Bench::Reconcile { fleets, tags, configs, rounds, dir } => {
            reconcile(*fleets, *tags, *configs, *rounds, dir.as_deref())
        }
        Bench::Replicas(args) => replicas::run(args),
        Bench::Hostile(args) => hostile::run(args),
        Bench::Opamp { agents, processes, sample_seconds, dir, tls_cert, tls_key } => {
            let tls = tls_cert.as_deref().zip(tls_key.as_deref());
            opamp(*agents, *processes, *sample_seconds, dir.as_deref(), tls)
        }
    }
}

/// Waits for the server on `web` (with `data` as its data directory) to reconcile the demo
/// repository, and returns the install token of `prod-gateway`, the fleet the benches load.
fn reconciled_token(client: &Client, web: std::net::SocketAddr, data: &Path) -> Result<String, BenchError> {
    wait_until("the server to reconcile", Duration::from_secs(60), || {
        Ok(client.api(web, "/api/v1/fleets/prod-gateway").is_ok_and(|f| f["token"]["id"].is_string()))
    })?;
    let token = crate::install::token::read_token_file(data, "prod-gateway", Duration::from_secs(10))
        .map_err(io("cannot read the token of prod-gateway"))?;
    // Its token files and first writes settle before anything is measured.
    std::thread::sleep(Duration::from_secs(1));
    Ok(token)
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

fn reconcile(fleets: usize, tags: usize, configs: usize, rounds: usize, dir: Option<&Path>) -> Result<(), BenchError> {
    let temp = tempfile::TempDir::new().map_err(io("cannot create a temporary directory"))?;
    let root = dir.map(Path::to_path_buf).unwrap_or_else(|| temp.path().to_path_buf());
    let source = root.join("source");
    let configs = configs.max(1);
    println!("gitfleet bench reconcile: {fleets} fleets, {tags} tags over {configs} configurations, {rounds} rounds");

    let started = Instant::now();
    generate(&source, fleets, tags, configs)?;
    println!("  generated the repository with git fast-import in {}", ms(started.elapsed()));

    // Cold: a new data directory; clone, read every tag, compile.
    let data = root.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let source_url = source.display().to_string();
    let started = Instant::now();
    let mirror = Mirror::open(&source_url, &data.join("repo.git"))?;
    mirror.fetch()?;
    let fetched = started.elapsed();
    let mut reader = SnapshotReader::new();
    let repo = mirror.repo();
    let snapshot = reader.read(&repo, "refs/heads/main", "main")?;
    let read = started.elapsed() - fetched;
    let compiled = desired::compile(&snapshot, desired::Memory::default());
    let cold_total = started.elapsed();
    let mut current = compiled.desired;
    check_shape(&current, fleets, tags)?;
    println!(
        "  cold reconcile (clone + read + compile): {} (clone {}, read {}, compile {})",
        ms(cold_total),
        ms(fetched),
        ms(read),
        ms(cold_total - fetched - read)
    );

    // Cold with the mirror on disk, as after a restart: a fresh reader and no previous state.
    let started = Instant::now();
    mirror.fetch()?;
    let mut restart_reader = SnapshotReader::new();
    let snapshot = restart_reader.read(&mirror.repo(), "refs/heads/main", "main")?;
    let _ = desired::compile(&snapshot, desired::Memory::default());
    println!("  cold reconcile after a restart (fetch + read + compile): {}", ms(started.elapsed()));

    // Incremental: one fleet file changes per push.
    let mut samples = Vec::with_capacity(rounds);
    let (mut fetches, mut reads, mut compiles) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        commit_fleet_change(&source, round, configs)?;
        let started = Instant::now();
        mirror.fetch()?;
        fetches.push(started.elapsed());
        let snapshot = reader.read(&mirror.repo(), "refs/heads/main", "main")?;
        reads.push(started.elapsed() - fetches[round]);
        let compiled = desired::compile(&snapshot, desired::Memory { previous: Some(&current), ..Default::default() });
        samples.push(started.elapsed());
        compiles.push(samples[round] - fetches[round] - reads[round]);
        current = compiled.desired;
    }
    println!("  incremental reconcile after a one-file push (fetch + read + compile): {}", spread(&mut samples));
    println!("    fetch   {}", spread(&mut fetches));
    println!("    read    {}", spread(&mut reads));
    println!("    compile {}", spread(&mut compiles));

    // Push-to-reconciled through a running server watching the local repository.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(io("cannot start the runtime"))?;
    let server_data = root.join("server-data");
    let _ = std::fs::remove_dir_all(&server_data);
    let settings = ServeArgs {
        listen: "127.0.0.1:0".into(),
        web_listen: "127.0.0.1:0".into(),
        poll_interval: "1h".into(),
        no_status_branch: true,
        ..ServeArgs::new(source_url, server_data)
    }
    .validate()?;
    let samples = runtime.block_on(async {
        let running = app::start(settings).await?;
        let mut view = running.view.clone();
        let started = Instant::now();
        wait_for_commit(&mut view, &git(&source, &["rev-parse", "HEAD"])?).await?;
        println!("  server start to first reconcile (clone + read + compile + store): {}", ms(started.elapsed()));
        let mut samples = Vec::with_capacity(rounds);
        for round in 0..rounds {
            // Prepare the commit first, so that the clock measures the push itself.
            let commit = prepare_fleet_commit(&source, rounds + round, configs)?;
            let started = Instant::now();
            git(&source, &["update-ref", "refs/heads/main", &commit])?;
            wait_for_commit(&mut view, &commit).await?;
            samples.push(started.elapsed());
        }
        running.shutdown().await;
        Ok::<_, BenchError>(samples)
    })?;
    let mut samples = samples;
    println!("  push-to-reconciled, local repository watched by the server: {}", spread(&mut samples));
    Ok(())
}

fn check_shape(desired: &DesiredState, fleets: usize, tags: usize) -> Result<(), BenchError> {
    let versions: usize = desired.configs.values().map(|c| c.versions.len()).sum();
    let assigned = desired.fleets.values().filter(|f| f.assignment.is_some()).count();
    if desired.fleets.len() != fleets || versions != tags || assigned != fleets || desired.error_count() != 0 {
        return Err(BenchError::Failed(format!(
            "the generated repository did not compile as expected: {} fleets ({assigned} assigned), {versions} versions, problems: {:?}",
            desired.fleets.len(),
            desired.problems.iter().take(3).collect::<Vec<_>>()
        )));
    }
    Ok(())
}

async fn wait_for_commit(
    view: &mut tokio::sync::watch::Receiver<Arc<crate::reconciler::View>>,
    commit: &str,
) -> Result<(), BenchError> {
    let reached = tokio::time::timeout(
        Duration::from_secs(60),
        view.wait_for(|v| v.desired.as_ref().is_some_and(|d| d.commit == commit)),
    )
    .await;
    match reached {
        Ok(Ok(_)) => Ok(()),
        _ => Err(BenchError::Failed(format!("the server did not reconcile {commit} within 60 s"))),
    }
}

fn config_body(config: usize, version: usize) -> String {
    let batch = 1000 + version;
    format!(
        r#"# generated configuration cfg-{config:03}, version {version}
receivers:
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
    spike_limit_percentage: 20
  resource:
    attributes:
      - key: config.version
        value: "{version}"
        action: upsert
  batch:
    send_batch_size: {batch}
    timeout: 5s
exporters:
  otlphttp:
    endpoint: https://backend-{config}.example.com
    compression: gzip
    retry_on_failure:
      enabled: true
    sending_queue:
      enabled: true
      queue_size: 5000
extensions:
  health_check:
    endpoint: 0.0.0.0:13133
service:
  extensions: [health_check]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter, resource, batch]
      exporters: [otlphttp]
    metrics:
      receivers: [otlp]
      processors: [memory_limiter, resource, batch]
      exporters: [otlphttp]
    logs:
      receivers: [otlp]
      processors: [memory_limiter, resource, batch]
      exporters: [otlphttp]
"#
    )
}

fn fleet_body(fleet: usize, configs: usize, versions_per_config: usize, salt: usize) -> String {
    let config = fleet % configs;
    let version = if fleet % 10 == 0 {
        "latest".to_owned()
    } else {
        format!("v{}", 1 + (fleet + salt) % versions_per_config.max(1))
    };
    format!(
        "description = \"generated fleet {fleet}\"\nconfig = \"cfg-{config:03}\"\nversion = \"{version}\"\n[token]\nexpires = \"1y\"\n[health]\nstale_after = \"2m\"\n"
    )
}

/// Writes the repository with one `git fast-import` stream: a commit and an annotated tag
/// per version, then a commit with every fleet file.
fn generate(dir: &Path, fleets: usize, tags: usize, configs: usize) -> Result<(), BenchError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    git(dir, &["init", "--quiet", "--initial-branch=main"])?;
    let mut child = git_command(dir)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("cannot run git fast-import"))?;
    let versions_per_config = tags.div_ceil(configs);
    {
        let stdin = child.stdin.as_mut().expect("stdin is piped");
        let mut stream = std::io::BufWriter::new(stdin);
        let mut mark = 0usize;
        let mut time = 1_750_000_000u64;
        let mut published = 0usize;
        'versions: for version in 1..=versions_per_config {
            for config in 0..configs {
                if published == tags {
                    break 'versions;
                }
                mark += 1;
                time += 1;
                let body = config_body(config, version);
                let message = format!("cfg-{config:03} v{version}");
                write!(
                    stream,
                    "commit refs/heads/main\nmark :{mark}\ncommitter Bench <bench@gitfleet.invalid> {time} +0000\ndata {}\n{message}\nM 100644 inline configs/cfg-{config:03}.yaml\ndata {}\n{body}\n",
                    message.len(),
                    body.len()
                )
                .map_err(io("writing to git fast-import"))?;
                let note = format!("Release v{version} of cfg-{config:03}");
                write!(
                    stream,
                    "tag cfg-{config:03}/v{version}\nfrom :{mark}\ntagger Bench <bench@gitfleet.invalid> {time} +0000\ndata {}\n{note}\n",
                    note.len()
                )
                .map_err(io("writing to git fast-import"))?;
                published += 1;
            }
        }
        time += 1;
        let message = "all fleets";
        write!(
            stream,
            "commit refs/heads/main\ncommitter Bench <bench@gitfleet.invalid> {time} +0000\ndata {}\n{message}\n",
            message.len()
        )
        .map_err(io("writing to git fast-import"))?;
        for fleet in 0..fleets {
            let body = fleet_body(fleet, configs, versions_per_config, 0);
            write!(stream, "M 100644 inline fleets/fleet-{fleet:04}.toml\ndata {}\n{body}\n", body.len())
                .map_err(io("writing to git fast-import"))?;
        }
        stream.flush().map_err(io("writing to git fast-import"))?;
    }
    let output = child.wait_with_output().map_err(io("waiting for git fast-import"))?;
    if !output.status.success() {
        return Err(BenchError::Git {
            args: "fast-import".into(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    git(dir, &["reset", "--quiet", "--hard"])?;
    // A long-lived repository keeps its refs packed (git gc and forges do this).
    git(dir, &["pack-refs", "--all"])?;
    Ok(())
}

/// Changes one fleet file and commits it (the working tree follows).
fn commit_fleet_change(dir: &Path, round: usize, configs: usize) -> Result<(), BenchError> {
    let commit = prepare_fleet_commit(dir, round, configs)?;
    git(dir, &["update-ref", "refs/heads/main", &commit])?;
    Ok(())
}

/// Builds (but does not publish) a commit that changes one fleet's version.
fn prepare_fleet_commit(dir: &Path, round: usize, configs: usize) -> Result<String, BenchError> {
    let fleet = 1 + (round * 7) % 999;
    let body = fleet_body(fleet, configs, 2, round + 1);
    let mut hash_object = git_command(dir)
        .args(["hash-object", "-w", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io("cannot run git hash-object"))?;
    hash_object
        .stdin
        .as_mut()
        .expect("stdin is piped")
        .write_all(body.as_bytes())
        .map_err(io("writing to git hash-object"))?;
    let output = hash_object.wait_with_output().map_err(io("waiting for git hash-object"))?;
    let blob = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let index = dir.join(".git/bench-index");
    let index_env = index.display().to_string();
    let run = |args: &[&str]| -> Result<String, BenchError> {
        let output =
            git_command(dir).env("GIT_INDEX_FILE", &index_env).args(args).output().map_err(io("cannot run git"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(BenchError::Git { args: args.join(" "), stderr: String::from_utf8_lossy(&output.stderr).into_owned() })
        }
    };
    run(&["read-tree", "HEAD"])?;
    run(&["update-index", "--add", "--cacheinfo", &format!("100644,{blob},fleets/fleet-{fleet:04}.toml")])?;
    let tree = run(&["write-tree"])?;
    run(&["commit-tree", &tree, "-p", "HEAD", "-m", &format!("bench round {round}")])
}

/// Publishes `gateway/v<version>` (a smaller batch size each time) and moves prod-gateway to
/// it, with `rollout` as its `[rollout]`, in one ref update; when the refs moved.
fn push_version(repo: &Path, version: usize, rollout: &str) -> Result<Instant, BenchError> {
    let text = std::fs::read_to_string(repo.join("configs/gateway.yaml")).map_err(io("reading the config"))?;
    let (before, after) = (8192 >> (version - 2), 8192 >> (version - 1));
    std::fs::write(
        repo.join("configs/gateway.yaml"),
        text.replace(&format!("send_batch_size: {before}"), &format!("send_batch_size: {after}")),
    )
    .map_err(io("writing the config"))?;
    let fleet = std::fs::read_to_string(repo.join("fleets/prod-gateway.toml")).map_err(io("reading the fleet"))?;
    let fleet = fleet.replace(&format!("version = \"v{}\"", version - 1), &format!("version = \"v{version}\""));
    std::fs::write(repo.join("fleets/prod-gateway.toml"), fleet + rollout).map_err(io("writing the fleet"))?;
    git(repo, &["add", "--all"])?;
    let tree = git(repo, &["write-tree"])?;
    let commit = git(repo, &["commit-tree", &tree, "-p", "HEAD", "-m", &format!("gateway v{version} to prod")])?;
    let started = Instant::now();
    let mut update = git_command(repo)
        .args(["update-ref", "--stdin"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(io("running git update-ref"))?;
    {
        use std::io::Write;
        let stdin = update.stdin.as_mut().expect("stdin is piped");
        writeln!(stdin, "create refs/tags/gateway/v{version} {commit}\nupdate refs/heads/main {commit}")
            .map_err(io("writing to git update-ref"))?;
    }
    let status = update.wait().map_err(io("waiting for git update-ref"))?;
    if !status.success() {
        return Err(BenchError::Failed("git update-ref failed".into()));
    }
    Ok(started)
}

/// gateway/v3 to every agent in four batches without a bake: how long the whole rollout
/// takes, and how long each batch starts after the one before settled, as seen by polling
/// the API (so within a poll of the truth).
fn rollout_in_batches(
    client: &Client,
    web: std::net::SocketAddr,
    repo: &Path,
    agents: usize,
) -> Result<(), BenchError> {
    let rollout = "\n[rollout]\n[rollout.batches]\ninitial = \"25%\"\nfactor = 1\n";
    let started = push_version(repo, 3, rollout)?;
    let mut settled: Vec<Option<Instant>> = Vec::new();
    let mut begun: Vec<Option<Instant>> = Vec::new();
    let mut polls = 0usize;
    let mut poll_time = Duration::ZERO;
    let done = loop {
        if started.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Failed("the rollout of gateway/v3 did not complete within 120 s".into()));
        }
        let asked = Instant::now();
        let fleet = client.api(web, "/api/v1/fleets/prod-gateway")?;
        poll_time += asked.elapsed();
        polls += 1;
        let now = Instant::now();
        let rollout = &fleet["rollout"];
        if fleet["tag"] != "gateway/v3" || rollout["to"] != "gateway/v3" {
            continue;
        }
        let steps = rollout["steps"].as_array().cloned().unwrap_or_default();
        settled.resize(steps.len(), None);
        begun.resize(steps.len(), None);
        for (index, step) in steps.iter().enumerate() {
            let moved = step["instances"].as_u64().unwrap_or(0);
            if begun[index].is_none() && step["started_at"].is_string() {
                begun[index] = Some(now);
            }
            if settled[index].is_none() && moved > 0 && step["in_sync"].as_u64() == Some(moved) {
                settled[index] = Some(now);
            }
        }
        if rollout["state"] == "complete" && fleet["counts"]["in_sync"].as_u64() == Some(agents as u64) {
            break now;
        }
        if rollout["state"] != "running" {
            return Err(BenchError::Failed(format!("the rollout of gateway/v3 stopped: {rollout}")));
        }
        // Much finer than `POLL`, to see the gaps between batches: the looks slow the server
        // down, so the gaps measured are if anything too long.
        std::thread::sleep(POLL / 5);
    };
    let gaps: Vec<String> = (1..begun.len())
        .filter_map(|next| {
            Some(format!("{:.0} ms", begun[next]?.saturating_duration_since(settled[next - 1]?).as_secs_f64() * 1000.0))
        })
        .collect();
    println!(
        "  rollout of gateway/v3 in {} batches, no bake → 100% of {agents} in sync: {:.2} s; next batch started after the one before settled: {} (API polled every {:.0} ms)",
        begun.len(),
        done.duration_since(started).as_secs_f64(),
        gaps.join(", "),
        (poll_time + (POLL / 5) * polls as u32).as_secs_f64() * 1000.0 / polls.max(1) as f64
    );
    Ok(())
}

fn git_command(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@gitfleet.invalid")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@gitfleet.invalid");
    command
}

fn git(dir: &Path, args: &[&str]) -> Result<String, BenchError> {
    let output = git_command(dir).args(args).output().map_err(io("cannot run git"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(BenchError::Git { args: args.join(" "), stderr: String::from_utf8_lossy(&output.stderr).into_owned() })
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// `median M (min A, p90 B, max C, n N)`.
fn spread(samples: &mut [Duration]) -> String {
    if samples.is_empty() {
        return "no samples".to_owned();
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {} (min {}, p90 {}, max {}, n {})",
        ms(at(0.5)),
        ms(samples[0]),
        ms(at(0.9)),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

/// A child process killed on drop.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_rss_kib(pid: u32) -> Result<u64, BenchError> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(io("cannot read the server's /proc status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .ok_or_else(|| BenchError::Failed("no VmRSS in /proc status".into()))
}

/// User + system CPU time of a process, in seconds (Linux reports clock ticks of 1/100 s).
fn proc_cpu_seconds(pid: u32) -> Result<f64, BenchError> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(io("cannot read the server's /proc stat"))?;
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or_default();
    // Fields 14 and 15 of /proc/<pid>/stat; after the name they are at 11 and 12.
    Ok((ticks(11) + ticks(12)) as f64 / 100.0)
}

fn cpu_share(pid: u32, seconds: u64) -> Result<f64, BenchError> {
    let before = proc_cpu_seconds(pid)?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    Ok((proc_cpu_seconds(pid)? - before) / started.elapsed().as_secs_f64())
}

/// How the bench reaches the server: plain TCP, or TLS trusting the server's certificate.
struct Client {
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl Client {
    /// `GET path` with `Connection: close`; the whole response.
    fn get(&self, address: std::net::SocketAddr, path: &str) -> Result<Vec<u8>, BenchError> {
        use std::io::{Read, Write};
        let tcp = std::net::TcpStream::connect(address).map_err(io("cannot reach the server"))?;
        let mut stream: Box<dyn ReadWrite> = match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(address.ip().into());
                let connection = tokio_rustls::rustls::ClientConnection::new(Arc::clone(config), name)
                    .map_err(|error| BenchError::Failed(format!("TLS: {error}")))?;
                Box::new(tokio_rustls::rustls::StreamOwned::new(connection, tcp))
            }
        };
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
            .map_err(io("sending a request"))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io("reading a response"))?;
        Ok(raw)
    }

    /// `GET path` on the server's API, as JSON.
    fn api(&self, address: std::net::SocketAddr, path: &str) -> Result<serde_json::Value, BenchError> {
        let raw = self.get(address, path)?;
        let split =
            raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| BenchError::Failed("no HTTP head".into()))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
        let mut body = raw[split + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            let mut out = Vec::new();
            let mut rest = body.as_slice();
            while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
                let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..end]).trim(), 16).unwrap_or(0);
                if size == 0 {
                    break;
                }
                out.extend_from_slice(&rest[end + 2..end + 2 + size]);
                rest = &rest[end + 4 + size..];
            }
            body = out;
        }
        serde_json::from_slice(&body).map_err(|error| BenchError::Failed(format!("GET {path}: {error}")))
    }

    /// Fetches a page whole; returns its size.
    fn fetch(&self, address: std::net::SocketAddr, path: &str) -> Result<usize, BenchError> {
        let raw = self.get(address, path)?;
        if !raw.starts_with(b"HTTP/1.1 200") {
            let start = String::from_utf8_lossy(&raw[..raw.len().min(80)]).into_owned();
            return Err(BenchError::Failed(format!("GET {path}: {start}")));
        }
        Ok(raw.len())
    }
}

trait ReadWrite: std::io::Read + std::io::Write {}

impl<S: std::io::Read + std::io::Write> ReadWrite for S {}

/// How long the bench waits between two looks at the API. A look at a fleet of 19,500
/// counts every instance, as `GET /` does (7–11 ms of a core measured): looking much more
/// often measures the bench.
const POLL: Duration = Duration::from_millis(50);

fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool, BenchError>,
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check()? {
            return Ok(started.elapsed());
        }
        std::thread::sleep(POLL);
    }
    Err(BenchError::Failed(format!("timed out after {timeout:?} waiting for {what}")))
}

/// Starts `agents` loadgen agents over `processes` processes; their figures go to `stdout`.
fn start_loadgens(
    opamp: std::net::SocketAddr,
    token: &str,
    agents: usize,
    processes: usize,
    heartbeat: &str,
    ca_file: Option<&Path>,
    stdout: fn() -> Stdio,
) -> Result<Vec<ChildGuard>, BenchError> {
    start_loadgens_from(opamp, token, (0, agents), (0, processes), heartbeat, ca_file, stdout)
}

/// `start_loadgens` for agents `first_agent..first_agent + agents` in processes numbered
/// from `first_process` (each process has source addresses of its own).
fn start_loadgens_from(
    opamp: std::net::SocketAddr,
    token: &str,
    (first_agent, agents): (usize, usize),
    (first_process, processes): (usize, usize),
    heartbeat: &str,
    ca_file: Option<&Path>,
    stdout: fn() -> Stdio,
) -> Result<Vec<ChildGuard>, BenchError> {
    let exe = std::env::current_exe().map_err(io("cannot find the gitfleet binary"))?;
    let per_process = agents.div_ceil(processes.max(1));
    let mut children = Vec::new();
    for process in 0..processes {
        let first = process * per_process;
        let count = per_process.min(agents.saturating_sub(first));
        if count == 0 {
            break;
        }
        let first = first_agent + first;
        // 100 source addresses per process: 127.0.<process + 1>.1-100.
        let sources = format!("127.0.{n}.1-127.0.{n}.100", n = first_process + process + 1);
        let mut command = Command::new(&exe);
        match ca_file {
            None => command.args(["loadgen", "--url", &format!("ws://{opamp}/v1/opamp")]),
            Some(ca_file) => {
                command.args(["loadgen", "--url", &format!("wss://{opamp}/v1/opamp")]).arg("--ca-file").arg(ca_file)
            }
        };
        let child = command
            .args(["--agents", &count.to_string()])
            .args(["--first-agent", &first.to_string(), "--heartbeat", heartbeat, "--source-ips", &sources])
            .args(["--connect-rate", "5000", "--duration", "1h"])
            .env("GITFLEET_LOADGEN_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(stdout())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(io("cannot start a loadgen process"))?;
        children.push(ChildGuard(child));
    }
    Ok(children)
}

fn opamp(
    agents: usize,
    processes: usize,
    sample_seconds: u64,
    dir: Option<&Path>,
    tls: Option<(&Path, &Path)>,
) -> Result<(), BenchError> {
    let temp = tempfile::TempDir::new().map_err(io("cannot create a temporary directory"))?;
    let root = dir.map(Path::to_path_buf).unwrap_or_else(|| temp.path().to_path_buf());
    let repo = root.join("repo");
    let data = root.join("data");
    let _ = std::fs::remove_dir_all(&repo);
    let _ = std::fs::remove_dir_all(&data);
    let repo = crate::demo::prepare_repository(&root).map_err(|error| BenchError::Failed(error.to_string()))?;
    let over = if tls.is_some() { " over TLS" } else { "" };
    println!(
        "gitfleet bench opamp: {agents} WebSocket agents{over} in {processes} loadgen processes, server in its own process"
    );
    let ca_file = tls.map(|(cert, _)| cert);
    let client = Client { tls: ca_file.map(crate::tls::client_trusting).transpose().map_err(BenchError::Failed)? };

    let exe = std::env::current_exe().map_err(io("cannot find the gitfleet binary"))?;
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io("cannot find a free port"))?;
    let opamp_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io("cannot find a free port"))?;
    let start_server = || -> Result<ChildGuard, BenchError> {
        let mut serve = Command::new(&exe);
        serve
            .args(["serve", "--repo", &repo.display().to_string(), "--poll-interval", "1h"])
            .args(["--web-listen", &web.to_string(), "--listen", &opamp_addr.to_string()])
            .args(["--max-connections", &(agents + 100).to_string()])
            // Every agent is new to the first start, and all of them use one token.
            .args(["--new-instances-burst", &(agents + 100).to_string()])
            .arg("--data-dir")
            .arg(&data);
        if let Some((cert, key)) = tls {
            serve.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        // `GITFLEET_BENCH_SERVER_LOG` sets the server's `RUST_LOG`, to see where time goes.
        let server_log = std::env::var("GITFLEET_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into());
        Ok(ChildGuard(
            serve
                .env("RUST_LOG", server_log)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(io("cannot start the server"))?,
        ))
    };
    let server = start_server()?;
    let pid = server.0.id();
    let token = reconciled_token(&client, web, &data)?;
    let baseline_kib = proc_rss_kib(pid)?;

    // Phase 1: connect everyone with the default 30 s heartbeat.
    let in_sync = |expected: usize, tag: &str| {
        let (tag, client) = (tag.to_owned(), &client);
        move || -> Result<bool, BenchError> {
            let fleet = client.api(web, "/api/v1/fleets/prod-gateway")?;
            Ok(fleet["tag"] == tag.as_str() && fleet["counts"]["in_sync"].as_u64() == Some(expected as u64))
        }
    };
    let loadgens = start_loadgens(opamp_addr, &token, agents, processes, "30s", ca_file, Stdio::null)?;
    let took = wait_until("every agent in sync", Duration::from_secs(300), in_sync(agents, "gateway/v1"))?;
    println!("  {agents} agents connected and in sync at gateway/v1 after {:.1} s", took.as_secs_f64());
    std::thread::sleep(Duration::from_secs(2));
    let connected_kib = proc_rss_kib(pid)?;
    let per_instance = (connected_kib.saturating_sub(baseline_kib)) as f64 * 1024.0 / agents as f64;
    println!(
        "  server memory: {:.1} MiB before, {:.1} MiB with {agents} connected: {:.0} bytes ({:.1} KiB) per instance",
        baseline_kib as f64 / 1024.0,
        connected_kib as f64 / 1024.0,
        per_instance,
        per_instance / 1024.0
    );
    let idle = cpu_share(pid, sample_seconds)?;
    println!("  server CPU, idle with {agents} connected (30 s heartbeats): {:.1}% of a core", idle * 100.0);
    for path in ["/", "/fleets/prod-gateway", "/fleets/prod-gateway?sort=host&order=desc", "/metrics"] {
        let mut samples = Vec::new();
        let mut bytes = 0;
        for _ in 0..9 {
            let started = Instant::now();
            bytes = client.fetch(web, path)?;
            samples.push(started.elapsed());
        }
        println!("  GET {path} with {agents} instances ({} KiB): {}", bytes / 1024, spread(&mut samples));
    }

    // Publish gateway/v2 and move prod-gateway to it in one push.
    let started = push_version(&repo, 2, "")?;
    let converge =
        wait_until("every agent in sync at gateway/v2", Duration::from_secs(120), in_sync(agents, "gateway/v2"))?;
    let _ = converge;
    println!(
        "  publish + fleet bump → 100% of {agents} in sync at gateway/v2: {:.2} s (API polled every {} ms)",
        started.elapsed().as_secs_f64(),
        POLL.as_millis()
    );
    rollout_in_batches(&client, web, &repo, agents)?;
    drop(loadgens);
    wait_until("the agents to disconnect", Duration::from_secs(60), || {
        Ok(client
            .api(web, "/api/v1/instances")
            .is_ok_and(|v| v["instances"].as_array().is_some_and(|i| i.iter().all(|i| i["connected"] == false))))
    })?;

    // Phase 2: everyone heartbeats every second.
    let _loadgens = start_loadgens(opamp_addr, &token, agents, processes, "1s", ca_file, Stdio::null)?;
    wait_until("every agent reconnected", Duration::from_secs(300), || {
        Ok(client.api(web, "/api/v1/instances").is_ok_and(|v| {
            v["instances"].as_array().is_some_and(|i| i.iter().filter(|i| i["connected"] == true).count() == agents)
        }))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let busy = cpu_share(pid, sample_seconds)?;
    println!("  server CPU with {agents} agents heartbeating every second: {:.1}% of a core", busy * 100.0);
    drop(_loadgens);
    restart_storm(&client, web, agents, server, start_server, || {
        start_loadgens(opamp_addr, &token, agents, processes, "30s", ca_file, Stdio::piped)
    })
}

/// Phase 3: every agent connected and in sync, then `kill -9` and a restart: how long until
/// every agent is connected and in sync again, and what the agents were answered meanwhile.
fn restart_storm(
    client: &Client,
    web: std::net::SocketAddr,
    agents: usize,
    server: ChildGuard,
    start_server: impl Fn() -> Result<ChildGuard, BenchError>,
    start_loadgens: impl Fn() -> Result<Vec<ChildGuard>, BenchError>,
) -> Result<(), BenchError> {
    let all_back = |client: &Client| -> Result<bool, BenchError> {
        let fleet = client.api(web, "/api/v1/fleets/prod-gateway")?;
        let connected = client.api(web, "/api/v1/instances")?["instances"]
            .as_array()
            .map_or(0, |i| i.iter().filter(|i| i["connected"] == true).count());
        Ok(connected == agents && fleet["counts"]["in_sync"].as_u64() == Some(agents as u64))
    };
    wait_until("the agents to disconnect", Duration::from_secs(60), || {
        Ok(client
            .api(web, "/api/v1/instances")
            .is_ok_and(|v| v["instances"].as_array().is_some_and(|i| i.iter().all(|i| i["connected"] == false))))
    })?;
    let loadgens = start_loadgens()?;
    wait_until("every agent connected and in sync", Duration::from_secs(300), || all_back(client))?;
    drop(server);
    let killed = Instant::now();
    let _server = start_server()?;
    let took = loop {
        if killed.elapsed() > Duration::from_secs(300) {
            return Err(BenchError::Failed("the agents did not all come back within 300 s of the restart".into()));
        }
        if all_back(client).unwrap_or(false) {
            break killed.elapsed();
        }
        std::thread::sleep(POLL);
    };
    // The loadgens print their figures when interrupted.
    let (mut unauthorized, mut busy) = (0u64, 0u64);
    for mut loadgen in loadgens {
        let _ = Command::new("kill").args(["-INT", &loadgen.0.id().to_string()]).status();
        let mut output = String::new();
        if let Some(mut stdout) = loadgen.0.stdout.take() {
            use std::io::Read;
            let _ = stdout.read_to_string(&mut output);
        }
        let figures: serde_json::Value = serde_json::from_str(output.lines().last().unwrap_or("null"))
            .map_err(|error| BenchError::Failed(format!("loadgen figures: {error}")))?;
        let count = |key: &str| figures[key].as_u64().unwrap_or(0);
        unauthorized += count("unauthorized");
        busy += count("refused") - count("unauthorized");
    }
    println!(
        "  restart storm: kill -9 with {agents} connected, restart → 100% connected and in sync after {:.2} s; agents answered 401: {unauthorized}, 503: {busy}",
        took.as_secs_f64()
    );
    Ok(())
}
