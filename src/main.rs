//! The `gitfleet` command line: parses arguments, sets up logging, runs a sub-command and
//! turns its outcome into an exit code.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use gitfleet::check::{self, CheckArgs};
use gitfleet::demo::{self, DemoArgs};
use gitfleet::settings::ServeArgs;
use gitfleet::{app, bench};

#[derive(Parser)]
#[command(name = "gitfleet", version, about = "GitOps control plane for fleets of OpenTelemetry Collectors")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch a config repository and serve its desired state.
    Serve(Box<ServeArgs>),
    /// Validate a config repository and show what a change would do (for pull-request CI).
    /// Exits 1 when the repository has errors.
    Check(CheckArgs),
    /// Run the whole product on this machine from the bundled example repository.
    Demo(DemoArgs),
    /// Write a fleet's install files (supervisor.yaml, install.sh, Docker files, offline
    /// bundles) from the server's data directory.
    InstallFiles(gitfleet::install::export::InstallFilesArgs),
    /// Print a new key for --secret-key-file: 32 random bytes as 64 hex digits. Create it
    /// once and give the same file to every replica.
    SecretKey,
    /// Adopt an existing collector config as a new configuration, committed and tagged as
    /// its first version. Exits 1 when the config has errors (nothing is written then).
    Import(gitfleet::import::ImportArgs),
    /// Show every fleet of a running server: version, rollout, instances in sync, failed,
    /// stale. Exits 2 when the server cannot be read.
    Status(gitfleet::client::StatusArgs),
    /// Wait until a fleet is in sync or its rollout is done (for CD pipelines). Exits 0 when
    /// reached, 1 when the rollout halted or rolled back (or instances failed), 2 on timeout
    /// or error.
    Wait(gitfleet::client::WaitArgs),
    /// Simulated collectors (OpAMP agents) for demos, tests and benchmarks; prints figures
    /// as JSON.
    Loadgen(gitfleet::loadgen::LoadgenArgs),
    /// Measure gitfleet on generated repositories and print the figures.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's own lines are what a first-time user reads: its server logs only
    // warnings unless RUST_LOG asks for more. A bench prints figures: the server it runs in
    // process would bury them under a thousand fleets' lines.
    init_logging(match cli.command {
        Command::Demo(_) => "warn,gix=warn",
        Command::Bench(_) => "error",
        _ => "info,gix=warn",
    });
    match cli.command {
        Command::Check(args) => match check::run(&args) {
            Ok(plan) => {
                print!("{}", check::render(&plan, args.format));
                if plan.errors > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
            }
            Err(error) => {
                eprintln!("gitfleet check: {error}");
                ExitCode::from(2)
            }
        },
        Command::Import(args) => match gitfleet::import::run(&args) {
            Ok(imported) => {
                for warning in &imported.warnings {
                    eprintln!("{warning}");
                }
                print!("{}", gitfleet::import::next_steps(&imported));
                ExitCode::SUCCESS
            }
            Err(gitfleet::import::ImportError::Problems(problems)) => {
                for problem in &problems {
                    eprintln!("{problem}");
                }
                eprintln!("gitfleet import: the configuration has errors; nothing was written");
                ExitCode::from(1)
            }
            Err(error) => report(Err(error.into())),
        },
        Command::Status(args) => report(status(&args)),
        Command::Wait(args) => wait(&args),
        Command::Serve(args) => report(serve(*args)),
        Command::Demo(args) => report(run_demo(args)),
        Command::InstallFiles(args) => report(install_files(&args)),
        Command::SecretKey => report(
            gitfleet::install::seal::SecretKey::generate()
                .map(|key| println!("{key}"))
                .map_err(|error| anyhow::anyhow!("the operating system's random source failed: {error}")),
        ),
        Command::Loadgen(args) => report(loadgen(&args)),
        Command::Bench(args) => report(bench::run(&args).map_err(anyhow::Error::from)),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Our errors name their cause in their message; add only causes not said yet.
            let mut message = error.to_string();
            for cause in error.chain().skip(1) {
                let text = cause.to_string();
                if !message.contains(&text) {
                    message.push_str(": ");
                    message.push_str(&text);
                }
            }
            eprintln!("gitfleet: {message}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = args.validate()?;
    runtime()?.block_on(async {
        let mut running = app::start(settings).await?;
        let failure = tokio::select! {
            () = app::shutdown_signal() => None,
            reason = running.failure() => Some(reason),
        };
        running.shutdown().await;
        match failure {
            Some(reason) => Err(anyhow::anyhow!(reason)),
            None => Ok(()),
        }
    })
}

fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let address = |flag: &str, text: &str| {
        text.parse::<std::net::SocketAddr>()
            .with_context(|| format!("{flag} `{text}` is not an address like 127.0.0.1:4320"))
    };
    let (opamp, web) = (address("--listen", &args.listen)?, address("--web-listen", &args.web_listen)?);
    runtime()?.block_on(async {
        // Ports first: a demo that cannot listen writes nothing.
        let listeners = app::Listeners::bind(web, opamp).await?;
        std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
        let dir = std::fs::canonicalize(&args.dir).with_context(|| format!("cannot resolve {}", args.dir.display()))?;
        let repo = demo::prepare_repository(&dir)?;
        let settings = ServeArgs {
            listen: args.listen.clone(),
            web_listen: args.web_listen.clone(),
            public_url: Some(format!("http://{}", args.listen)),
            ..ServeArgs::new(repo.display().to_string(), dir.join("data"))
        }
        .validate()?;
        let running = app::start_on(settings, listeners).await?;
        let collectors = demo::start_collectors(&dir.join("data"), running.opamp_addr, &running.view).await?;
        println!("{}", demo::next_steps(&repo, &dir.join("data"), &running.web_addr.to_string()));
        app::shutdown_signal().await;
        collectors.stop().await;
        running.shutdown().await;
        Ok(())
    })
}

fn status(args: &gitfleet::client::StatusArgs) -> anyhow::Result<()> {
    use gitfleet::client::{self, FleetLine, Output};
    let api = client::Api::new(&args.server)?;
    let lines: Vec<FleetLine> = client::fleets(&api, args.fleet.as_deref())?.iter().map(FleetLine::of).collect();
    match args.output {
        Output::Table => print!("{}", client::render_table(&lines)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "fleets": lines }))?),
    }
    Ok(())
}

fn wait(args: &gitfleet::client::WaitArgs) -> ExitCode {
    use gitfleet::client::Progress;
    match gitfleet::client::wait(args, |line| eprintln!("{line}")) {
        Ok(Progress::Reached(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Progress::Failed(text)) => {
            eprintln!("gitfleet wait: {text}");
            ExitCode::from(1)
        }
        Ok(Progress::Waiting(text)) => {
            eprintln!("gitfleet wait: timed out after {}: {text}", gitfleet::duration::format_duration(args.timeout));
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("gitfleet wait: {error}");
            ExitCode::from(2)
        }
    }
}

fn install_files(args: &gitfleet::install::export::InstallFilesArgs) -> anyhow::Result<()> {
    for path in gitfleet::install::export::run(args)? {
        println!("{}", path.display());
    }
    Ok(())
}

fn loadgen(args: &gitfleet::loadgen::LoadgenArgs) -> anyhow::Result<()> {
    let figures = runtime()?.block_on(gitfleet::loadgen::run(args))?;
    println!("{}", serde_json::to_string(&figures)?);
    // The figures are printed either way; a run where agents could not get in fails.
    match figures.failure() {
        Some(failure) => Err(gitfleet::loadgen::LoadgenError::Failed(failure).into()),
        None => Ok(()),
    }
}

fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
