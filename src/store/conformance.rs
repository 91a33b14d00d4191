//! What every `Store` backend must do, as one suite. SQLite runs it in its unit tests; a
//! second backend runs the same functions against its own database.
//!
//! `open` gives a new handle on one database that starts empty, so that each check can also
//! see what survives reopening.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::install::token::IssuedToken;
use crate::problem::Problem;
use crate::repo::desired::{LastGoodFleet, SeenVersion};
use crate::store::{
    PostedStatus, ReconcileRecord, RemovedFleet, Store, StoreError, StoredEvent, StoredInstance, StoredRollout,
};

pub type Open<'a> = &'a dyn Fn() -> Arc<dyn Store>;

/// Every check, in turn.
pub fn run(open: Open<'_>) {
    versions_first_content_wins(open);
    last_good_fleets_change_one_by_one(open);
    reconcile_history_is_newest_first(open);
    rollouts_and_removed_fleets_are_written_and_forgotten(open);
    tokens_come_back_oldest_first(open);
    instances_keep_their_history_and_effective_config(open);
    component_lists_and_posted_statuses(open);
}

pub fn version(tag: &str, body: &str) -> SeenVersion {
    let (config, version) = tag.split_once('/').expect("tag has a slash");
    SeenVersion {
        config: config.into(),
        version: version.into(),
        tag: tag.into(),
        commit: "c0ffee".into(),
        time: 1_700_000_000,
        note: Some("first".into()),
        file: format!("configs/{config}.yaml"),
        content_type: "text/yaml".into(),
        body: Arc::from(body.as_bytes()),
        config_hash: crate::repo::hash::single_file_hash("text/yaml", body.as_bytes()),
        blob_id: "b10b".into(),
        moved_to: None,
    }
}

fn versions_first_content_wins(open: Open<'_>) {
    let store = open();
    store.remember_versions(&[version("gateway/v1", "a: 1\n")]).expect("remember");
    store.remember_versions(&[version("gateway/v1", "a: 2\n"), version("gateway/v2", "b\n")]).expect("again");
    let seen = open().seen_versions().expect("seen");
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["gateway/v1", "gateway/v2"]);
    assert_eq!(seen["gateway/v1"], version("gateway/v1", "a: 1\n"), "the first content seen stays");
}

fn last_good_fleets_change_one_by_one(open: Open<'_>) {
    let store = open();
    let fleet = |tag: &str| LastGoodFleet {
        source: format!("config = \"gateway\"\n# {tag}"),
        tag: Some(tag.into()),
        assigned_by: Some("c0ffee".into()),
    };
    let observed = LastGoodFleet { source: "observe_only = true".into(), tag: None, assigned_by: None };
    store
        .save_last_good_fleets(&[
            ("prod".into(), Some(fleet("gateway/v1"))),
            ("edge".into(), Some(fleet("gateway/v1"))),
        ])
        .expect("save");
    store
        .save_last_good_fleets(&[
            ("prod".into(), Some(fleet("gateway/v2"))),
            ("edge".into(), None),
            ("core".into(), Some(observed.clone())),
        ])
        .expect("change, forget and add");
    store.save_last_good_fleets(&[("gone".into(), None)]).expect("forgetting one never saved is no error");
    let expected = BTreeMap::from([("prod".to_owned(), fleet("gateway/v2")), ("core".to_owned(), observed)]);
    assert_eq!(open().last_good_fleets().expect("read"), expected);
}

fn reconcile_history_is_newest_first(open: Open<'_>) {
    let store = open();
    for (index, commit) in ["c1", "c2", "c3"].into_iter().enumerate() {
        store
            .record_reconcile(&ReconcileRecord {
                commit: commit.into(),
                branch: "main".into(),
                reconciled_at: index as i64,
                duration_micros: 42,
                problems: vec![Problem::error("fleets/x.toml", Some(2), "broken")],
            })
            .expect("record");
    }
    let history = open().reconcile_history(2).expect("history");
    assert_eq!(history.iter().map(|r| r.commit.as_str()).collect::<Vec<_>>(), ["c3", "c2"]);
    assert_eq!(history[0].problems, vec![Problem::error("fleets/x.toml", Some(2), "broken")]);
    assert_eq!(history[0].duration_micros, 42);
}

fn rollouts_and_removed_fleets_are_written_and_forgotten(open: Open<'_>) {
    let store = open();
    let rollout = |body: &str| StoredRollout { body: body.into(), members: vec![1, 2, 3] };
    store
        .save_rollouts(&[("prod".into(), Some(rollout("{\"a\":1}"))), ("edge".into(), Some(rollout("{}")))])
        .expect("save");
    store.save_rollouts(&[("prod".into(), Some(rollout("{\"a\":2}"))), ("edge".into(), None)]).expect("change");
    assert_eq!(open().rollouts().expect("read"), BTreeMap::from([("prod".to_owned(), rollout("{\"a\":2}"))]));

    let removed = RemovedFleet {
        removed_at: 1_700_000_000,
        commit: "c0ffee".into(),
        until: 1_700_604_800,
        tokens: vec![("tk_00000001".into(), 1_700_086_400), ("tk_00000002".into(), 1_700_604_800)],
    };
    let changed = [("edge".to_owned(), Some(removed.clone())), ("core".to_owned(), Some(removed.clone()))];
    store.save_removed_fleets(&changed).expect("save");
    store.save_removed_fleets(&[("core".to_owned(), None)]).expect("core came back");
    assert_eq!(open().removed_fleets().expect("read"), BTreeMap::from([("edge".to_owned(), removed)]));
}

fn tokens_come_back_oldest_first(open: Open<'_>) {
    let store = open();
    let token = |id: &str, fleet: &str, issued_at: i64| IssuedToken {
        id: id.into(),
        fleet: fleet.into(),
        secret_hash: [issued_at as u8; 32],
        issued_at,
        rotation: issued_at as u32,
        sealed: (issued_at == 3).then(|| vec![0xa5; 60]),
    };
    let first = [token("tk_0000000a", "prod", 1), token("tk_0000000b", "edge", 2)];
    store.save_tokens(&first).expect("save");
    store.save_tokens(&[token("tk_0000000c", "prod", 3)]).expect("save another");
    let tokens = open().tokens().expect("read");
    assert_eq!(tokens.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["tk_0000000a", "tk_0000000b", "tk_0000000c"]);
    assert_eq!(tokens[2].secret_hash, [3; 32]);
    assert_eq!((tokens[2].issued_at, tokens[2].rotation), (3, 3));
    assert_eq!((tokens[0].sealed.as_deref(), tokens[2].sealed.as_deref()), (None, Some(&[0xa5; 60][..])));
    let again = store.save_tokens(&[token("tk_0000000a", "prod", 9)]);
    assert!(matches!(again, Err(StoreError::Query { .. })), "an id is issued once: {again:?}");
}

pub fn instance(uid: u8) -> StoredInstance {
    StoredInstance {
        uid: [uid; 16],
        fleet: "prod".into(),
        token_id: "tk_00000001".into(),
        capabilities: 0x7847,
        assigned: Some((vec![1; 32], "gateway/v1".into())),
        served_hash: Some(vec![1; 32]),
        reported: Some((vec![1; 32], "applied".into(), String::new())),
        failed: None,
        first_seen_ms: 1,
        last_seen_ms: 2,
        status: "in_sync".into(),
        transport: Some("websocket".into()),
        description: Some("{\"host\":\"gw-1\"}".into()),
        health: Some("{\"healthy\":true}".into()),
        effective_config: Some("{\"body\":\"receivers: {}\"}".into()),
        components_hash: None,
        holder: String::new(),
        connected: false,
    }
}

fn instances_keep_their_history_and_effective_config(open: Open<'_>) {
    let store = open();
    let event = |uid: u8, at_ms: i64| StoredEvent { uid: [uid; 16], at_ms, event: format!("{{\"at\":{at_ms}}}") };
    let events: Vec<StoredEvent> = (1..=5).map(|at| event(1, at)).chain([event(2, 7)]).collect();
    store.save_instances(&[instance(1), instance(2), instance(3)], &events).expect("save");
    // A later write without the effective config leaves the stored one alone.
    let moved = StoredInstance {
        status: "failed".into(),
        failed: Some((vec![2; 32], "bad".into())),
        last_seen_ms: 9,
        effective_config: None,
        ..instance(1)
    };
    store.save_instances(std::slice::from_ref(&moved), &[event(1, 6)]).expect("update");

    let loaded = open().load_instances(3).expect("load");
    let by_uid: BTreeMap<u8, &(StoredInstance, Vec<StoredEvent>)> =
        loaded.iter().map(|entry| (entry.0.uid[0], entry)).collect();
    assert_eq!(by_uid.len(), 3);
    let kept = StoredInstance { effective_config: instance(1).effective_config, ..moved.clone() };
    assert_eq!(by_uid[&1].0, kept, "a write without the effective config keeps the stored one");
    assert_eq!(by_uid[&1].1, vec![event(1, 4), event(1, 5), event(1, 6)], "the newest 3, oldest first");
    assert_eq!(by_uid[&2].1, vec![event(2, 7)]);
    assert!(by_uid[&3].1.is_empty());
    assert_eq!(store.effective_config([1; 16]).expect("read"), instance(1).effective_config);
    assert_eq!(store.effective_config([9; 16]).expect("read"), None);

    assert_eq!(store.prune_events(2).expect("prune"), 4, "of instance 1, all but its newest 2");
    let loaded = open().load_instances(10).expect("load");
    let first = loaded.iter().find(|entry| entry.0.uid == [1; 16]).expect("instance 1");
    assert_eq!(first.1, vec![event(1, 5), event(1, 6)]);

    store.forget_instances(&[[1; 16], [3; 16]]).expect("forget");
    let loaded = open().load_instances(10).expect("load");
    assert_eq!(loaded.iter().map(|entry| entry.0.uid[0]).collect::<Vec<_>>(), [2]);
    assert_eq!(store.effective_config([1; 16]).expect("read"), None, "forgotten with its config");
}

fn component_lists_and_posted_statuses(open: Open<'_>) {
    let store = open();
    store.save_available_components(&[(vec![0xab; 32], "{\"kinds\":{}}".into())]).expect("save");
    store.save_available_components(&[(vec![0xab; 32], "{\"kinds\":{\"x\":{}}}".into())]).expect("again");
    let with_components = StoredInstance { components_hash: Some(vec![0xab; 32]), ..instance(7) };
    store.save_instances(std::slice::from_ref(&with_components), &[]).expect("an instance of that build");
    let reopened = open();
    assert_eq!(reopened.available_components().expect("lists"), vec![(vec![0xab; 32], "{\"kinds\":{}}".to_owned())]);
    let loaded = reopened.load_instances(1).expect("load");
    let seven = loaded.iter().find(|entry| entry.0.uid == [7; 16]).expect("instance 7");
    assert_eq!(seven.0.components_hash, Some(vec![0xab; 32]));

    let posted = |forge: &str, commit: &str, state: &str| PostedStatus {
        forge: forge.into(),
        context: "gitfleet/prod".into(),
        commit: commit.into(),
        state: state.into(),
        description: "1/2 in sync".into(),
    };
    store.save_posted_status(&posted("github", "c1", "pending")).expect("save");
    store.save_posted_status(&posted("github", "c1", "success")).expect("replace");
    store.save_posted_status(&posted("gitlab", "c9", "pending")).expect("another forge");
    assert_eq!(open().posted_statuses("github").expect("read"), vec![posted("github", "c1", "success")]);
    assert_eq!(open().posted_statuses("gitea").expect("read"), vec![]);
}
