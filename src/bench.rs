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

pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    match &args.bench {
        Bench::Reconcile { fleets, tags, configs, rounds, dir } => {
            reconcile(*fleets, *tags, *configs, *rounds, dir.as_deref())
        }
    }
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
        repo: source_url,
        branch: "main".into(),
        data_dir: server_data,
        listen: "127.0.0.1:0".into(),
        max_connections: 19_500,
        web_listen: "127.0.0.1:0".into(),
        poll_interval: "1h".into(),
        webhook_secret: None,
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
