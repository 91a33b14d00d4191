//! The embedded store: SQLite in the data directory, WAL mode, migrations by `user_version`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, params};

use crate::install::token::IssuedToken;
use crate::repo::desired::{LastGoodFleet, SeenVersion};
use crate::store::{
    PostedStatus, ReconcileRecord, RemovedFleet, Store, StoreError, StoredEvent, StoredInstance, StoredRollout,
};

/// Each entry moves the schema one version forward. Never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: versions first seen, last good fleets, reconcile history.
    "CREATE TABLE versions_seen (
        tag           TEXT PRIMARY KEY,
        config        TEXT NOT NULL,
        version       TEXT NOT NULL,
        commit_id     TEXT NOT NULL,
        tag_time      INTEGER NOT NULL,
        note          TEXT,
        file          TEXT NOT NULL,
        content_type  TEXT NOT NULL,
        config_hash   BLOB NOT NULL,
        blob_id       TEXT NOT NULL,
        body          BLOB NOT NULL,
        first_seen_at INTEGER NOT NULL
    );
    CREATE TABLE fleets_last_good (
        fleet    TEXT PRIMARY KEY,
        source   TEXT NOT NULL,
        tag      TEXT,
        saved_at INTEGER NOT NULL
    );
    CREATE TABLE reconciles (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        commit_id      TEXT NOT NULL,
        branch         TEXT NOT NULL,
        reconciled_at  INTEGER NOT NULL,
        duration_us    INTEGER NOT NULL,
        problems       TEXT NOT NULL
    );",
    // 2: install tokens (hashes only).
    "CREATE TABLE tokens (
        id          TEXT PRIMARY KEY,
        fleet       TEXT NOT NULL,
        secret_hash BLOB NOT NULL,
        issued_at   INTEGER NOT NULL,
        expires_at  INTEGER,
        rotation    INTEGER NOT NULL
    );
    CREATE INDEX tokens_by_fleet ON tokens (fleet, issued_at);",
    // 3: instances and their history.
    "CREATE TABLE instances (
        uid              BLOB PRIMARY KEY,
        fleet            TEXT NOT NULL,
        token_id         TEXT NOT NULL,
        capabilities     INTEGER NOT NULL,
        assigned_hash    BLOB,
        assigned_tag     TEXT,
        served_hash      BLOB,
        reported_hash    BLOB,
        reported_status  TEXT,
        reported_error   TEXT,
        failed_hash      BLOB,
        failed_error     TEXT,
        first_seen_ms    INTEGER NOT NULL,
        last_seen_ms     INTEGER NOT NULL,
        status           TEXT NOT NULL,
        transport        TEXT,
        description      TEXT,
        health           TEXT,
        effective_config TEXT
    );
    CREATE TABLE instance_events (
        id    INTEGER PRIMARY KEY AUTOINCREMENT,
        uid   BLOB NOT NULL,
        at_ms INTEGER NOT NULL,
        event TEXT NOT NULL
    );
    CREATE INDEX instance_events_by_uid ON instance_events (uid, id);",
    // 4: a token's expiry follows its fleet file's `expires` from the issue time, so it is
    // computed, not stored.
    "ALTER TABLE tokens DROP COLUMN expires_at;",
    // 5: the commit that set each fleet's assignment, for commit statuses.
    "ALTER TABLE fleets_last_good ADD COLUMN assigned_by TEXT;",
    // 6: commit statuses as last posted, so that a restart does not post them again.
    "CREATE TABLE commit_statuses (
        forge TEXT NOT NULL,
        context TEXT NOT NULL,
        commit_id TEXT NOT NULL,
        state TEXT NOT NULL,
        description TEXT NOT NULL,
        posted_at INTEGER NOT NULL,
        PRIMARY KEY (forge, context)
    );",
    // 7: the components of each agent build, once per build, and each instance's build.
    "CREATE TABLE available_components (
        hash BLOB PRIMARY KEY,
        body TEXT NOT NULL
    );
    ALTER TABLE instances ADD COLUMN components_hash BLOB;",
    // 8: each fleet's rollout (JSON, `rollout::Rollout`): the one running, or the last one;
    // the instances it moved apart, compact (`rollout::members_to_bytes`).
    "CREATE TABLE rollouts (
        fleet   TEXT PRIMARY KEY,
        body    TEXT NOT NULL,
        members BLOB NOT NULL
    );",
    // 9: fleets removed from the repository whose tokens are still accepted for a while;
    // `tokens` is JSON: `[[id, refused_from], …]`.
    "CREATE TABLE removed_fleets (
        fleet      TEXT PRIMARY KEY,
        removed_at INTEGER NOT NULL,
        commit_id  TEXT NOT NULL,
        until_at   INTEGER NOT NULL,
        tokens     TEXT NOT NULL
    );",
    // 10: a token's text sealed under the replicas' shared key.
    "ALTER TABLE tokens ADD COLUMN sealed BLOB;",
];

/// How many reconciles the history keeps.
const HISTORY_KEPT: i64 = 1000;

pub struct SqliteStore {
    connection: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let open_error =
            |source: rusqlite::Error| StoreError::Open { path: path.display().to_string(), source: source.into() };
        let mut connection = Connection::open(path).map_err(open_error)?;
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;")
            .map_err(open_error)?;
        migrate(&mut connection)?;
        Ok(Arc::new(Self { connection: Mutex::new(connection) }))
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let current: usize = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|source| StoreError::Migrate { version: 0, source: source.into() })?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::TooNew { found: current, supported: MIGRATIONS.len() });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = index + 1;
        let migrate_error = |source: rusqlite::Error| StoreError::Migrate { version, source: source.into() };
        let transaction = connection.transaction().map_err(migrate_error)?;
        transaction.execute_batch(sql).map_err(migrate_error)?;
        transaction.pragma_update(None, "user_version", version).map_err(migrate_error)?;
        transaction.commit().map_err(migrate_error)?;
    }
    Ok(())
}

fn query(operation: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { operation, source: Box::new(source) }
}

impl Store for SqliteStore {
    fn seen_versions(&self) -> Result<BTreeMap<String, SeenVersion>, StoreError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare("SELECT tag, config, version, commit_id, tag_time, note, file, content_type, config_hash, blob_id, body FROM versions_seen")
            .map_err(query("reading versions"))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    SeenVersion {
                        tag: row.get(0)?,
                        config: row.get(1)?,
                        version: row.get(2)?,
                        commit: row.get(3)?,
                        time: row.get(4)?,
                        note: row.get(5)?,
                        file: row.get(6)?,
                        content_type: row.get(7)?,
                        config_hash: [0; 32],
                        blob_id: row.get(9)?,
                        body: row.get::<_, Vec<u8>>(10)?.into(),
                        moved_to: None,
                    },
                    row.get::<_, Vec<u8>>(8)?,
                ))
            })
            .map_err(query("reading versions"))?;
        let mut versions = BTreeMap::new();
        for row in rows {
            let (mut version, hash) = row.map_err(query("reading versions"))?;
            version.config_hash = hash.try_into().map_err(|hash: Vec<u8>| StoreError::Corrupt {
                what: "config hash",
                message: format!("tag {} has a {}-byte hash", version.tag, hash.len()),
            })?;
            versions.insert(version.tag.clone(), version);
        }
        Ok(versions)
    }

    fn remember_versions(&self, versions: &[SeenVersion]) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(query("remembering versions"))?;
        {
            let mut insert = transaction
                .prepare(
                    "INSERT INTO versions_seen (tag, config, version, commit_id, tag_time, note, file, content_type, config_hash, blob_id, body, first_seen_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) ON CONFLICT (tag) DO NOTHING",
                )
                .map_err(query("remembering versions"))?;
            let now = crate::time::now_unix();
            for v in versions {
                insert
                    .execute(params![
                        v.tag,
                        v.config,
                        v.version,
                        v.commit,
                        v.time,
                        v.note,
                        v.file,
                        v.content_type,
                        &v.config_hash[..],
                        v.blob_id,
                        &v.body[..],
                        now
                    ])
                    .map_err(query("remembering versions"))?;
            }
        }
        transaction.commit().map_err(query("remembering versions"))
    }

    fn last_good_fleets(&self) -> Result<BTreeMap<String, LastGoodFleet>, StoreError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare("SELECT fleet, source, tag, assigned_by FROM fleets_last_good")
            .map_err(query("reading last good fleets"))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    LastGoodFleet { source: row.get(1)?, tag: row.get(2)?, assigned_by: row.get(3)? },
                ))
            })
            .map_err(query("reading last good fleets"))?;
        rows.collect::<Result<_, _>>().map_err(query("reading last good fleets"))
    }

    fn save_last_good_fleets(&self, changed: &[(String, Option<LastGoodFleet>)]) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(query("saving last good fleets"))?;
        let now = crate::time::now_unix();
        for (fleet, good) in changed {
            match good {
                Some(good) => transaction.execute(
                    "INSERT OR REPLACE INTO fleets_last_good (fleet, source, tag, assigned_by, saved_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![fleet, good.source, good.tag, good.assigned_by, now],
                ),
                None => transaction.execute("DELETE FROM fleets_last_good WHERE fleet = ?1", params![fleet]),
            }
            .map_err(query("saving last good fleets"))?;
        }
        transaction.commit().map_err(query("saving last good fleets"))
    }

    fn rollouts(&self) -> Result<BTreeMap<String, StoredRollout>, StoreError> {
        let connection = self.connection();
        let mut statement =
            connection.prepare("SELECT fleet, body, members FROM rollouts").map_err(query("reading rollouts"))?;
        let rows = statement
            .query_map([], |row| Ok((row.get(0)?, StoredRollout { body: row.get(1)?, members: row.get(2)? })))
            .map_err(query("reading rollouts"))?;
        rows.collect::<Result<_, _>>().map_err(query("reading rollouts"))
    }

    fn save_rollouts(&self, changed: &[(String, Option<StoredRollout>)]) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(query("saving rollouts"))?;
        for (fleet, rollout) in changed {
            match rollout {
                Some(rollout) => transaction.execute(
                    "INSERT OR REPLACE INTO rollouts (fleet, body, members) VALUES (?1, ?2, ?3)",
                    params![fleet, rollout.body, rollout.members],
                ),
                None => transaction.execute("DELETE FROM rollouts WHERE fleet = ?1", params![fleet]),
            }
            .map_err(query("saving rollouts"))?;
        }
        transaction.commit().map_err(query("saving rollouts"))
    }

    fn removed_fleets(&self) -> Result<BTreeMap<String, RemovedFleet>, StoreError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare("SELECT fleet, removed_at, commit_id, until_at, tokens FROM removed_fleets")
            .map_err(query("reading removed fleets"))?;
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get::<_, String>(4)?))
            })
            .map_err(query("reading removed fleets"))?;
        let mut removed = BTreeMap::new();
        for row in rows {
            let (fleet, removed_at, commit, until, tokens) = row.map_err(query("reading removed fleets"))?;
            let tokens = serde_json::from_str(&tokens).map_err(|error| StoreError::Corrupt {
                what: "removed fleet",
                message: format!("fleet {fleet}: {error}"),
            })?;
            removed.insert(fleet, RemovedFleet { removed_at, commit, until, tokens });
        }
        Ok(removed)
    }

    fn save_removed_fleets(&self, changed: &[(String, Option<RemovedFleet>)]) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(query("saving removed fleets"))?;
        for (fleet, removed) in changed {
            match removed {
                Some(removed) => transaction.execute(
                    "INSERT OR REPLACE INTO removed_fleets (fleet, removed_at, commit_id, until_at, tokens)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        fleet,
                        removed.removed_at,
                        removed.commit,
                        removed.until,
                        serde_json::to_string(&removed.tokens).expect("pairs of text and numbers serialize")
                    ],
                ),
                None => transaction.execute("DELETE FROM removed_fleets WHERE fleet = ?1", params![fleet]),
            }
            .map_err(query("saving removed fleets"))?;
        }
        transaction.commit().map_err(query("saving removed fleets"))
    }

    fn posted_statuses(&self, forge: &str) -> Result<Vec<PostedStatus>, StoreError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare("SELECT context, commit_id, state, description FROM commit_statuses WHERE forge = ?1")
            .map_err(query("reading posted commit statuses"))?;
        let rows = statement
            .query_map([forge], |row| {
                Ok(PostedStatus {
                    forge: forge.to_owned(),
                    context: row.get(0)?,
                    commit: row.get(1)?,
                    state: row.get(2)?,
                    description: row.get(3)?,
                })
            })
            .map_err(query("reading posted commit statuses"))?;
        rows.collect::<Result<_, _>>().map_err(query("reading posted commit statuses"))
    }

    fn save_posted_status(&self, status: &PostedStatus) -> Result<(), StoreError> {
        self.connection()
            .execute(
                "INSERT OR REPLACE INTO commit_statuses (forge, context, commit_id, state, description, posted_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    status.forge,
                    status.context,
                    status.commit,
                    status.state,
                    status.description,
                    crate::time::now_unix()
                ],
            )
            .map(|_| ())
            .map_err(query("remembering a posted commit status"))
    }

    fn record_reconcile(&self, record: &ReconcileRecord) -> Result<(), StoreError> {
        let problems = serde_json::to_string(&record.problems).expect("problems serialize to JSON");
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(query("recording a reconcile"))?;
        transaction
            .execute(
                "INSERT INTO reconciles (commit_id, branch, reconciled_at, duration_us, problems) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![record.commit, record.branch, record.reconciled_at, record.duration_micros as i64, problems],
            )
            .map_err(query("recording a reconcile"))?;
        transaction
            .execute("DELETE FROM reconciles WHERE id <= (SELECT MAX(id) FROM reconciles) - ?1", [HISTORY_KEPT])
            .map_err(query("pruning reconcile history"))?;
        transaction.commit().map_err(query("recording a reconcile"))
    }

    fn tokens(&self) -> Result<Vec<IssuedToken>, StoreError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare("SELECT id, fleet, secret_hash, issued_at, rotation, sealed FROM tokens ORDER BY issued_at, id")
            .map_err(query("reading tokens"))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, u32>(4)?,
                    row.get::<_, Option<Vec<u8>>>(5)?,
                ))
            })
            .map_err(query("reading tokens"))?;
        let mut tokens = Vec::new();
        for row in rows {
            let (id, fleet, hash, issued_at, rotation, sealed) = row.map_err(query("reading tokens"))?;
            let secret_hash = hash.try_into().map_err(|_| StoreError::Corrupt {
                what: "token",
                message: format!("token {id} has a malformed hash"),
            })?;
            tokens.push(IssuedToken { id, fleet, secret_hash, issued_at, rotation, sealed });
        }
        Ok(tokens)
    }

    fn save_tokens(&self, tokens: &[IssuedToken]) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(query("saving tokens"))?;
        {
            let mut insert = transaction
                .prepare_cached(
                    "INSERT INTO tokens (id, fleet, secret_hash, issued_at, rotation, sealed) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(query("saving tokens"))?;
            for token in tokens {
                insert
                    .execute(params![
                        token.id,
                        token.fleet,
                        &token.secret_hash[..],
                        token.issued_at,
                        token.rotation,
                        token.sealed
                    ])
                    .map_err(query("saving tokens"))?;
            }
        }
        transaction.commit().map_err(query("saving tokens"))
    }

    fn save_instances(&self, instances: &[StoredInstance], events: &[StoredEvent]) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(query("saving instances"))?;
        {
            let mut upsert = transaction
                .prepare_cached(
                    "INSERT INTO instances (uid, fleet, token_id, capabilities, served_hash, reported_hash, reported_status,
                         reported_error, failed_hash, failed_error, first_seen_ms, last_seen_ms, status, transport,
                         description, health, effective_config, assigned_hash, assigned_tag, components_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)
                     ON CONFLICT (uid) DO UPDATE SET fleet = excluded.fleet, token_id = excluded.token_id,
                         capabilities = excluded.capabilities, served_hash = excluded.served_hash,
                         assigned_hash = excluded.assigned_hash, assigned_tag = excluded.assigned_tag,
                         reported_hash = excluded.reported_hash, reported_status = excluded.reported_status,
                         reported_error = excluded.reported_error, failed_hash = excluded.failed_hash,
                         failed_error = excluded.failed_error, last_seen_ms = excluded.last_seen_ms,
                         status = excluded.status, transport = excluded.transport,
                         description = excluded.description, health = excluded.health,
                         effective_config = COALESCE(excluded.effective_config, instances.effective_config),
                         components_hash = excluded.components_hash",
                )
                .map_err(query("saving instances"))?;
            for i in instances {
                let (reported_hash, reported_status, reported_error) = match &i.reported {
                    Some((hash, status, error)) => (Some(hash.as_slice()), Some(status.as_str()), Some(error.as_str())),
                    None => (None, None, None),
                };
                let (failed_hash, failed_error) = match &i.failed {
                    Some((hash, error)) => (Some(hash.as_slice()), Some(error.as_str())),
                    None => (None, None),
                };
                upsert
                    .execute(params![
                        &i.uid[..],
                        i.fleet,
                        i.token_id,
                        i.capabilities as i64,
                        i.served_hash,
                        reported_hash,
                        reported_status,
                        reported_error,
                        failed_hash,
                        failed_error,
                        i.first_seen_ms,
                        i.last_seen_ms,
                        i.status,
                        i.transport,
                        i.description,
                        i.health,
                        i.effective_config,
                        i.assigned.as_ref().map(|(hash, _)| hash.as_slice()),
                        i.assigned.as_ref().map(|(_, tag)| tag.as_str()),
                        i.components_hash
                    ])
                    .map_err(query("saving instances"))?;
            }
            let mut insert = transaction
                .prepare_cached("INSERT INTO instance_events (uid, at_ms, event) VALUES (?1, ?2, ?3)")
                .map_err(query("saving instance events"))?;
            for event in events {
                insert
                    .execute(params![&event.uid[..], event.at_ms, event.event])
                    .map_err(query("saving instance events"))?;
            }
        }
        transaction.commit().map_err(query("saving instances"))
    }

    fn load_instances(
        &self,
        events_per_instance: usize,
    ) -> Result<Vec<(StoredInstance, Vec<StoredEvent>)>, StoreError> {
        let connection = self.connection();
        let mut events: std::collections::HashMap<[u8; 16], Vec<StoredEvent>> = std::collections::HashMap::new();
        {
            let mut statement = connection
                .prepare(
                    "SELECT uid, at_ms, event FROM (
                         SELECT uid, at_ms, event, id, ROW_NUMBER() OVER (PARTITION BY uid ORDER BY id DESC) AS newest
                         FROM instance_events)
                     WHERE newest <= ?1 ORDER BY id",
                )
                .map_err(query("loading instance events"))?;
            let rows = statement
                .query_map([events_per_instance as i64], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?, row.get::<_, String>(2)?))
                })
                .map_err(query("loading instance events"))?;
            for row in rows {
                let (uid, at_ms, event) = row.map_err(query("loading instance events"))?;
                let Ok(uid) = <[u8; 16]>::try_from(uid.as_slice()) else { continue };
                events.entry(uid).or_default().push(StoredEvent { uid, at_ms, event });
            }
        }
        let mut statement = connection
            .prepare(
                "SELECT uid, fleet, token_id, capabilities, served_hash, reported_hash, reported_status, reported_error,
                        failed_hash, failed_error, first_seen_ms, last_seen_ms, status, transport, description, health,
                        effective_config, assigned_hash, assigned_tag, components_hash
                 FROM instances",
            )
            .map_err(query("loading instances"))?;
        let rows = statement
            .query_map([], |row| {
                let reported = match (row.get::<_, Option<Vec<u8>>>(5)?, row.get::<_, Option<String>>(6)?) {
                    (Some(hash), Some(status)) => {
                        Some((hash, status, row.get::<_, Option<String>>(7)?.unwrap_or_default()))
                    }
                    _ => None,
                };
                let failed = row.get::<_, Option<Vec<u8>>>(8)?.map(|hash| (hash, String::new()));
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    StoredInstance {
                        uid: [0; 16],
                        fleet: row.get(1)?,
                        token_id: row.get(2)?,
                        capabilities: row.get::<_, i64>(3)? as u64,
                        assigned: match (row.get::<_, Option<Vec<u8>>>(17)?, row.get::<_, Option<String>>(18)?) {
                            (Some(hash), Some(tag)) => Some((hash, tag)),
                            _ => None,
                        },
                        served_hash: row.get(4)?,
                        reported,
                        failed,
                        first_seen_ms: row.get(10)?,
                        last_seen_ms: row.get(11)?,
                        status: row.get(12)?,
                        transport: row.get(13)?,
                        description: row.get(14)?,
                        health: row.get(15)?,
                        effective_config: row.get(16)?,
                        components_hash: row.get(19)?,
                        holder: String::new(),
                        connected: false,
                    },
                    row.get::<_, Option<String>>(9)?,
                ))
            })
            .map_err(query("loading instances"))?;
        let mut instances = Vec::new();
        for row in rows {
            let (uid, mut instance, failed_error) = row.map_err(query("loading instances"))?;
            let Ok(uid) = <[u8; 16]>::try_from(uid.as_slice()) else {
                return Err(StoreError::Corrupt {
                    what: "instance",
                    message: format!("a {}-byte instance id", uid.len()),
                });
            };
            instance.uid = uid;
            if let Some((_, error)) = &mut instance.failed {
                *error = failed_error.unwrap_or_default();
            }
            let history = events.remove(&uid).unwrap_or_default();
            instances.push((instance, history));
        }
        Ok(instances)
    }

    fn save_available_components(&self, lists: &[(Vec<u8>, String)]) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(query("saving component lists"))?;
        {
            let mut insert = transaction
                .prepare_cached("INSERT OR IGNORE INTO available_components (hash, body) VALUES (?1, ?2)")
                .map_err(query("saving component lists"))?;
            for (hash, body) in lists {
                insert.execute(params![hash, body]).map_err(query("saving component lists"))?;
            }
        }
        transaction.commit().map_err(query("saving component lists"))
    }

    fn available_components(&self) -> Result<Vec<(Vec<u8>, String)>, StoreError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare("SELECT hash, body FROM available_components")
            .map_err(query("loading component lists"))?;
        let rows =
            statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).map_err(query("loading component lists"))?;
        rows.collect::<Result<_, _>>().map_err(query("loading component lists"))
    }

    fn effective_config(&self, uid: [u8; 16]) -> Result<Option<String>, StoreError> {
        use rusqlite::OptionalExtension;
        self.connection()
            .query_row("SELECT effective_config FROM instances WHERE uid = ?1", [&uid[..]], |row| {
                row.get::<_, Option<String>>(0)
            })
            .optional()
            .map(Option::flatten)
            .map_err(query("reading an effective config"))
    }

    fn prune_events(&self, per_instance: usize) -> Result<usize, StoreError> {
        self.connection()
            .execute(
                "DELETE FROM instance_events WHERE id IN (
                     SELECT id FROM (
                         SELECT id, ROW_NUMBER() OVER (PARTITION BY uid ORDER BY id DESC) AS newest FROM instance_events)
                     WHERE newest > ?1)",
                [per_instance as i64],
            )
            .map_err(query("pruning instance events"))
    }

    fn forget_instances(&self, uids: &[[u8; 16]]) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(query("forgetting instances"))?;
        {
            let mut events = transaction
                .prepare_cached("DELETE FROM instance_events WHERE uid = ?1")
                .map_err(query("forgetting"))?;
            let mut instances =
                transaction.prepare_cached("DELETE FROM instances WHERE uid = ?1").map_err(query("forgetting"))?;
            for uid in uids {
                events.execute([uid.as_slice()]).map_err(query("forgetting instance events"))?;
                instances.execute([uid.as_slice()]).map_err(query("forgetting instances"))?;
            }
        }
        transaction.commit().map_err(query("forgetting instances"))
    }

    fn reconcile_history(&self, limit: usize) -> Result<Vec<ReconcileRecord>, StoreError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare("SELECT commit_id, branch, reconciled_at, duration_us, problems FROM reconciles ORDER BY id DESC LIMIT ?1")
            .map_err(query("reading reconcile history"))?;
        let rows = statement
            .query_map([limit as i64], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, String>(4)?,
                ))
            })
            .map_err(query("reading reconcile history"))?;
        let mut history = Vec::new();
        for row in rows {
            let (commit, branch, reconciled_at, duration, problems) =
                row.map_err(query("reading reconcile history"))?;
            let problems = serde_json::from_str(&problems)
                .map_err(|error| StoreError::Corrupt { what: "reconcile record", message: error.to_string() })?;
            history.push(ReconcileRecord {
                commit,
                branch,
                reconciled_at,
                duration_micros: duration.max(0) as u64,
                problems,
            });
        }
        Ok(history)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_keeps_the_store_contract() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        crate::store::conformance::run(&|| SqliteStore::open(&path).expect("open") as Arc<dyn Store>);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        Connection::open(&path).and_then(|c| c.pragma_update(None, "user_version", 99)).expect("set version");
        match SqliteStore::open(&path) {
            Err(StoreError::TooNew { found: 99, supported }) if supported == MIGRATIONS.len() => {}
            other => panic!("expected TooNew, got {:?}", other.map(|_| ())),
        }
    }
}
