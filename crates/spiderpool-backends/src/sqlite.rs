//! The SQLite backend: one file shared by every agent and CLI on a host. WAL journal with
//! `synchronous=FULL`, so a commit is on disk before the answer goes out; writers take the
//! database lock up front (`BEGIN IMMEDIATE`) and check every revision inside it, which makes
//! each transaction a compare-and-swap across processes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use spiderpool_store::{
    check, Allocation, Expect, Holder, Kind, Op, Result, Revision, Store, StoreError, Stored,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (k, v) VALUES ('revision', 0), ('schema', 1);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, revision INTEGER NOT NULL,
    PRIMARY KEY (kind, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS allocations (
    pool TEXT NOT NULL, ip TEXT NOT NULL, holder TEXT NOT NULL, revision INTEGER NOT NULL,
    PRIMARY KEY (pool, ip)) WITHOUT ROWID;
";

/// A store in one SQLite file.
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(format!("{}: {e}", path.display()))
        }
        _ => StoreError::Unavailable(format!("{}: {e}", path.display())),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub async fn open(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            // Whoever can write the file can hand out any address: directories the store
            // creates are 0750 and a new database file 0600 at most, whatever the umask (which
            // can only take permissions away); SQLite gives its -wal and -shm files the
            // database file's mode.
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o750)
                    .create(dir)
                    .map_err(|e| {
                        StoreError::Config(format!("datastore directory {}: {e}", dir.display()))
                    })?;
            }
            {
                use std::os::unix::fs::OpenOptionsExt;
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(StoreError::Config(format!(
                            "datastore {}: {e}",
                            p.display()
                        )))
                    }
                }
            }
            let conn = Connection::open(&p)
                .map_err(|e| StoreError::Config(format!("datastore {}: {e}", p.display())))?;
            conn.busy_timeout(Duration::from_secs(10))
                .map_err(sql_err(&p))?;
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(sql_err(&p))?;
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(sql_err(&p))?;
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} COMMIT;"))
                .map_err(|e| StoreError::Config(format!("datastore {}: {e}", p.display())))?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| StoreError::Unavailable("connection lock poisoned".into()))?;
            f(&mut c, &path)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

/// Runs a statement through the connection's statement cache.
fn exec(c: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

/// Reads one row through the connection's statement cache.
fn one<T>(
    c: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(p, f)
}

fn parse_value(kind: &str, key: &str, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        key: format!("{kind}/{key}"),
        message: e.to_string(),
    })
}

fn row_revision(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    key: &str,
) -> rusqlite::Result<Option<Revision>> {
    one(
        tx,
        "SELECT revision FROM objects WHERE kind = ?1 AND key = ?2",
        params![kind.resource(), key],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|o| o.map(|r| r as Revision))
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        let key = key.to_string();
        self.run(move |c, p| {
            let row = one(
                c,
                "SELECT value, revision FROM objects WHERE kind = ?1 AND key = ?2",
                params![kind.resource(), key],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()
            .map_err(sql_err(p))?;
            row.map(|(v, rev)| {
                Ok(Stored {
                    value: parse_value(kind.resource(), &key, &v)?,
                    key: key.clone(),
                    revision: rev as Revision,
                })
            })
            .transpose()
        })
        .await
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Stored>> {
        self.run(move |c, p| {
            let mut st = c
                .prepare_cached(
                    "SELECT key, value, revision FROM objects WHERE kind = ?1 ORDER BY key",
                )
                .map_err(sql_err(p))?;
            let rows = st
                .query_map(params![kind.resource()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(sql_err(p))?;
            let mut out = Vec::new();
            for row in rows {
                let (key, v, rev) = row.map_err(sql_err(p))?;
                match parse_value(kind.resource(), &key, &v) {
                    Ok(value) => out.push(Stored {
                        key,
                        value,
                        revision: rev as Revision,
                    }),
                    Err(e) => tracing::error!(error = %e, "skipping unreadable object"),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn allocations(&self, pool: &str) -> Result<Vec<Allocation>> {
        let pool = pool.to_string();
        self.run(move |c, p| {
            let mut st = c
                .prepare_cached("SELECT ip, holder, revision FROM allocations WHERE pool = ?1")
                .map_err(sql_err(p))?;
            let rows = st
                .query_map(params![pool], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
                })
                .map_err(sql_err(p))?;
            let mut out = Vec::new();
            for row in rows {
                let (ip, holder, rev) = row.map_err(sql_err(p))?;
                let parsed = ip
                    .parse::<IpAddr>()
                    .map_err(|e| e.to_string())
                    .and_then(|ip| serde_json::from_str::<Holder>(&holder).map(|h| (ip, h)).map_err(|e| e.to_string()));
                match parsed {
                    Ok((ip, holder)) => out.push(Allocation {
                        pool: pool.clone(),
                        ip,
                        holder,
                        revision: rev as Revision,
                    }),
                    Err(message) => tracing::error!(
                        error = %StoreError::Corrupt { key: format!("allocations/{pool}/{ip}"), message },
                        "skipping unreadable allocation"
                    ),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn held_ips(&self, pool: &str) -> Result<Vec<IpAddr>> {
        let pool = pool.to_string();
        self.run(move |c, p| {
            let mut st = c
                .prepare_cached("SELECT ip FROM allocations WHERE pool = ?1")
                .map_err(sql_err(p))?;
            let rows = st
                .query_map(params![pool], |r| r.get::<_, String>(0))
                .map_err(sql_err(p))?;
            let mut out = Vec::new();
            for row in rows {
                let ip = row.map_err(sql_err(p))?;
                match ip.parse() {
                    Ok(a) => out.push(a),
                    Err(e) => tracing::error!(
                        error = %StoreError::Corrupt { key: format!("allocations/{pool}/{ip}"), message: format!("{e}") },
                        "skipping unreadable allocation"
                    ),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn allocation_counts(&self) -> Result<BTreeMap<String, u64>> {
        self.run(move |c, p| {
            let mut st = c
                .prepare_cached("SELECT pool, COUNT(*) FROM allocations GROUP BY pool")
                .map_err(sql_err(p))?;
            let rows = st
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(sql_err(p))?;
            rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()
                .map_err(sql_err(p))
        })
        .await
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Revision> {
        self.run(move |c, p| {
            let e = sql_err(p);
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&e)?;
            let rev: i64 = one(&tx, "SELECT v FROM meta WHERE k = 'revision'", [], |r| r.get(0))
                .map_err(&e)?;
            let rev = rev + 1;
            for op in &ops {
                match op {
                    Op::Put { kind, key, value, expect } => {
                        check(*expect, row_revision(&tx, *kind, key).map_err(&e)?, &format!("{kind}/{key}"))?;
                        exec(&tx,
                            "INSERT INTO objects (kind, key, value, revision) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, revision = excluded.revision",
                            params![kind.resource(), key, value.to_string(), rev],
                        )
                        .map_err(&e)?;
                    }
                    Op::Delete { kind, key, expect } => {
                        check(*expect, row_revision(&tx, *kind, key).map_err(&e)?, &format!("{kind}/{key}"))?;
                        exec(&tx,
                            "DELETE FROM objects WHERE kind = ?1 AND key = ?2",
                            params![kind.resource(), key],
                        )
                        .map_err(&e)?;
                    }
                    Op::Claim {
                        pool,
                        ip,
                        holder,
                        pool_revision,
                    } => {
                        check(
                            Expect::Revision(*pool_revision),
                            row_revision(&tx, Kind::IPPool, pool).map_err(&e)?,
                            &format!("spiderippools/{pool}"),
                        )?;
                        let holder = serde_json::to_string(holder).expect("holder serialises");
                        let n = exec(
                            &tx,
                            "INSERT INTO allocations (pool, ip, holder, revision) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (pool, ip) DO NOTHING",
                            params![pool, ip.to_string(), holder, rev],
                        )
                        .map_err(&e)?;
                        if n == 0 {
                            return Err(StoreError::taken_conflict(pool, *ip));
                        }
                    }
                    Op::NoClaimsSince { pool, since } => {
                        let newer: bool = one(
                            &tx,
                            "SELECT EXISTS (SELECT 1 FROM allocations WHERE pool = ?1 AND revision > ?2)",
                            params![pool, *since as i64],
                            |r| r.get(0),
                        )
                        .map_err(&e)?;
                        if newer {
                            return Err(StoreError::claimed_since(pool, *since));
                        }
                    }
                    Op::Release {
                        pool,
                        ip,
                        container_id,
                        nic,
                        pod_uid,
                    } => {
                        // Holder::released_by, in SQL.
                        exec(&tx,
                            "DELETE FROM allocations WHERE pool = ?1 AND ip = ?2 AND (
                               (?3 <> '' AND json_extract(holder, '$.containerID') = ?3
                                AND json_extract(holder, '$.nic') = ?4)
                               OR (?3 = '' AND ?5 <> '' AND json_extract(holder, '$.podUid') = ?5
                                AND json_extract(holder, '$.nic') IN ('', ?4)))",
                            params![pool, ip.to_string(), container_id, nic, pod_uid],
                        )
                        .map_err(&e)?;
                    }
                }
            }
            exec(&tx, "UPDATE meta SET v = ?1 WHERE k = 'revision'", params![rev])
                .map_err(&e)?;
            tx.commit().map_err(&e)?;
            Ok(rev as Revision)
        })
        .await
    }

    async fn revision(&self) -> Result<Option<Revision>> {
        self.run(|c, p| {
            one(c, "SELECT v FROM meta WHERE k = 'revision'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(sql_err(p))
            .map(|r| Some(r as Revision))
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.revision().await.map(|_| ())
    }
}
