//! The PostgreSQL store against a real, private PostgreSQL: the same contract as SQLite,
//! replicas migrating one schema together, and a database restart.

use std::sync::Arc;

use gitfleet::store::postgres::PostgresStore;
use gitfleet::store::{Store, StoreError};

use std::path::Path;
use std::time::Duration;

use crate::common::postgres::{PASSWORD, Postgres};
use crate::common::{GitRepo, Server};

const WAIT: Duration = Duration::from_secs(20);

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
    assert_eq!(versions, [gitfleet::store::postgres::SCHEMA_VERSION as i32]);
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
fn a_database_that_requires_tls_is_reached_over_tls_verified_against_its_ca() {
    let mut postgres = Postgres::start();
    let url = postgres.database("encrypted");
    let dir = tempfile::tempdir().expect("temp dir");
    let server = crate::common::SelfSigned::new(dir.path(), "database");
    postgres.require_tls(&server.cert, &server.key);

    // Plain TCP is refused now, so a store that works went over TLS.
    let plain = PostgresStore::open(&url, Some(PASSWORD)).map(drop).expect_err("refused without TLS").to_string();
    assert!(plain.contains("no encryption"), "{plain}");
    let tls_url = format!("{url}?sslmode=require");
    let store = PostgresStore::open_with(&tls_url, Some(PASSWORD), Some(&server.cert)).expect("TLS, verified");
    store.save_instances(&[gitfleet::store::conformance::instance(1)], &[]).expect("write over TLS");
    assert_eq!(store.load_instances(1).expect("read over TLS").len(), 1);

    // A certificate no trusted CA signed is refused, from the system's trust store too.
    let other = crate::common::SelfSigned::new(dir.path(), "other");
    let untrusted =
        PostgresStore::open_with(&tls_url, Some(PASSWORD), Some(&other.cert)).map(drop).expect_err("untrusted");
    assert!(untrusted.to_string().contains("certificate"), "{untrusted}");
    let system =
        PostgresStore::open_with(&tls_url, Some(PASSWORD), None).map(drop).expect_err("not in the system store");
    assert!(system.to_string().contains("certificate"), "{system}");

    // `serve` takes --database-ca-file.
    let data = tempfile::tempdir().expect("temp dir");
    let mut flags = replica_flags(&postgres, "served_encrypted", data.path());
    flags[3].push_str("?sslmode=require");
    flags.extend(["--database-ca-file".to_owned(), server.cert.display().to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let repo = crate::common::example();
    let serving = Server::start(&repo.path().display().to_string(), &data.path().join("server"), &flags);
    assert!(serving.token("prod-gateway").starts_with("tk_"));
    serving.stop();
}

#[test]
fn a_wrong_password_is_a_clear_error_that_does_not_show_it() {
    let postgres = Postgres::start();
    let url = postgres.url("postgres").replace("horse", "donkey");
    let error = PostgresStore::open(&url, None).map(drop).expect_err("refused").to_string();
    assert!(error.contains("password authentication failed"), "{error}");
    assert!(!error.contains("donkey"), "{error}");
}

/// The flags of a replica on `database`: the password and the shared key in files under
/// `dir` (written once).
pub(crate) fn replica_flags(postgres: &Postgres, database: &str, dir: &Path) -> Vec<String> {
    let (password_file, key_file) = (dir.join("db-password"), dir.join("secret-key"));
    if !key_file.exists() {
        std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("write the password file");
        let key = crate::common::gitfleet().arg("secret-key").output().expect("gitfleet secret-key runs");
        assert!(key.status.success());
        std::fs::write(&key_file, &key.stdout).expect("write the key file");
    }
    let mut flags: Vec<String> =
        ["--poll-interval", "1h", "--database", &postgres.database(database)].map(str::to_owned).into();
    flags.extend(["--database-password-file".into(), password_file.display().to_string()]);
    flags.extend(["--secret-key-file".into(), key_file.display().to_string()]);
    flags
}

fn start_replica(repo: &GitRepo, data_dir: &Path, flags: &[String], name: &str) -> Server {
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--replica-name", name]);
    Server::start(&repo.path().display().to_string(), data_dir, &args)
}

#[test]
fn serve_keeps_its_state_in_postgres_across_a_restart() {
    let postgres = Postgres::start();
    let data = tempfile::tempdir().expect("temp dir");
    let flags = replica_flags(&postgres, "serving", data.path());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let repo = crate::common::example();
    let server_data = data.path().join("server");
    let server = Server::start(&repo.path().display().to_string(), &server_data, &flags);
    let token = server.token("prod-gateway");
    let uid = [0x91; 16];
    drop(crate::opamp::converge(&server, &token, uid, "gw-pg", None));
    assert!(!server_data.join("state.db").exists(), "no SQLite beside PostgreSQL");
    let sealed: Vec<Vec<u8>> = {
        let mut client = postgres::Client::connect(&postgres.url("serving"), postgres::NoTls).expect("connect");
        client.query("SELECT sealed FROM tokens", &[]).expect("read").iter().map(|row| row.get(0)).collect()
    };
    let secret = token.split_once('.').expect("id.secret").1;
    assert!(!sealed.is_empty() && sealed.iter().all(|bytes| bytes.len() > 60), "every token sealed");
    assert!(sealed.iter().all(|bytes| !String::from_utf8_lossy(bytes).contains(secret)), "never in clear");

    // The install files, written on the server host from the state in PostgreSQL.
    let out = data.path().join("exported");
    let output = crate::common::gitfleet()
        .args(["install-files", "prod-gateway", "--out"])
        .arg(&out)
        .arg("--data-dir")
        .arg(&server_data)
        .args(&flags[2..6])
        .output()
        .expect("gitfleet install-files runs");
    assert!(output.status.success(), "install-files: {}", String::from_utf8_lossy(&output.stderr));
    let supervisor = std::fs::read_to_string(out.join("supervisor.yaml")).expect("supervisor.yaml");
    assert!(supervisor.contains(&token), "the fleet's current token");

    // Without the shared key, a server on PostgreSQL stops with one line, before it writes.
    let output = crate::common::gitfleet()
        .args(["serve", "--repo", &repo.url(), "--listen", "127.0.0.1:0", "--web-listen", "127.0.0.1:0"])
        .args(&flags[..6])
        .arg("--data-dir")
        .arg(data.path().join("keyless"))
        .output()
        .expect("gitfleet runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.trim_end().ends_with("`gitfleet secret-key > FILE` and give it to every replica)"), "{stderr}");
    assert!(!data.path().join("keyless").exists(), "nothing written");

    // After a restart, the instance, its history and the token come back from PostgreSQL.
    let (opamp, web) = (server.opamp.to_string(), server.web.to_string());
    let logs_before = server.logs();
    assert_eq!(server.stop(), Some(0), "{logs_before}");
    let server = Server::start_on(&opamp, &web, &repo.path().display().to_string(), &server_data, &flags);
    assert_eq!(server.token("prod-gateway"), token);
    let instance = server.json(&format!("/api/v1/instances/{}", crate::opamp::uid_text(uid)));
    assert_eq!(instance["host"], "gw-pg", "{instance}");
    assert!(instance["events"].as_array().is_some_and(|events| events.len() >= 4), "{instance}");
    assert!(!server.logs().contains("horse"), "the password stays out of the logs");
    server.stop();
}

#[test]
fn a_follower_serves_what_the_leader_publishes_and_takes_over_when_it_dies() {
    let postgres = Postgres::start();
    let data = tempfile::tempdir().expect("temp dir");
    let flags = replica_flags(&postgres, "replicas", data.path());
    let repo = crate::common::example();
    let leader = start_replica(&repo, &data.path().join("a"), &flags, "replica-a");
    let token = leader.token("prod-gateway");
    let follower = start_replica(&repo, &data.path().join("b"), &flags, "replica-b");
    let repo_status = follower.wait_for("/api/v1/repo", WAIT, "the follower following", |r| r["commit"].is_string());
    let role = &repo_status["replica"];
    assert_eq!(*role, serde_json::json!({ "name": "replica-b", "leading": false, "leader": "replica-a" }));
    // The same token, read from the store and unsealed with the shared key, and the same
    // config: a collector connected to the follower gets what the leader assigns.
    assert_eq!(follower.token("prod-gateway"), token);
    let leader_fleet = leader.json("/api/v1/fleets/prod-gateway");
    let uid = [0x92; 16];
    let mut agent = crate::opamp::converge(&follower, &token, uid, "gw-follower", None);
    let fleet = follower.wait_for("/api/v1/fleets/prod-gateway", WAIT, "the follower's collector in sync", |f| {
        f["counts"]["in_sync"] == 1
    });
    assert_eq!(fleet["tag"], leader_fleet["tag"]);
    assert_eq!(fleet["config_hash"], leader_fleet["config_hash"]);

    // A push: the leader reconciles it, the follower hears of it and pushes to its collector.
    crate::opamp::bump_prod_to_v2(&repo);
    let head = repo.head();
    follower.wait_for("/api/v1/repo", WAIT, "the follower at the new commit", |r| r["commit"] == head);
    let pushed = agent.recv().remote_config.expect("the new version pushed by the follower");
    assert_ne!(pushed.config_hash, hex::decode(fleet["config_hash"].as_str().expect("hash")).expect("hex"));
    agent.send(&crate::opamp::report(uid, 2, &pushed.config_hash, 1, ""));
    agent.recv();
    follower.wait_for("/api/v1/fleets/prod-gateway", WAIT, "in sync on v2", |f| {
        f["tag"] == "gateway/v2" && f["counts"]["in_sync"] == 1
    });

    // kill -9 of the leader: the follower takes over, and a push reaches it.
    drop(leader);
    follower.wait_for("/api/v1/repo", WAIT, "the follower leading", |r| r["replica"]["leading"] == true);
    repo.write(
        "fleets/prod-gateway.toml",
        std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml"))
            .expect("read")
            .replace("version = \"v2\"", "version = \"v1\""),
    );
    let back = repo.commit("Back to v1");
    follower.wait_for("/api/v1/repo", WAIT, "the new leader reconciling", |r| r["commit"] == back);
    let pushed = agent.recv().remote_config.expect("v1 again, pushed by the new leader");
    assert_eq!(hex::encode(pushed.config_hash), fleet["config_hash"].as_str().expect("hash"));
    // Nothing issued twice: one token per fleet, the one the first leader issued.
    assert_eq!(follower.token("prod-gateway"), token);
    let mut client = postgres::Client::connect(&postgres.url("replicas"), postgres::NoTls).expect("connect");
    let per_fleet: Vec<i64> = client
        .query("SELECT count(*) FROM tokens GROUP BY fleet", &[])
        .expect("read")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!per_fleet.is_empty() && per_fleet.iter().all(|count| *count == 1), "{per_fleet:?}");
    let (replica, term): (String, i64) =
        client.query_one("SELECT replica, term FROM leader", &[]).map(|row| (row.get(0), row.get(1))).expect("read");
    assert_eq!((replica.as_str(), term), ("replica-b", 2));
    follower.stop();
}

#[test]
fn a_fleet_is_whole_on_every_replica_and_a_rollout_moves_collectors_on_both() {
    use crate::rollout::{APPLIED, Agent, prod_fleet, publish_v2};
    let postgres = Postgres::start();
    let data = tempfile::tempdir().expect("temp dir");
    let flags = replica_flags(&postgres, "whole", data.path());
    let repo = crate::common::example();
    prod_fleet(&repo, "v1", "\n[rollout]\n[rollout.batches]\ninitial = 1\nfactor = 2\n");
    repo.commit("Roll out prod in batches");
    let leader = start_replica(&repo, &data.path().join("a"), &flags, "replica-a");
    let follower = start_replica(&repo, &data.path().join("b"), &flags, "replica-b");
    follower.wait_for("/api/v1/repo", WAIT, "the follower following", |r| r["commit"].is_string());
    // Two collectors on each replica; each replica shows all four.
    let mut agents: Vec<Agent> = (1..=4)
        .map(|n| Agent::connect_to(if n <= 2 { &leader } else { &follower }, "prod-gateway", n, &format!("gw-{n}")).0)
        .collect();
    for replica in [&leader, &follower] {
        replica.wait_for("/api/v1/fleets/prod-gateway", WAIT, "4 in sync on every replica", |f| {
            f["counts"]["in_sync"] == 4
        });
    }
    let on_follower = crate::opamp::uid_text([3; 16]);
    let seen_by_leader = leader.json(&format!("/api/v1/instances/{on_follower}"));
    assert_eq!((&seen_by_leader["host"], &seen_by_leader["connected"]), (&"gw-3".into(), &true.into()));

    // A rollout in batches of 1, then the rest: the leader moves collectors on both replicas.
    publish_v2(&repo);
    let fleet = std::fs::read_to_string(repo.path().join("fleets/prod-gateway.toml")).expect("read");
    repo.write("fleets/prod-gateway.toml", fleet.replace("version = \"v1\"", "version = \"v2\""));
    repo.commit("Roll out gateway v2 to prod");
    leader.wait_for("/api/v1/fleets/prod-gateway", WAIT, "running", |f| f["rollout"]["state"] == "running");
    let (tx, rx) = std::sync::mpsc::channel();
    let pushed: Vec<_> = agents
        .drain(..)
        .map(|mut agent| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let hash = agent.take_push(APPLIED, "");
                let _ = tx.send(hash);
                agent
            })
        })
        .collect();
    let v2 = rx.recv_timeout(WAIT).expect("a first push");
    for _ in 1..4 {
        assert_eq!(rx.recv_timeout(WAIT).expect("every collector gets v2"), v2);
    }
    let agents: Vec<Agent> = pushed.into_iter().map(|thread| thread.join().expect("no panic")).collect();
    for replica in [&leader, &follower] {
        replica.wait_for("/api/v1/fleets/prod-gateway", WAIT, "complete, 4 in sync on v2", |f| {
            f["rollout"]["state"] == "complete" && f["tag"] == "gateway/v2" && f["counts"]["in_sync"] == 4
        });
    }

    // A collector moves from the follower to the leader: its history comes along.
    let events_before = follower.json(&format!("/api/v1/instances/{on_follower}"))["events"].as_array().map(Vec::len);
    drop(agents);
    let (_moved, hash) = Agent::connect_to(&leader, "prod-gateway", 3, "gw-3");
    assert_eq!(hash, v2);
    let moved = leader.json(&format!("/api/v1/instances/{on_follower}"));
    assert!(moved["events"].as_array().map(Vec::len) >= events_before, "{moved:#}");
    assert_eq!(moved["first_seen"], seen_by_leader["first_seen"]);
    // The follower lets go of it: counted once, on either replica.
    for replica in [&leader, &follower] {
        replica.wait_for("/api/v1/fleets/prod-gateway", WAIT, "4 instances, not 5", |f| f["instances"] == 4);
    }
    let holder = |uid: u8| {
        let mut client = postgres::Client::connect(&postgres.url("whole"), postgres::NoTls).expect("connect");
        let row = client.query_one("SELECT holder FROM instances WHERE uid = $1", &[&&[uid; 16][..]]).expect("read");
        row.get::<_, String>(0)
    };
    assert_eq!(holder(3), "replica-a");
    assert_eq!(holder(4), "replica-b");

    // kill -9 of the follower: once it has been silent for 15 s, the leader takes over the
    // collector it held, and the fleet still counts 4.
    drop(follower);
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    while holder(4) != "replica-a" {
        assert!(std::time::Instant::now() < deadline, "the leader took over: {}", leader.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    let fleet = leader.wait_for("/api/v1/fleets/prod-gateway", WAIT, "4 instances", |f| f["instances"] == 4);
    assert_eq!(
        fleet["counts"]["in_sync"].as_u64().unwrap_or(0) + fleet["counts"]["stale"].as_u64().unwrap_or(0),
        4,
        "{fleet}"
    );
    let taken = leader.json(&format!("/api/v1/instances/{}", crate::opamp::uid_text([4; 16])));
    assert_eq!(taken["host"], "gw-4", "{taken}");
    leader.stop();
}

#[test]
fn replicas_learn_which_instances_moved_and_the_leader_takes_over_a_gone_replicas() {
    use gitfleet::store::StoredInstance;
    let postgres = Postgres::start();
    let url = postgres.database("moves");
    let store = PostgresStore::open(&url, Some(PASSWORD)).expect("open");
    let held = |uid: u8, holder: &str| StoredInstance {
        holder: holder.into(),
        connected: true,
        ..gitfleet::store::conformance::instance(uid)
    };
    let uids = |instances: Vec<StoredInstance>| instances.iter().map(|i| i.uid[0]).collect::<Vec<_>>();
    store.save_instances(&[held(1, "a"), held(2, "a"), held(3, "b")], &[]).expect("save");
    store.save_counts("a", "{\"fleets\":{}}").expect("counts");
    store.save_counts("b", "{\"fleets\":{}}").expect("counts");
    assert_eq!(uids(store.instances_held_elsewhere("a", Some("prod")).expect("read")), [3]);
    assert_eq!(uids(store.instances_held_elsewhere("a", Some("other")).expect("read")), [] as [u8; 0]);
    let restored = store.held_instances("a", 0).expect("read").into_iter().map(|(i, _)| i).collect();
    assert_eq!(uids(restored), [1, 2], "a restores its own");

    // b takes instance 2: a learns of it once, and not of what b wrote of its own.
    assert!(store.instances_moved_away("a", 0).expect("read").is_empty());
    store.save_instances(&[held(2, "b"), held(3, "b")], &[]).expect("save");
    let moved = store.instances_moved_away("a", 0).expect("read");
    assert_eq!(moved.iter().map(|(uid, _)| uid[0]).collect::<Vec<_>>(), [2]);
    assert!(store.instances_moved_away("a", moved[0].1).expect("read").is_empty(), "read past it");
    assert!(store.instances_moved_away("b", 0).expect("read").is_empty());

    let counts = store.replica_counts().expect("read");
    assert_eq!(counts.iter().map(|(name, _, _)| name.as_str()).collect::<Vec<_>>().len(), 2);
    assert!(counts.iter().all(|(_, body, age)| body == "{\"fleets\":{}}" && (0..10_000).contains(age)), "{counts:?}");

    // c holds an instance and never wrote its counts: gone. a and b are not, until they
    // fall silent.
    store.save_instances(&[held(4, "c")], &[]).expect("save");
    assert_eq!(store.gone_replicas("b", 60_000).expect("read"), ["c"]);
    std::thread::sleep(Duration::from_millis(20));
    let mut silent = store.gone_replicas("b", 10).expect("read");
    silent.sort();
    assert_eq!(silent, ["a", "c"]);

    assert!(store.lead("b").expect("lead"));
    assert_eq!(store.take_over_instances("c", "b").expect("take over"), [[4; 16]]);
    assert!(store.gone_replicas("b", 60_000).expect("read").is_empty());
    let taken = store.instances_by_uid(&[[4; 16]], 0).expect("read");
    assert_eq!((taken[0].0.holder.as_str(), taken[0].0.connected), ("b", false));
    let restored = store.held_instances("b", 0).expect("read").into_iter().map(|(i, _)| i).collect();
    assert_eq!(uids(restored), [2, 3, 4]);
}
