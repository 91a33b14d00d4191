//! The shared store: PostgreSQL, for several gitfleet replicas. The same tables as SQLite,
//! in PostgreSQL's types; the same contract (`store::conformance`).
//!
//! - The schema is migrated on connect, under an advisory lock, so replicas that start
//!   together migrate it once.
//! - A lost connection (a PostgreSQL restart, a failover) is made again on the next call;
//!   the call that found it lost fails, and its caller tries again as for any write error.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, NoTls, Row, Transaction};

use crate::install::token::IssuedToken;
use crate::repo::desired::{LastGoodFleet, SeenVersion};
use crate::store::{
    PostedStatus, ReconcileRecord, RemovedFleet, Store, StoreError, StoredEvent, StoredInstance, StoredRollout,
};

/// Each entry moves the schema one version forward. Never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: everything SQLite has after its ninth migration.
    "CREATE TABLE versions_seen (
        tag           TEXT PRIMARY KEY,
        config        TEXT NOT NULL,
        version       TEXT NOT NULL,
        commit_id     TEXT NOT NULL,
        tag_time      BIGINT NOT NULL,
        note          TEXT,
        file          TEXT NOT NULL,
        content_type  TEXT NOT NULL,
        config_hash   BYTEA NOT NULL,
        blob_id       TEXT NOT NULL,
        body          BYTEA NOT NULL,
        first_seen_at BIGINT NOT NULL
    );
    CREATE TABLE fleets_last_good (
        fleet       TEXT PRIMARY KEY,
        source      TEXT NOT NULL,
        tag         TEXT,
        assigned_by TEXT,
        saved_at    BIGINT NOT NULL
    );
    CREATE TABLE reconciles (
        id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        commit_id     TEXT NOT NULL,
        branch        TEXT NOT NULL,
        reconciled_at BIGINT NOT NULL,
        duration_us   BIGINT NOT NULL,
        problems      TEXT NOT NULL
    );
    CREATE TABLE tokens (
        id          TEXT PRIMARY KEY,
        fleet       TEXT NOT NULL,
        secret_hash BYTEA NOT NULL,
        issued_at   BIGINT NOT NULL,
        rotation    BIGINT NOT NULL
    );
    CREATE INDEX tokens_by_fleet ON tokens (fleet, issued_at);
    CREATE TABLE instances (
        uid              BYTEA PRIMARY KEY,
        fleet            TEXT NOT NULL,
        token_id         TEXT NOT NULL,
        capabilities     BIGINT NOT NULL,
        assigned_hash    BYTEA,
        assigned_tag     TEXT,
        served_hash      BYTEA,
        reported_hash    BYTEA,
        reported_status  TEXT,
        reported_error   TEXT,
        failed_hash      BYTEA,
        failed_error     TEXT,
        first_seen_ms    BIGINT NOT NULL,
        last_seen_ms     BIGINT NOT NULL,
        status           TEXT NOT NULL,
        transport        TEXT,
        description      TEXT,
        health           TEXT,
        effective_config TEXT,
        components_hash  BYTEA
    );
    CREATE TABLE instance_events (
        id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        uid   BYTEA NOT NULL,
        at_ms BIGINT NOT NULL,
        event TEXT NOT NULL
    );
    CREATE INDEX instance_events_by_uid ON instance_events (uid, id);
    CREATE TABLE commit_statuses (
        forge       TEXT NOT NULL,
        context     TEXT NOT NULL,
        commit_id   TEXT NOT NULL,
        state       TEXT NOT NULL,
        description TEXT NOT NULL,
        posted_at   BIGINT NOT NULL,
        PRIMARY KEY (forge, context)
    );
    CREATE TABLE available_components (
        hash BYTEA PRIMARY KEY,
        body TEXT NOT NULL
    );
    CREATE TABLE rollouts (
        fleet   TEXT PRIMARY KEY,
        body    TEXT NOT NULL,
        members BYTEA NOT NULL
    );
    CREATE TABLE removed_fleets (
        fleet      TEXT PRIMARY KEY,
        removed_at BIGINT NOT NULL,
        commit_id  TEXT NOT NULL,
        until_at   BIGINT NOT NULL,
        tokens     TEXT NOT NULL
    );",
    // 2: sealed token texts, the leader's term (for fencing) and the state it publishes.
    "ALTER TABLE tokens ADD COLUMN sealed BYTEA;
    CREATE TABLE leader (
        id      INT PRIMARY KEY CHECK (id = 1),
        term    BIGINT NOT NULL,
        replica TEXT NOT NULL,
        since   BIGINT NOT NULL
    );
    INSERT INTO leader (id, term, replica, since) VALUES (1, 0, '', 0);
    CREATE TABLE published_state (
        id           INT PRIMARY KEY CHECK (id = 1),
        term         BIGINT NOT NULL,
        body         TEXT NOT NULL,
        published_at BIGINT NOT NULL
    );",
    // 3: which replica wrote each instance last, and a change number replicas read from.
    "ALTER TABLE instances ADD COLUMN holder TEXT NOT NULL DEFAULT '',
        ADD COLUMN connected BOOLEAN NOT NULL DEFAULT false,
        ADD COLUMN changed BIGINT NOT NULL DEFAULT 0;
    CREATE SEQUENCE instance_changes;
    CREATE INDEX instances_by_change ON instances (changed);",
    // 4: replicas read what the others' instances add up to, not the instances: each
    // writes its counts, and learns of an instance it held that another took (`moved_from`).
    "ALTER TABLE instances ADD COLUMN moved_from TEXT;
    DROP INDEX instances_by_change;
    CREATE INDEX instances_moved ON instances (moved_from, changed) WHERE moved_from IS NOT NULL;
    CREATE INDEX instances_by_holder ON instances (holder, fleet);
    CREATE TABLE replica_counts (
        replica    TEXT PRIMARY KEY,
        body       TEXT NOT NULL,
        written_ms BIGINT NOT NULL
    );",
];

/// Now in Unix milliseconds by the database's clock, which every replica shares.
const DATABASE_NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The schema version this gitfleet migrates to.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// The advisory lock replicas take to migrate the schema one at a time ("gitfleet" in ASCII).
const MIGRATION_LOCK: i64 = 0x6769_7466_6c65_6574;
/// The advisory lock the leader holds for as long as it leads ("leader" in ASCII).
const LEADER_LOCK: i64 = 0x0000_6c65_6164_6572;
/// Where the leader tells followers that what it publishes changed.
const CHANNEL: &str = "gitfleet";
/// How many reconciles the history keeps.
const HISTORY_KEPT: i64 = 1000;

pub struct PostgresStore {
    config: Config,
    /// TLS, when the URL asks for it (`sslmode=require`).
    tls: Option<super::pg_tls::Tls>,
    /// What the database is called in messages: its URL without the password.
    name: String,
    client: Mutex<Option<Client>>,
    /// The connection that tries to take `LEADER_LOCK`, and whether it holds it.
    leading: Mutex<Option<(Client, bool)>>,
    /// The term this process took when it last became the leader. Writes only the leader
    /// makes are refused once another has taken a later one (fencing).
    term: Mutex<Option<i64>>,
    /// The connection that listens on `CHANNEL`.
    listening: Mutex<Option<Client>>,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`, or key=value pairs), with
    /// `password` when it is kept apart from the URL, and migrates the schema.
    pub fn open(url: &str, password: Option<&str>) -> Result<Arc<Self>, StoreError> {
        Self::open_with(url, password, None)
    }

    /// `open`, with TLS when the URL says `sslmode=require`: verified against the CA
    /// certificates in `ca_file`, or the system's trust store.
    pub fn open_with(url: &str, password: Option<&str>, ca_file: Option<&Path>) -> Result<Arc<Self>, StoreError> {
        let mut config: Config = url
            .parse()
            .map_err(|error: postgres::Error| StoreError::Open { path: redact(url), source: described(error) })?;
        if let Some(password) = password {
            config.password(password);
        }
        config.application_name("gitfleet");
        let tls = match config.get_ssl_mode() {
            postgres::config::SslMode::Require => Some(
                super::pg_tls::Tls::new(ca_file)
                    .map_err(|message| StoreError::Open { path: redact(url), source: message.into() })?,
            ),
            _ => None,
        };
        let store = Self {
            config,
            tls,
            name: redact(url),
            client: Mutex::new(None),
            leading: Mutex::new(None),
            term: Mutex::new(None),
            listening: Mutex::new(None),
        };
        {
            let mut client = store.client()?;
            migrate(client.as_mut().expect("just connected"))?;
        }
        Ok(Arc::new(store))
    }

    fn connect(&self) -> Result<Client, StoreError> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        };
        connected.map_err(|error| StoreError::Open { path: self.name.clone(), source: described(error) })
    }

    /// The connection, made (again) if there is none or it was lost.
    fn client(&self) -> Result<MutexGuard<'_, Option<Client>>, StoreError> {
        let mut client = self.client.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if client.as_ref().is_none_or(Client::is_closed) {
            *client = None;
            *client = Some(self.connect()?);
        }
        Ok(client)
    }

    /// Runs `work` in one transaction, if this process still leads: once it has led, a
    /// write only the leader makes fails with `NotLeader` after another replica took over,
    /// even before this one noticed it lost its lock.
    fn leader_transaction<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&mut Transaction<'_>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let term = *self.term.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut guard = self.client()?;
        let client = guard.as_mut().expect("connected by client()");
        let mut transaction = client.transaction().map_err(query(operation))?;
        if let Some(term) = term {
            // The row lock keeps a new leader from taking its term until this commits.
            let current: i64 = transaction
                .query_one("SELECT term FROM leader WHERE id = 1 FOR SHARE", &[])
                .map_err(query(operation))?
                .get(0);
            if current != term {
                return Err(StoreError::NotLeader { operation });
            }
        }
        let done = work(&mut transaction).map_err(query(operation))?;
        transaction.commit().map_err(query(operation))?;
        Ok(done)
    }

    /// Runs `work` in one transaction.
    fn transaction<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&mut Transaction<'_>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut guard = self.client()?;
        let client = guard.as_mut().expect("connected by client()");
        let mut transaction = client.transaction().map_err(query(operation))?;
        let done = work(&mut transaction).map_err(query(operation))?;
        transaction.commit().map_err(query(operation))?;
        Ok(done)
    }

    /// Runs one read.
    fn read(
        &self,
        operation: &'static str,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut guard = self.client()?;
        guard.as_mut().expect("connected by client()").query(sql, params).map_err(query(operation))
    }
}

impl PostgresStore {
    /// The instances `filter` (SQL over `instances`, with `params` as $2, $3, …) selects,
    /// each with its newest `events_per_instance` history entries and its change number.
    fn read_instances(
        &self,
        operation: &'static str,
        filter: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        events_per_instance: usize,
        effective_config: bool,
    ) -> Result<Vec<(StoredInstance, Vec<StoredEvent>, i64)>, StoreError> {
        let limit = i64::try_from(events_per_instance).unwrap_or(i64::MAX);
        let mut all: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&limit];
        all.extend_from_slice(params);
        let mut events: std::collections::HashMap<[u8; 16], Vec<StoredEvent>> = std::collections::HashMap::new();
        let rows = if events_per_instance == 0 {
            Vec::new()
        } else {
            self.read(
                operation,
                &format!(
                    "SELECT uid, at_ms, event FROM (
                     SELECT uid, at_ms, event, id, ROW_NUMBER() OVER (PARTITION BY uid ORDER BY id DESC) AS newest
                     FROM instance_events WHERE uid IN (SELECT uid FROM instances WHERE {filter})) AS numbered
                 WHERE newest <= $1 ORDER BY id"
                ),
                &all,
            )?
        };
        for row in rows {
            let Ok(uid) = <[u8; 16]>::try_from(row.get::<_, Vec<u8>>(0)) else { continue };
            events.entry(uid).or_default().push(StoredEvent { uid, at_ms: row.get(1), event: row.get(2) });
        }
        let config = if effective_config { "effective_config" } else { "NULL::TEXT" };
        let rows = self.read(
            operation,
            &format!(
                "SELECT uid, fleet, token_id, capabilities, served_hash, reported_hash, reported_status, reported_error,
                        failed_hash, failed_error, first_seen_ms, last_seen_ms, status, transport, description, health,
                        {config}, assigned_hash, assigned_tag, components_hash, holder, connected, changed
                 FROM instances WHERE $1::BIGINT IS NOT NULL AND ({filter}) ORDER BY uid"
            ),
            &all,
        )?;
        let mut instances = Vec::with_capacity(rows.len());
        for row in rows {
            let uid = uid16(row.get(0))?;
            let reported = match (row.get::<_, Option<Vec<u8>>>(5), row.get::<_, Option<String>>(6)) {
                (Some(hash), Some(status)) => Some((hash, status, row.get::<_, Option<String>>(7).unwrap_or_default())),
                _ => None,
            };
            let failed = row
                .get::<_, Option<Vec<u8>>>(8)
                .map(|hash| (hash, row.get::<_, Option<String>>(9).unwrap_or_default()));
            let instance = StoredInstance {
                uid,
                fleet: row.get(1),
                token_id: row.get(2),
                capabilities: row.get::<_, i64>(3) as u64,
                assigned: match (row.get::<_, Option<Vec<u8>>>(17), row.get::<_, Option<String>>(18)) {
                    (Some(hash), Some(tag)) => Some((hash, tag)),
                    _ => None,
                },
                served_hash: row.get(4),
                reported,
                failed,
                first_seen_ms: row.get(10),
                last_seen_ms: row.get(11),
                status: row.get(12),
                transport: row.get(13),
                description: row.get(14),
                health: row.get(15),
                effective_config: row.get(16),
                components_hash: row.get(19),
                holder: row.get(20),
                connected: row.get(21),
            };
            let history = events.remove(&uid).unwrap_or_default();
            instances.push((instance, history, row.get(22)));
        }
        Ok(instances)
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        let leading = self.leading.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let clients = [&mut self.client, &mut self.listening]
            .map(|client| client.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take());
        let clients = (clients, leading);
        // A `postgres::Client` closes its connection on its own runtime when dropped, which
        // panics on a thread that drives async tasks (where the last `Arc` may go).
        let _ = std::thread::spawn(move || drop(clients)).join();
    }
}

/// The URL as it may be shown: without a password.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        let words = url.split_whitespace().filter(|word| !word.starts_with("password="));
        return words.collect::<Vec<_>>().join(" ");
    };
    let Some((credentials, host)) = rest.split_once('@') else { return url.to_owned() };
    let user = credentials.split_once(':').map_or(credentials, |(user, _)| user);
    format!("{scheme}://{user}@{host}")
}

fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let migrate_error =
        |version: usize| move |source: postgres::Error| StoreError::Migrate { version, source: described(source) };
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).map_err(migrate_error(0))?;
    let migrated = (|| {
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS gitfleet_schema (version INTEGER NOT NULL)")
            .map_err(migrate_error(0))?;
        let current: i32 = client
            .query_opt("SELECT version FROM gitfleet_schema", &[])
            .map_err(migrate_error(0))?
            .map_or(0, |row| row.get(0));
        let current = usize::try_from(current).unwrap_or(0);
        if current > MIGRATIONS.len() {
            return Err(StoreError::TooNew { found: current, supported: MIGRATIONS.len() });
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            let version = index + 1;
            let mut transaction = client.transaction().map_err(migrate_error(version))?;
            transaction.batch_execute(sql).map_err(migrate_error(version))?;
            transaction.execute("DELETE FROM gitfleet_schema", &[]).map_err(migrate_error(version))?;
            transaction
                .execute("INSERT INTO gitfleet_schema (version) VALUES ($1)", &[&(version as i32)])
                .map_err(migrate_error(version))?;
            transaction.commit().map_err(migrate_error(version))?;
        }
        Ok(())
    })();
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).map_err(migrate_error(0))?;
    migrated
}

fn query(operation: &'static str) -> impl Fn(postgres::Error) -> StoreError {
    move |source| StoreError::Query { operation, source: described(source) }
}

/// The error as people need it: the server's own message ("password authentication failed
/// for user …"), or what went wrong with the connection, where the driver says only "db
/// error" or "error connecting to server".
fn described(error: postgres::Error) -> crate::store::BackendError {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            text = format!("{text} ({detail})");
        }
        return text.into();
    }
    match std::error::Error::source(&error) {
        Some(cause) => format!("{error}: {cause}").into(),
        None => Box::new(error),
    }
}

fn hash32(what: &'static str, bytes: Vec<u8>) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| StoreError::Corrupt { what, message: format!("a {}-byte hash", bytes.len()) })
}

fn uid16(bytes: Vec<u8>) -> Result<[u8; 16], StoreError> {
    bytes.try_into().map_err(|bytes: Vec<u8>| StoreError::Corrupt {
        what: "instance",
        message: format!("a {}-byte instance id", bytes.len()),
    })
}

impl Store for PostgresStore {
    fn seen_versions(&self) -> Result<BTreeMap<String, SeenVersion>, StoreError> {
        let rows = self.read(
            "reading versions",
            "SELECT tag, config, version, commit_id, tag_time, note, file, content_type, config_hash, blob_id, body
             FROM versions_seen",
            &[],
        )?;
        let mut versions = BTreeMap::new();
        for row in rows {
            let version = SeenVersion {
                tag: row.get(0),
                config: row.get(1),
                version: row.get(2),
                commit: row.get(3),
                time: row.get(4),
                note: row.get(5),
                file: row.get(6),
                content_type: row.get(7),
                config_hash: hash32("config hash", row.get(8))?,
                blob_id: row.get(9),
                body: row.get::<_, Vec<u8>>(10).into(),
                moved_to: None,
            };
            versions.insert(version.tag.clone(), version);
        }
        Ok(versions)
    }

    fn remember_versions(&self, versions: &[SeenVersion]) -> Result<(), StoreError> {
        let now = crate::time::now_unix();
        self.leader_transaction("remembering versions", |transaction| {
            let insert = transaction.prepare(
                "INSERT INTO versions_seen (tag, config, version, commit_id, tag_time, note, file, content_type,
                     config_hash, blob_id, body, first_seen_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (tag) DO NOTHING",
            )?;
            for v in versions {
                transaction.execute(
                    &insert,
                    &[
                        &v.tag,
                        &v.config,
                        &v.version,
                        &v.commit,
                        &v.time,
                        &v.note,
                        &v.file,
                        &v.content_type,
                        &&v.config_hash[..],
                        &v.blob_id,
                        &&v.body[..],
                        &now,
                    ],
                )?;
            }
            Ok(())
        })
    }

    fn last_good_fleets(&self) -> Result<BTreeMap<String, LastGoodFleet>, StoreError> {
        let rows =
            self.read("reading last good fleets", "SELECT fleet, source, tag, assigned_by FROM fleets_last_good", &[])?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), LastGoodFleet { source: row.get(1), tag: row.get(2), assigned_by: row.get(3) }))
            .collect())
    }

    fn save_last_good_fleets(&self, changed: &[(String, Option<LastGoodFleet>)]) -> Result<(), StoreError> {
        let now = crate::time::now_unix();
        self.leader_transaction("saving last good fleets", |transaction| {
            for (fleet, good) in changed {
                match good {
                    Some(good) => transaction.execute(
                        "INSERT INTO fleets_last_good (fleet, source, tag, assigned_by, saved_at)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (fleet) DO UPDATE SET source = excluded.source, tag = excluded.tag,
                             assigned_by = excluded.assigned_by, saved_at = excluded.saved_at",
                        &[fleet, &good.source, &good.tag, &good.assigned_by, &now],
                    )?,
                    None => transaction.execute("DELETE FROM fleets_last_good WHERE fleet = $1", &[fleet])?,
                };
            }
            Ok(())
        })
    }

    fn record_reconcile(&self, record: &ReconcileRecord) -> Result<(), StoreError> {
        let problems = serde_json::to_string(&record.problems).expect("problems serialize to JSON");
        let duration = i64::try_from(record.duration_micros).unwrap_or(i64::MAX);
        self.leader_transaction("recording a reconcile", |transaction| {
            transaction.execute(
                "INSERT INTO reconciles (commit_id, branch, reconciled_at, duration_us, problems) VALUES ($1, $2, $3, $4, $5)",
                &[&record.commit, &record.branch, &record.reconciled_at, &duration, &problems],
            )?;
            transaction.execute(
                "DELETE FROM reconciles WHERE id <= (SELECT MAX(id) FROM reconciles) - $1",
                &[&HISTORY_KEPT],
            )?;
            Ok(())
        })
    }

    fn rollouts(&self) -> Result<BTreeMap<String, StoredRollout>, StoreError> {
        let rows = self.read("reading rollouts", "SELECT fleet, body, members FROM rollouts", &[])?;
        Ok(rows.into_iter().map(|row| (row.get(0), StoredRollout { body: row.get(1), members: row.get(2) })).collect())
    }

    fn save_rollouts(&self, changed: &[(String, Option<StoredRollout>)]) -> Result<(), StoreError> {
        self.leader_transaction("saving rollouts", |transaction| {
            transaction.execute("SELECT pg_notify($1, 'state')", &[&CHANNEL])?;
            for (fleet, rollout) in changed {
                match rollout {
                    Some(rollout) => transaction.execute(
                        "INSERT INTO rollouts (fleet, body, members) VALUES ($1, $2, $3)
                         ON CONFLICT (fleet) DO UPDATE SET body = excluded.body, members = excluded.members",
                        &[fleet, &rollout.body, &rollout.members],
                    )?,
                    None => transaction.execute("DELETE FROM rollouts WHERE fleet = $1", &[fleet])?,
                };
            }
            Ok(())
        })
    }

    fn removed_fleets(&self) -> Result<BTreeMap<String, RemovedFleet>, StoreError> {
        let rows = self.read(
            "reading removed fleets",
            "SELECT fleet, removed_at, commit_id, until_at, tokens FROM removed_fleets",
            &[],
        )?;
        let mut removed = BTreeMap::new();
        for row in rows {
            let fleet: String = row.get(0);
            let tokens = serde_json::from_str(row.get(4)).map_err(|error| StoreError::Corrupt {
                what: "removed fleet",
                message: format!("fleet {fleet}: {error}"),
            })?;
            removed
                .insert(fleet, RemovedFleet { removed_at: row.get(1), commit: row.get(2), until: row.get(3), tokens });
        }
        Ok(removed)
    }

    fn save_removed_fleets(&self, changed: &[(String, Option<RemovedFleet>)]) -> Result<(), StoreError> {
        self.leader_transaction("saving removed fleets", |transaction| {
            for (fleet, removed) in changed {
                match removed {
                    Some(removed) => {
                        let tokens = serde_json::to_string(&removed.tokens).expect("pairs of text and numbers serialize");
                        transaction.execute(
                            "INSERT INTO removed_fleets (fleet, removed_at, commit_id, until_at, tokens)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (fleet) DO UPDATE SET removed_at = excluded.removed_at,
                                 commit_id = excluded.commit_id, until_at = excluded.until_at, tokens = excluded.tokens",
                            &[fleet, &removed.removed_at, &removed.commit, &removed.until, &tokens],
                        )?
                    }
                    None => transaction.execute("DELETE FROM removed_fleets WHERE fleet = $1", &[fleet])?,
                };
            }
            Ok(())
        })
    }

    fn tokens(&self) -> Result<Vec<IssuedToken>, StoreError> {
        let rows = self.read(
            "reading tokens",
            "SELECT id, fleet, secret_hash, issued_at, rotation, sealed FROM tokens ORDER BY issued_at, id",
            &[],
        )?;
        rows.into_iter()
            .map(|row| {
                let id: String = row.get(0);
                let secret_hash = row.get::<_, Vec<u8>>(2).try_into().map_err(|_| StoreError::Corrupt {
                    what: "token",
                    message: format!("token {id} has a malformed hash"),
                })?;
                let rotation = u32::try_from(row.get::<_, i64>(4)).map_err(|_| StoreError::Corrupt {
                    what: "token",
                    message: format!("token {id} has a rotation out of range"),
                })?;
                Ok(IssuedToken {
                    id,
                    fleet: row.get(1),
                    secret_hash,
                    issued_at: row.get(3),
                    rotation,
                    sealed: row.get(5),
                })
            })
            .collect()
    }

    fn save_tokens(&self, tokens: &[IssuedToken]) -> Result<(), StoreError> {
        self.leader_transaction("saving tokens", |transaction| {
            let insert = transaction.prepare(
                "INSERT INTO tokens (id, fleet, secret_hash, issued_at, rotation, sealed) VALUES ($1, $2, $3, $4, $5, $6)",
            )?;
            for token in tokens {
                let rotation = i64::from(token.rotation);
                transaction.execute(
                    &insert,
                    &[&token.id, &token.fleet, &&token.secret_hash[..], &token.issued_at, &rotation, &token.sealed],
                )?;
            }
            Ok(())
        })
    }

    fn save_instances(&self, instances: &[StoredInstance], events: &[StoredEvent]) -> Result<(), StoreError> {
        self.transaction("saving instances", |transaction| {
            let upsert = transaction.prepare(
                "INSERT INTO instances (uid, fleet, token_id, capabilities, served_hash, reported_hash, reported_status,
                     reported_error, failed_hash, failed_error, first_seen_ms, last_seen_ms, status, transport,
                     description, health, effective_config, assigned_hash, assigned_tag, components_hash,
                     holder, connected, changed)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                     $21, $22, nextval('instance_changes'))
                 ON CONFLICT (uid) DO UPDATE SET fleet = excluded.fleet, token_id = excluded.token_id,
                     capabilities = excluded.capabilities, served_hash = excluded.served_hash,
                     assigned_hash = excluded.assigned_hash, assigned_tag = excluded.assigned_tag,
                     reported_hash = excluded.reported_hash, reported_status = excluded.reported_status,
                     reported_error = excluded.reported_error, failed_hash = excluded.failed_hash,
                     failed_error = excluded.failed_error, last_seen_ms = excluded.last_seen_ms,
                     status = excluded.status, transport = excluded.transport,
                     description = excluded.description, health = excluded.health,
                     effective_config = COALESCE(excluded.effective_config, instances.effective_config),
                     components_hash = excluded.components_hash, holder = excluded.holder,
                     moved_from = CASE WHEN instances.holder <> excluded.holder THEN instances.holder
                         ELSE instances.moved_from END,
                     connected = excluded.connected, changed = excluded.changed",
            )?;
            for i in instances {
                let (reported_hash, reported_status, reported_error) = match &i.reported {
                    Some((hash, status, error)) => (Some(hash.as_slice()), Some(status.as_str()), Some(error.as_str())),
                    None => (None, None, None),
                };
                let (failed_hash, failed_error) = match &i.failed {
                    Some((hash, error)) => (Some(hash.as_slice()), Some(error.as_str())),
                    None => (None, None),
                };
                let capabilities = i.capabilities as i64;
                transaction.execute(
                    &upsert,
                    &[
                        &&i.uid[..],
                        &i.fleet,
                        &i.token_id,
                        &capabilities,
                        &i.served_hash,
                        &reported_hash,
                        &reported_status,
                        &reported_error,
                        &failed_hash,
                        &failed_error,
                        &i.first_seen_ms,
                        &i.last_seen_ms,
                        &i.status,
                        &i.transport,
                        &i.description,
                        &i.health,
                        &i.effective_config,
                        &i.assigned.as_ref().map(|(hash, _)| hash.as_slice()),
                        &i.assigned.as_ref().map(|(_, tag)| tag.as_str()),
                        &i.components_hash,
                        &i.holder,
                        &i.connected,
                    ],
                )?;
            }
            let insert = transaction.prepare("INSERT INTO instance_events (uid, at_ms, event) VALUES ($1, $2, $3)")?;
            for event in events {
                transaction.execute(&insert, &[&&event.uid[..], &event.at_ms, &event.event])?;
            }
            Ok(())
        })
    }

    fn load_instances(
        &self,
        events_per_instance: usize,
    ) -> Result<Vec<(StoredInstance, Vec<StoredEvent>)>, StoreError> {
        let loaded = self.read_instances("loading instances", "true", &[], events_per_instance, true)?;
        Ok(loaded.into_iter().map(|(instance, events, _)| (instance, events)).collect())
    }

    fn save_available_components(&self, lists: &[(Vec<u8>, String)]) -> Result<(), StoreError> {
        self.transaction("saving component lists", |transaction| {
            let insert = transaction.prepare(
                "INSERT INTO available_components (hash, body) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING",
            )?;
            for (hash, body) in lists {
                transaction.execute(&insert, &[hash, body])?;
            }
            Ok(())
        })
    }

    fn available_components(&self) -> Result<Vec<(Vec<u8>, String)>, StoreError> {
        let rows = self.read("loading component lists", "SELECT hash, body FROM available_components", &[])?;
        Ok(rows.into_iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    fn effective_config(&self, uid: [u8; 16]) -> Result<Option<String>, StoreError> {
        let rows = self.read(
            "reading an effective config",
            "SELECT effective_config FROM instances WHERE uid = $1",
            &[&&uid[..]],
        )?;
        Ok(rows.into_iter().next().and_then(|row| row.get(0)))
    }

    fn prune_events(&self, per_instance: usize) -> Result<usize, StoreError> {
        let keep = i64::try_from(per_instance).unwrap_or(i64::MAX);
        let pruned = self.transaction("pruning instance events", |transaction| {
            transaction.execute(
                "DELETE FROM instance_events WHERE id IN (
                     SELECT id FROM (
                         SELECT id, ROW_NUMBER() OVER (PARTITION BY uid ORDER BY id DESC) AS newest FROM instance_events
                     ) AS numbered
                     WHERE newest > $1)",
                &[&keep],
            )
        })?;
        Ok(usize::try_from(pruned).unwrap_or(usize::MAX))
    }

    fn forget_instances(&self, uids: &[[u8; 16]]) -> Result<(), StoreError> {
        let uids: Vec<&[u8]> = uids.iter().map(|uid| &uid[..]).collect();
        self.transaction("forgetting instances", |transaction| {
            transaction.execute("DELETE FROM instance_events WHERE uid = ANY($1)", &[&uids])?;
            transaction.execute("DELETE FROM instances WHERE uid = ANY($1)", &[&uids])?;
            Ok(())
        })
    }

    fn reconcile_history(&self, limit: usize) -> Result<Vec<ReconcileRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.read(
            "reading reconcile history",
            "SELECT commit_id, branch, reconciled_at, duration_us, problems FROM reconciles ORDER BY id DESC LIMIT $1",
            &[&limit],
        )?;
        rows.into_iter()
            .map(|row| {
                let problems = serde_json::from_str(row.get(4))
                    .map_err(|error| StoreError::Corrupt { what: "reconcile record", message: error.to_string() })?;
                Ok(ReconcileRecord {
                    commit: row.get(0),
                    branch: row.get(1),
                    reconciled_at: row.get(2),
                    duration_micros: row.get::<_, i64>(3).max(0) as u64,
                    problems,
                })
            })
            .collect()
    }

    fn posted_statuses(&self, forge: &str) -> Result<Vec<PostedStatus>, StoreError> {
        let rows = self.read(
            "reading posted commit statuses",
            "SELECT context, commit_id, state, description FROM commit_statuses WHERE forge = $1",
            &[&forge],
        )?;
        Ok(rows
            .into_iter()
            .map(|row| PostedStatus {
                forge: forge.to_owned(),
                context: row.get(0),
                commit: row.get(1),
                state: row.get(2),
                description: row.get(3),
            })
            .collect())
    }

    fn held_instances(
        &self,
        replica: &str,
        events_per_instance: usize,
    ) -> Result<Vec<(StoredInstance, Vec<StoredEvent>)>, StoreError> {
        let filter = "holder = $2 OR holder = ''";
        let loaded = self.read_instances("loading instances", filter, &[&replica], events_per_instance, true)?;
        Ok(loaded.into_iter().map(|(instance, events, _)| (instance, events)).collect())
    }

    fn instances_held_elsewhere(&self, replica: &str, fleet: Option<&str>) -> Result<Vec<StoredInstance>, StoreError> {
        let filter = "holder <> $2 AND holder <> '' AND ($3::TEXT IS NULL OR fleet = $3)";
        let read = self.read_instances("reading other replicas' instances", filter, &[&replica, &fleet], 0, false)?;
        Ok(read.into_iter().map(|(instance, _, _)| instance).collect())
    }

    fn instances_by_uid(
        &self,
        uids: &[[u8; 16]],
        events_per_instance: usize,
    ) -> Result<Vec<(StoredInstance, Vec<StoredEvent>)>, StoreError> {
        let uids: Vec<&[u8]> = uids.iter().map(|uid| &uid[..]).collect();
        let read = self.read_instances("reading instances", "uid = ANY($2)", &[&uids], events_per_instance, false)?;
        Ok(read.into_iter().map(|(instance, events, _)| (instance, events)).collect())
    }

    fn instances_moved_away(&self, replica: &str, after: i64) -> Result<Vec<([u8; 16], i64)>, StoreError> {
        let rows = self.read(
            "reading instances other replicas took",
            "SELECT uid, changed FROM instances WHERE moved_from = $1 AND holder <> $1 AND changed > $2",
            &[&replica, &after],
        )?;
        rows.into_iter().map(|row| Ok((uid16(row.get(0))?, row.get(1)))).collect()
    }

    fn gone_replicas(&self, replica: &str, silent_ms: i64) -> Result<Vec<String>, StoreError> {
        let rows = self.read(
            "looking for gone replicas",
            &format!(
                "SELECT held.holder FROM (SELECT DISTINCT holder FROM instances) AS held
                 LEFT JOIN replica_counts AS counts ON counts.replica = held.holder
                 WHERE held.holder <> $1 AND held.holder <> ''
                     AND (counts.written_ms IS NULL OR counts.written_ms < {DATABASE_NOW_MS} - $2)"
            ),
            &[&replica, &silent_ms],
        )?;
        Ok(rows.into_iter().map(|row| row.get(0)).collect())
    }

    fn take_over_instances(&self, from: &str, to: &str) -> Result<Vec<[u8; 16]>, StoreError> {
        let rows = self.leader_transaction("taking over a gone replica's instances", |transaction| {
            transaction.execute("DELETE FROM replica_counts WHERE replica = $1", &[&from])?;
            transaction.query(
                "UPDATE instances SET holder = $2, moved_from = $1, connected = false,
                     changed = nextval('instance_changes')
                 WHERE holder = $1 RETURNING uid",
                &[&from, &to],
            )
        })?;
        rows.into_iter().map(|row| uid16(row.get(0))).collect()
    }

    fn save_counts(&self, replica: &str, body: &str) -> Result<(), StoreError> {
        self.transaction("saving this replica's counts", |transaction| {
            transaction.execute(
                &format!(
                    "INSERT INTO replica_counts (replica, body, written_ms) VALUES ($1, $2, {DATABASE_NOW_MS})
                     ON CONFLICT (replica) DO UPDATE SET body = excluded.body, written_ms = excluded.written_ms"
                ),
                &[&replica, &body],
            )?;
            Ok(())
        })
    }

    fn replica_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = self.read(
            "reading the replicas' counts",
            &format!("SELECT replica, body, {DATABASE_NOW_MS} - written_ms FROM replica_counts"),
            &[],
        )?;
        Ok(rows.into_iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect())
    }

    fn shared(&self) -> bool {
        true
    }

    fn lead(&self, replica: &str) -> Result<bool, StoreError> {
        let mut leading = self.leading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Lost (the database restarted), the lock went with the connection: take it again.
        if leading.as_ref().is_some_and(|(client, _)| client.is_closed()) {
            *leading = None;
        }
        if let Some((client, true)) = leading.as_mut() {
            // Still leading while the connection that holds the lock is alive.
            if client.simple_query("SELECT 1").is_ok() {
                return Ok(true);
            }
            *leading = None;
        }
        // One connection per candidate, kept between tries.
        let (client, holding) = match leading.as_mut() {
            Some(slot) => slot,
            None => leading.insert((self.connect()?, false)),
        };
        let taken: bool = match client.query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK]) {
            Ok(row) => row.get(0),
            Err(error) => {
                *leading = None;
                return Err(query("taking the leader lock")(error));
            }
        };
        if !taken {
            return Ok(false);
        }
        let term: i64 = client
            .query_one(
                "UPDATE leader SET term = term + 1, replica = $1, since = $2 WHERE id = 1 RETURNING term",
                &[&replica, &crate::time::now_unix()],
            )
            .map_err(query("taking the leader's term"))?
            .get(0);
        *self.term.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(term);
        *holding = true;
        Ok(true)
    }

    fn leader(&self) -> Result<Option<(String, i64)>, StoreError> {
        let rows =
            self.read("reading the leader", "SELECT replica, since FROM leader WHERE id = 1 AND term > 0", &[])?;
        Ok(rows.first().map(|row| (row.get(0), row.get(1))))
    }

    fn publish_state(&self, body: &str) -> Result<(), StoreError> {
        let term = self.term.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).unwrap_or(0);
        self.leader_transaction("publishing the desired state", |transaction| {
            transaction.execute(
                "INSERT INTO published_state (id, term, body, published_at) VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET term = excluded.term, body = excluded.body,
                 published_at = excluded.published_at",
                &[&term, &body, &crate::time::now_unix()],
            )?;
            transaction.execute("SELECT pg_notify($1, 'state')", &[&CHANNEL])?;
            Ok(())
        })
    }

    fn published_state(&self) -> Result<Option<String>, StoreError> {
        let rows = self.read("reading the published state", "SELECT body FROM published_state WHERE id = 1", &[])?;
        Ok(rows.first().map(|row| row.get(0)))
    }

    fn wait_for_change(&self, timeout: std::time::Duration) -> Result<Vec<String>, StoreError> {
        let mut listening = self.listening.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if listening.as_ref().is_none_or(Client::is_closed) {
            *listening = None;
            let mut client = self.connect()?;
            client.batch_execute(&format!("LISTEN {CHANNEL}")).map_err(query("listening for changes"))?;
            *listening = Some(client);
            // Anything may have changed while nobody listened.
            return Ok(vec!["state".to_owned()]);
        }
        let heard = {
            let mut notifications = listening.as_mut().expect("listening").notifications();
            let first = notifications.timeout_iter(timeout).next();
            first.map(|first| {
                let mut heard: Vec<String> = first.into_iter().map(|n| n.payload().to_owned()).collect();
                // Whatever else arrived meanwhile, at once.
                while let Ok(Some(more)) = notifications.iter().next() {
                    heard.push(more.payload().to_owned());
                }
                heard
            })
        };
        if heard.is_err() {
            *listening = None;
        }
        heard.map_err(query("listening for changes"))
    }

    fn request_fetch(&self) -> Result<(), StoreError> {
        self.transaction("asking the leader to fetch", |transaction| {
            transaction.execute("SELECT pg_notify($1, 'fetch')", &[&CHANNEL])?;
            Ok(())
        })
    }

    fn save_posted_status(&self, status: &PostedStatus) -> Result<(), StoreError> {
        let now = crate::time::now_unix();
        self.leader_transaction("remembering a posted commit status", |transaction| {
            transaction.execute(
                "INSERT INTO commit_statuses (forge, context, commit_id, state, description, posted_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (forge, context) DO UPDATE SET commit_id = excluded.commit_id, state = excluded.state,
                     description = excluded.description, posted_at = excluded.posted_at",
                &[&status.forge, &status.context, &status.commit, &status.state, &status.description, &now],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redact("postgres://gitfleet:s3cret@db:5432/fleet"), "postgres://gitfleet@db:5432/fleet");
        assert_eq!(redact("postgres://gitfleet@db/fleet"), "postgres://gitfleet@db/fleet");
        assert_eq!(redact("host=db password=s3cret user=gitfleet"), "host=db user=gitfleet");
    }
}
