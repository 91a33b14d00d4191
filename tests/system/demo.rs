//! `gitfleet demo`: what a first-time user runs.

use crate::common::gitfleet;

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
