//! `gitfleet demo`: what a first-time user runs.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{free_port, gitfleet};

#[test]
fn a_demo_that_cannot_listen_writes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = blocker.local_addr().expect("address").to_string();
    let demo_dir = dir.path().join("demo");
    for (flag, other) in [("--listen", "--web-listen"), ("--web-listen", "--listen")] {
        let output = gitfleet()
            .args(["demo", flag, &taken, other, "127.0.0.1:0", "--dir"])
            .arg(&demo_dir)
            .output()
            .expect("gitfleet runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.lines().last().is_some_and(|l| l.starts_with(&format!("gitfleet: cannot listen on {taken}"))),
            "{stderr}"
        );
        assert!(!demo_dir.exists(), "{flag} taken, yet the demo wrote {}", demo_dir.display());
    }
}

fn get_json(web: std::net::SocketAddr, path: &str) -> Option<serde_json::Value> {
    let response = crate::common::http(web, "GET", path, &[], b"");
    (response.status == 200).then(|| serde_json::from_str(&response.body).expect("JSON"))
}

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_demo_shows_what_the_readme_promises() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (opamp, web) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut demo = gitfleet()
        .env_remove("RUST_LOG")
        .args(["demo", "--listen", &opamp, "--web-listen", &web, "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gitfleet demo starts");
    // Killed if an assertion fails before the end.
    struct Running(Option<std::process::Child>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(child) = self.0.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let stdout = demo.stdout.take().expect("stdout");
    let mut running = Running(Some(demo));
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let web: std::net::SocketAddr = web.parse().expect("address");
    let banner = wait_for("the banner", || {
        lines_rx.recv_timeout(Duration::from_millis(100)).ok().filter(|l| l.contains("gitfleet demo is running"))
    });
    assert_eq!(banner, "gitfleet demo is running.");

    // The README adopts a live instance's effective config; observe-only collectors run a
    // local one, so the demo has one to adopt.
    let uid = wait_for("the legacy-edge collectors", || {
        let listed = get_json(web, "/api/v1/fleets/legacy-edge/instances")?;
        listed["instances"][0]["instance_uid"].as_str().map(str::to_owned)
    });
    let instance = get_json(web, &format!("/api/v1/instances/{uid}")).expect("the instance");
    let body = instance["effective_config"]["body"].as_str().expect("an effective config").to_owned();
    assert!(body.contains("receivers:") && body.contains("pipelines:"), "{instance:#}");
    let repo = dir.path().join("repo");
    let mut import = gitfleet()
        .args(["import", "-", "--config", "edge", "--repo"])
        .arg(&repo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gitfleet import starts");
    import.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write");
    let imported = import.wait_with_output().expect("import runs");
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));

    // A rotation moves every prod collector to the new token over OpAMP.
    let before = wait_for("prod's collectors", || {
        let fleet = get_json(web, "/api/v1/fleets/prod-gateway")?;
        (fleet["instances"] == 12).then_some(fleet)
    });
    let fleet_file = repo.join("fleets/prod-gateway.toml");
    let text = std::fs::read_to_string(&fleet_file).expect("read");
    std::fs::write(&fleet_file, text.replace("rotate  = 0", "rotate  = 1")).expect("write");
    let commit = crate::common::git_command(&repo).args(["commit", "-qam", "Rotate the prod token"]).status();
    assert!(commit.expect("git runs").success());
    let after = wait_for("every prod collector on the new token", || {
        let fleet = get_json(web, "/api/v1/fleets/prod-gateway")?;
        let rotated = fleet["token"]["id"] != before["token"]["id"];
        (rotated && fleet["instances_on_old_tokens"] == 0 && fleet["token"]["instances"] == 12).then_some(fleet)
    });
    assert_eq!(after["counts"]["in_sync"], 12, "{after:#}");

    // SIGTERM stops it; the server logged only warnings, if anything.
    let demo = running.0.take().expect("still running");
    let pid = demo.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let output = demo.wait_with_output().expect("the demo stops");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains(" INFO "), "the demo keeps its logs quiet:\n{stderr}");
}
