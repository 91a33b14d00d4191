//! The PostgreSQL store against a real, private PostgreSQL: the same contract as SQLite,
//! replicas migrating one schema together, and a database restart.

use std::sync::Arc;

use gitfleet::store::postgres::PostgresStore;
use gitfleet::store::{Store, StoreError};

use crate::common::postgres::{PASSWORD, Postgres};

#[test]
fn the_postgres_store_keeps_the_store_contract() {
    let postgres = Postgres::start();
    let url = postgres.database("contract");
    gitfleet::store::conformance::run(&|| PostgresStore::open(&url, Some(PASSWORD)).expect("open") as Arc<dyn Store>);
}

#[test]
fn replicas_that_start_together_migrate_the_schema_once() {
    let postgres = Postgres::start();
    let url = postgres.database("together");
    let opened: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let starts: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| PostgresStore::open(&url, Some(PASSWORD)).map(drop).map_err(|e| e.to_string())))
            .collect();
        starts.into_iter().map(|start| start.join().expect("no panic")).collect()
    });
    assert!(opened.iter().all(Result::is_ok), "{opened:?}");
    let mut client = postgres::Client::connect(&postgres.url("together"), postgres::NoTls).expect("connect");
    let versions: Vec<i32> =
        client.query("SELECT version FROM gitfleet_schema", &[]).expect("read").iter().map(|row| row.get(0)).collect();
    assert_eq!(versions, [1]);
}

#[test]
fn a_restarted_database_is_connected_to_again() {
    let mut postgres = Postgres::start();
    let url = postgres.database("restarted");
    let store = PostgresStore::open(&url, Some(PASSWORD)).expect("open");
    store.save_instances(&[gitfleet::store::conformance::instance(1)], &[]).expect("save");
    postgres.stop();
    let down = store.load_instances(1);
    assert!(matches!(down, Err(StoreError::Open { .. } | StoreError::Query { .. })), "{:?}", down.map(|v| v.len()));
    postgres.run();
    // The call that found the connection lost failed; the next one connects again.
    let loaded = match store.load_instances(1) {
        Ok(loaded) => loaded,
        Err(_) => store.load_instances(1).expect("connected again"),
    };
    assert_eq!(loaded.len(), 1);
}

#[test]
fn a_wrong_password_is_a_clear_error_that_does_not_show_it() {
    let postgres = Postgres::start();
    let url = postgres.url("postgres").replace("horse", "donkey");
    let error = PostgresStore::open(&url, None).map(drop).expect_err("refused").to_string();
    assert!(error.contains("password authentication failed"), "{error}");
    assert!(!error.contains("donkey"), "{error}");
}

#[test]
fn serve_keeps_its_state_in_postgres_and_a_second_server_on_it_is_refused() {
    let postgres = Postgres::start();
    let url = postgres.database("serving");
    let data = tempfile::tempdir().expect("temp dir");
    let password_file = data.path().join("db-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("write the password file");
    let password_file = password_file.display().to_string();
    let repo = crate::common::example();
    let server_data = data.path().join("server");
    let flags = ["--poll-interval", "1h", "--database", &url, "--database-password-file", &password_file];
    let server = crate::common::Server::start(&repo.path().display().to_string(), &server_data, &flags);
    let token = server.token("prod-gateway");
    let uid = [0x91; 16];
    drop(crate::opamp::converge(&server, &token, uid, "gw-pg", None));
    assert!(!server_data.join("state.db").exists(), "no SQLite beside PostgreSQL");

    // The install files, written on the server host from the state in PostgreSQL.
    let out = data.path().join("exported");
    let output = crate::common::gitfleet()
        .args(["install-files", "prod-gateway", "--out"])
        .arg(&out)
        .arg("--data-dir")
        .arg(&server_data)
        .args(["--database", &url, "--database-password-file", &password_file])
        .output()
        .expect("gitfleet install-files runs");
    assert!(output.status.success(), "install-files: {}", String::from_utf8_lossy(&output.stderr));
    let supervisor = std::fs::read_to_string(out.join("supervisor.yaml")).expect("supervisor.yaml");
    assert!(supervisor.contains(&token), "the fleet's current token");

    // A second server on the same database stops with one line, before it writes anything.
    let output = crate::common::gitfleet()
        .args(["serve", "--repo", &repo.url(), "--listen", "127.0.0.1:0", "--web-listen", "127.0.0.1:0"])
        .args(["--database", &url, "--database-password-file", &password_file, "--data-dir"])
        .arg(data.path().join("second"))
        .output()
        .expect("gitfleet runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("another gitfleet is serving from the state database"), "{stderr}");
    assert!(!stderr.contains("horse"), "the password stays out of the output: {stderr}");

    // After a restart, the instance, its history and the token come back from PostgreSQL.
    let (opamp, web) = (server.opamp.to_string(), server.web.to_string());
    let logs_before = server.logs();
    assert_eq!(server.stop(), Some(0), "{logs_before}");
    let server =
        crate::common::Server::start_on(&opamp, &web, &repo.path().display().to_string(), &server_data, &flags);
    assert_eq!(server.token("prod-gateway"), token);
    let instance = server.json(&format!("/api/v1/instances/{}", crate::opamp::uid_text(uid)));
    assert_eq!(instance["host"], "gw-pg", "{instance}");
    assert!(instance["events"].as_array().is_some_and(|events| events.len() >= 4), "{instance}");
    assert!(!server.logs().contains("horse"), "the password stays out of the logs");
    server.stop();
}
