//! `gitfleet demo`: the product on this machine in one command. Makes a Git repository from
//! the bundled example (`example-repo/`, compiled into the binary), publishes every
//! configuration as `v1`, and serves it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The example repository, embedded so that the demo works from any directory.
pub const EXAMPLE_FILES: &[(&str, &str)] = &[
    ("README.md", include_str!("../example-repo/README.md")),
    ("configs/gateway.yaml", include_str!("../example-repo/configs/gateway.yaml")),
    ("configs/node-agent.yaml", include_str!("../example-repo/configs/node-agent.yaml")),
    ("configs/sdk-agent.json", include_str!("../example-repo/configs/sdk-agent.json")),
    ("fleets/prod-gateway.toml", include_str!("../example-repo/fleets/prod-gateway.toml")),
    ("fleets/staging-gateway.toml", include_str!("../example-repo/fleets/staging-gateway.toml")),
    ("fleets/nodes.toml", include_str!("../example-repo/fleets/nodes.toml")),
    ("fleets/sdk-agents.toml", include_str!("../example-repo/fleets/sdk-agents.toml")),
    ("fleets/legacy-edge.toml", include_str!("../example-repo/fleets/legacy-edge.toml")),
];

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps its Git repository (`repo/`) and server state (`data/`).
    /// An existing demo repository is reused as it is.
    #[arg(long, default_value = "./gitfleet-demo")]
    pub dir: PathBuf,
    /// Address of the status API.
    #[arg(long, default_value = "127.0.0.1:4321")]
    pub web_listen: String,
    /// Address collectors connect to (OpAMP).
    #[arg(long, default_value = "127.0.0.1:4320")]
    pub listen: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo repository was not reconciled within 30 s")]
    NotReady,
    #[error("cannot read the install token of fleet `{fleet}`: {source}")]
    Token { fleet: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("cannot run git (is it installed?): {0}")]
    GitMissing(std::io::Error),
    #[error("`git {args}` failed: {stderr}")]
    Git { args: String, stderr: String },
}

/// Creates the demo repository under `dir/repo` unless it exists; returns its path.
pub fn prepare_repository(dir: &Path) -> Result<PathBuf, DemoError> {
    let repo = dir.join("repo");
    if repo.join(".git").is_dir() {
        return Ok(repo);
    }
    write_example(&repo)?;
    git(&repo, &["init", "--quiet", "--initial-branch=main"])?;
    git(&repo, &["add", "--all"])?;
    git(&repo, &["commit", "--quiet", "--message", "Fleets and configurations of the gitfleet demo"])?;
    for (config, note) in [
        ("gateway", "Gateway: OTLP in, memory_limiter, resource, batch, OTLP/HTTP out"),
        ("node-agent", "Node agent: host metrics and pod logs"),
        ("sdk-agent", "SDK agents: 25% parent-based sampling"),
    ] {
        git(&repo, &["tag", "--annotate", &format!("{config}/v1"), "--message", note])?;
    }
    Ok(repo)
}

/// Writes the bundled example files under `dir`.
pub fn write_example(dir: &Path) -> Result<(), DemoError> {
    for (path, content) in EXAMPLE_FILES {
        let target = dir.join(path);
        let write_error = |source| DemoError::Write { path: target.display().to_string(), source };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(write_error)?;
        }
        std::fs::write(&target, content).map_err(write_error)?;
    }
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> Result<(), DemoError> {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=gitfleet demo",
            "-c",
            "user.email=demo@gitfleet.invalid",
            "-c",
            "tag.gpgSign=false",
            "-c",
            "commit.gpgSign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(DemoError::GitMissing)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(DemoError::Git { args: args.join(" "), stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned() })
    }
}

/// The simulated collectors of the demo: per fleet, how many, over which transport, and how
/// many of them fail to apply a config.
const DEMO_COLLECTORS: &[(&str, usize, &str, f64)] = &[
    ("prod-gateway", 12, "ws", 0.0),
    ("staging-gateway", 6, "ws", 0.0),
    ("nodes", 20, "ws", 0.1),
    ("sdk-agents", 8, "http", 0.0),
    ("legacy-edge", 4, "ws", 0.0),
];

/// Simulated collectors running inside the demo process.
pub struct Collectors {
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Collectors {
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Waits for the first reconcile (and the install tokens), then starts about 50 simulated
/// collectors across the fleets, a few of which fail to apply their config.
pub async fn start_collectors(
    data_dir: &Path,
    opamp: std::net::SocketAddr,
    view: &tokio::sync::watch::Receiver<std::sync::Arc<crate::reconciler::View>>,
) -> Result<Collectors, DemoError> {
    let mut view = view.clone();
    let ready = view.wait_for(|v| {
        v.desired.is_some() && DEMO_COLLECTORS.iter().all(|(fleet, ..)| v.fleet_tokens.contains_key(*fleet))
    });
    if !matches!(tokio::time::timeout(std::time::Duration::from_secs(30), ready).await, Ok(Ok(_))) {
        return Err(DemoError::NotReady);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    let mut first_agent = 0;
    for &(fleet, agents, scheme, fail_ratio) in DEMO_COLLECTORS {
        let dir = data_dir.to_owned();
        let token = tokio::task::spawn_blocking(move || {
            crate::install::token::read_token_file(&dir, fleet, std::time::Duration::from_secs(10))
        })
        .await
        .expect("reading a token file does not panic")
        .map_err(|source| DemoError::Token { fleet: fleet.to_owned(), source })?;
        let args = crate::loadgen::LoadgenArgs {
            url: format!("{scheme}://{opamp}/v1/opamp"),
            ca_file: None,
            token: token.trim().to_owned(),
            agents,
            first_agent,
            heartbeat: "10s".to_owned(),
            fail_ratio,
            source_ips: None,
            duration: None,
            connect_rate: 100,
            report_every: None,
        };
        first_agent += agents;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(error) = crate::loadgen::run_until(&args, stop).await {
                tracing::warn!(%error, "demo collectors stopped");
            }
        }));
    }
    Ok(Collectors { stop, tasks })
}

/// What to try next, printed once the server is up.
pub fn next_steps(repo: &Path, data: &Path, web: &str) -> String {
    let repo = repo.display();
    let data = data.display();
    let gitfleet = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "gitfleet".to_owned());
    format!(
        "
gitfleet demo is running.

  Status page  http://{web}/
  Repository   {repo}
  Fleets       http://{web}/api/v1/fleets
  Instances    http://{web}/api/v1/instances     (50 simulated collectors; a few fail)
  Problems     http://{web}/api/v1/repo
  Versions     http://{web}/api/v1/configs/gateway/versions
  Metrics      http://{web}/metrics

Try it in another terminal:
  cd {repo}
  # publish a new gateway version; staging-gateway follows `latest` at once:
  sed -i 's/send_batch_size: 8192/send_batch_size: 4096/' configs/gateway.yaml
  git commit -qam 'Smaller batches' && git tag -a gateway/v2 -m 'Smaller batches'
  curl -s http://{web}/api/v1/fleets/staging-gateway
  # the fleets' history, as gitfleet commits it:
  git log --format='%ci %s' gitfleet/status
  # roll production forward, and see what that commit does, as a reviewer would:
  sed -i 's/version = \"v1\"/version = \"v2\"/' fleets/prod-gateway.toml
  git commit -qam 'Roll out gateway v2 to prod'
  {gitfleet} check --base HEAD~1
  # break a fleet file and watch the fleet keep its last good state:
  echo 'verison = \"v3\"' >> fleets/nodes.toml && git commit -qam oops
  curl -s http://{web}/api/v1/repo
  # the install files a new prod collector would use (install.sh, Docker, offline bundles):
  ls {data}/install/prod-gateway/
  # rotate prod's install token; connected collectors keep working for the grace period:
  sed -i 's/rotate  = 0/rotate  = 1/' fleets/prod-gateway.toml && git commit -qam 'Rotate the prod token'
  curl -s http://{web}/api/v1/fleets/prod-gateway

Stop with Ctrl-C.
"
    )
}
