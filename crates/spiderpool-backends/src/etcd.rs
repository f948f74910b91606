//! The etcd v3 backend: one key per object and one key per held address under a prefix, so a
//! /16 pool with 60,000 holders is 60,000 small keys, not one huge value. Every transaction is
//! one etcd `Txn` whose guards compare `mod_revision`s (the object was not changed since it was
//! read) and `create_revision == 0` (the address is not held); etcd's own revision is the
//! datastore revision.
//!
//! Layout under the prefix `P`:
//! - `P/objects/<resource>/<key>` → the object's JSON
//! - `P/allocations/<pool>/<ip>` → the holder's JSON

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use std::sync::atomic::{AtomicUsize, Ordering};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, GetResponse, KeyValue, Txn,
    TxnOp, WatchOptions,
};

use spiderpool_store::{
    check, skip_unreadable, Allocation, Change, Changes, Expect, Holder, Kind, Op, Result,
    Revision, Store, StoreError, Stored,
};

/// etcd's default limit on the operations of one transaction (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// How many keys one range request reads at a time: with their values (an object or holder,
/// up to a few KiB), and keys only (tens of bytes; a /16's holders in a few requests). Both
/// stay well below the 4 MiB a gRPC response may hold.
const PAGE: i64 = 1000;
const KEYS_PAGE: i64 = 10_000;

/// A store in an etcd cluster.
pub struct EtcdStore {
    // One client per member: a request that cannot reach one member goes to the next, so a
    // dead member does not stop allocation while the cluster keeps a quorum.
    clients: Vec<Client>,
    current: AtomicUsize,
    prefix: String,
    endpoints: String,
}

/// Whether an error means the member could not be reached (another one may answer).
fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

fn key_end(prefix: &[u8]) -> Vec<u8> {
    // The smallest key greater than every key starting with `prefix`.
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// Connects to `endpoints` (`host:port`) and checks that the cluster answers.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        let joined = endpoints.join(",");
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        // HTTP/2 pings, also while idle: a member that vanished without closing the connection
        // ends the watch within seconds instead of leaving it silent.
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let mut clients = Vec::new();
        for url in &urls {
            let c = Client::connect([url], Some(options.clone()))
                .await
                .map_err(|e| {
                    StoreError::Unavailable(format!("etcd {joined}: cannot connect to {url}: {e}"))
                })?;
            clients.push(c);
        }
        let store = EtcdStore {
            clients,
            current: AtomicUsize::new(0),
            prefix: prefix.trim_end_matches('/').to_string(),
            endpoints: joined,
        };
        store.revision().await.map_err(|e| {
            StoreError::Unavailable(format!("etcd {}: does not answer: {e}", store.endpoints))
        })?;
        Ok(store)
    }

    fn err(&self, e: etcd_client::Error) -> StoreError {
        StoreError::Unavailable(format!("etcd {}: {e}", self.endpoints))
    }

    /// Runs `f` on the member that answered last, failing over to the others when one cannot
    /// be reached.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            match f(self.clients[i].clone()).await {
                Ok(v) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if unreachable(&e) => last = Some(e),
                Err(e) => return Err(self.err(e)),
            }
        }
        Err(self.err(last.expect("at least one endpoint")))
    }

    async fn kv_get(&self, key: Vec<u8>, opts: Option<GetOptions>) -> Result<GetResponse> {
        self.call(|mut c| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { c.get(key, opts).await }
        })
        .await
    }

    async fn kv_txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse> {
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    fn object_key(&self, kind: Kind, key: &str) -> String {
        format!("{}/objects/{}/{key}", self.prefix, kind.resource())
    }

    fn kind_prefix(&self, kind: Kind) -> String {
        format!("{}/objects/{}/", self.prefix, kind.resource())
    }

    fn pool_prefix(&self, pool: &str) -> String {
        format!("{}/allocations/{pool}/", self.prefix)
    }

    fn alloc_key(&self, pool: &str, ip: &IpAddr) -> String {
        format!("{}{ip}", self.pool_prefix(pool))
    }

    /// Adds the guard of a write to object `key` of `kind` and returns its etcd key.
    fn guard_object(
        &self,
        guards: &mut Vec<Guard>,
        kind: Kind,
        key: &str,
        expect: Expect,
    ) -> String {
        let k = self.object_key(kind, key);
        guards.push(Guard {
            key: k.clone(),
            expect,
            what: format!("{kind}/{key}"),
            address: None,
        });
        k
    }

    /// Every key-value under `prefix`, in key order, read in pages.
    async fn range(&self, prefix: &str, keys_only: bool) -> Result<Vec<KeyValue>> {
        let end = key_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone());
            opts = if keys_only {
                opts.with_keys_only().with_limit(KEYS_PAGE)
            } else {
                opts.with_limit(PAGE)
            };
            let resp = self.kv_get(from.clone(), Some(opts)).await?;
            let kvs = resp.kvs();
            out.extend_from_slice(kvs);
            match kvs.last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    fn parse_object(&self, kind: Kind, kv: &KeyValue) -> Result<Stored> {
        let full = String::from_utf8_lossy(kv.key()).into_owned();
        let key = full
            .strip_prefix(&self.kind_prefix(kind))
            .unwrap_or(&full)
            .to_string();
        let value = serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
            key: full.clone(),
            message: e.to_string(),
        })?;
        Ok(Stored {
            key,
            value,
            revision: kv.mod_revision() as Revision,
        })
    }

    fn parse_allocation(&self, pool: &str, kv: &KeyValue) -> Result<Allocation> {
        let full = String::from_utf8_lossy(kv.key()).into_owned();
        let corrupt = |message: String| StoreError::Corrupt {
            key: full.clone(),
            message,
        };
        let ip = full
            .strip_prefix(&self.pool_prefix(pool))
            .unwrap_or(&full)
            .parse::<IpAddr>()
            .map_err(|e| corrupt(format!("not an address: {e}")))?;
        let holder: Holder =
            serde_json::from_slice(kv.value()).map_err(|e| corrupt(e.to_string()))?;
        Ok(Allocation {
            pool: pool.to_string(),
            ip,
            holder,
            revision: kv.mod_revision() as Revision,
        })
    }
}

/// Turns the events of one watch response into changes: addresses under
/// `<prefix>/allocations/`, objects of `kinds` under `<prefix>/objects/`.
fn changes_of(prefix: &str, kinds: &[Kind], events: &[etcd_client::Event]) -> Vec<Change> {
    let allocations = format!("{prefix}/allocations/");
    let objects = format!("{prefix}/objects/");
    let mut out = Vec::with_capacity(events.len());
    for ev in events {
        let Some(kv) = ev.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        let revision = kv.mod_revision() as Revision;
        if let Some(rest) = key.strip_prefix(&allocations) {
            match rest
                .split_once('/')
                .map(|(p, ip)| (p, ip.parse::<IpAddr>()))
            {
                Some((pool, Ok(ip))) => out.push(Change::Allocation {
                    pool: pool.to_string(),
                    ip,
                    held: ev.event_type() == EventType::Put,
                    revision,
                }),
                _ => tracing::error!(key = %key, "watch: skipping a key that names no address"),
            }
        } else if let Some(rest) = key.strip_prefix(&objects) {
            let kind = kinds.iter().find_map(|k| {
                let key = rest.strip_prefix(k.resource())?.strip_prefix('/')?;
                Some((*k, key))
            });
            match kind {
                Some((Kind::Endpoint, key)) => {
                    let value: Option<serde_json::Value> = (ev.event_type() == EventType::Put)
                        .then(|| serde_json::from_slice(kv.value()).ok())
                        .flatten();
                    out.push(Change::Recorded {
                        key: key.to_string(),
                        ips: value.as_ref().map(crate::recorded_of).unwrap_or_default(),
                        revision,
                        value,
                    })
                }
                Some((kind, key)) => out.push(Change::Object {
                    kind,
                    key: key.to_string(),
                    revision,
                }),
                None => {}
            }
        }
    }
    out
}

/// One condition of a transaction: the etcd key, what it must be, and how to name it.
struct Guard {
    key: String,
    expect: Expect,
    what: String,
    /// For an address's key: its pool and the address.
    address: Option<(String, IpAddr)>,
}

impl Guard {
    fn compare(&self) -> Option<Compare> {
        match self.expect {
            Expect::Any => None,
            Expect::Absent => Some(Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )),
            Expect::Revision(r) => Some(Compare::mod_revision(
                self.key.clone(),
                CompareOp::Equal,
                r as i64,
            )),
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        let resp = self
            .kv_get(self.object_key(kind, key).into_bytes(), None)
            .await?;
        resp.kvs()
            .first()
            .map(|kv| self.parse_object(kind, kv))
            .transpose()
    }

    async fn get_many(&self, keys: &[(Kind, String)]) -> Result<Vec<Option<Stored>>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let reads: Vec<TxnOp> = chunk
                .iter()
                .map(|(kind, key)| TxnOp::get(self.object_key(*kind, key), None))
                .collect();
            let resp = self.kv_txn(Txn::new().and_then(reads)).await?;
            for ((kind, _), r) in chunk.iter().zip(resp.op_responses()) {
                let etcd_client::TxnOpResponse::Get(get) = r else {
                    out.push(None);
                    continue;
                };
                out.push(
                    get.kvs()
                        .first()
                        .map(|kv| self.parse_object(*kind, kv))
                        .transpose()?,
                );
            }
        }
        Ok(out)
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Stored>> {
        let kvs = self.range(&self.kind_prefix(kind), false).await?;
        Ok(skip_unreadable(
            kvs.iter().map(|kv| self.parse_object(kind, kv)),
            "object",
        ))
    }

    async fn allocations(&self, pool: &str) -> Result<Vec<Allocation>> {
        let kvs = self.range(&self.pool_prefix(pool), false).await?;
        Ok(skip_unreadable(
            kvs.iter().map(|kv| self.parse_allocation(pool, kv)),
            "allocation",
        ))
    }

    async fn held_ips(&self, pool: &str) -> Result<Vec<IpAddr>> {
        let prefix = self.pool_prefix(pool);
        let mut out = Vec::new();
        for kv in self.range(&prefix, true).await? {
            let full = String::from_utf8_lossy(kv.key()).into_owned();
            match full.strip_prefix(&prefix).unwrap_or(&full).parse() {
                Ok(ip) => out.push(ip),
                Err(e) => tracing::error!(
                    error = %StoreError::Corrupt { key: full.clone(), message: format!("not an address: {e}") },
                    "skipping unreadable allocation"
                ),
            }
        }
        Ok(out)
    }

    async fn allocation_counts(&self) -> Result<BTreeMap<String, u64>> {
        let prefix = format!("{}/allocations/", self.prefix);
        let mut out = BTreeMap::new();
        for kv in self.range(&prefix, true).await? {
            let full = String::from_utf8_lossy(kv.key()).into_owned();
            if let Some((pool, _)) = full.strip_prefix(&prefix).and_then(|r| r.split_once('/')) {
                *out.entry(pool.to_string()).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Revision> {
        // Releases are conditional per address: read the holders first, keep the releases whose
        // holder matches, and guard each by the holder's revision. An address released and
        // claimed again in one transaction becomes one guarded overwrite (etcd allows one write
        // per key per transaction).
        let mut released: HashMap<String, i64> = HashMap::new();
        for op in &ops {
            if let Op::Release {
                pool,
                ip,
                container_id,
                nic,
                pod_uid,
            } = op
            {
                let key = self.alloc_key(pool, ip);
                let resp = self.kv_get(key.clone().into_bytes(), None).await?;
                if let Some(kv) = resp.kvs().first() {
                    let holder: Option<Holder> = serde_json::from_slice(kv.value()).ok();
                    if holder.is_some_and(|h| h.released_by(container_id, nic, pod_uid)) {
                        released.insert(key, kv.mod_revision());
                    }
                }
            }
        }
        let mut guards: Vec<Guard> = Vec::new();
        let mut writes = Vec::new();
        let mut claimed = std::collections::HashSet::new();
        // Pools none of whose addresses may have been claimed after a revision: every key under
        // the pool's allocations must be older (an empty range passes).
        let mut quiet: Vec<(String, Revision)> = Vec::new();
        for op in ops {
            match op {
                Op::Put {
                    kind,
                    key,
                    value,
                    expect,
                } => {
                    let k = self.guard_object(&mut guards, kind, &key, expect);
                    writes.push(TxnOp::put(k, value.to_string(), None));
                }
                Op::Delete { kind, key, expect } => {
                    let k = self.guard_object(&mut guards, kind, &key, expect);
                    writes.push(TxnOp::delete(k, None));
                }
                Op::Claim {
                    pool,
                    ip,
                    holder,
                    pool_revision,
                } => {
                    let k = self.alloc_key(&pool, &ip);
                    if !claimed.insert(k.clone()) {
                        return Err(StoreError::taken_conflict(&pool, ip));
                    }
                    let pool_key = self.object_key(Kind::IPPool, &pool);
                    if !guards.iter().any(|g| g.key == pool_key) {
                        guards.push(Guard {
                            key: pool_key,
                            expect: Expect::Revision(pool_revision),
                            what: format!("spiderippools/{pool}"),
                            address: None,
                        });
                    }
                    guards.push(Guard {
                        key: k.clone(),
                        expect: match released.remove(&k) {
                            Some(rev) => Expect::Revision(rev as Revision),
                            None => Expect::Absent,
                        },
                        what: format!("{ip} of pool {pool}"),
                        address: Some((pool.clone(), ip)),
                    });
                    let holder = serde_json::to_string(&holder).expect("holder serialises");
                    writes.push(TxnOp::put(k, holder, None));
                }
                Op::NoClaimsSince { pool, since } => quiet.push((pool, since)),
                Op::Release { .. } => {}
            }
        }
        for (k, rev) in released {
            writes.push(TxnOp::txn(
                Txn::new()
                    .when(vec![Compare::mod_revision(
                        k.clone(),
                        CompareOp::Equal,
                        rev,
                    )])
                    .and_then(vec![TxnOp::delete(k, None)]),
            ));
        }
        let mut compares: Vec<Compare> = guards.iter().filter_map(Guard::compare).collect();
        compares.extend(quiet.iter().map(|(pool, since)| {
            Compare::mod_revision(self.pool_prefix(pool), CompareOp::Less, *since as i64 + 1)
                .with_prefix()
        }));
        // On failure, read every guarded key back to say which condition failed, and count
        // the newer claims of each quiet pool.
        let mut reads: Vec<TxnOp> = guards
            .iter()
            .map(|g| TxnOp::get(g.key.clone(), None))
            .collect();
        reads.extend(quiet.iter().map(|(pool, since)| {
            TxnOp::get(
                self.pool_prefix(pool),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_count_only()
                        .with_min_mod_revision(*since as i64 + 1),
                ),
            )
        }));
        let resp = self
            .kv_txn(Txn::new().when(compares).and_then(writes).or_else(reads))
            .await?;
        if !resp.succeeded() {
            for (g, r) in guards.iter().zip(resp.op_responses()) {
                let etcd_client::TxnOpResponse::Get(get) = r else {
                    continue;
                };
                let current = get.kvs().first().map(|kv| kv.mod_revision() as Revision);
                if let (Some((pool, ip)), Some(_), Expect::Absent) = (&g.address, current, g.expect)
                {
                    return Err(StoreError::taken_conflict(pool, *ip));
                }
                check(g.expect, current, &g.what)?;
            }
            let counts = resp.op_responses().into_iter().skip(guards.len());
            for ((pool, since), r) in quiet.iter().zip(counts) {
                if matches!(r, etcd_client::TxnOpResponse::Get(get) if get.count() > 0) {
                    return Err(StoreError::claimed_since(pool, *since));
                }
            }
            return Err(StoreError::changed(
                "a guarded key changed during the transaction",
            ));
        }
        Ok(resp.header().map_or(0, |h| h.revision()) as Revision)
    }

    fn max_ops(&self) -> usize {
        // etcd's default --max-txn-ops, with room for the guards on pools.
        MAX_TXN_OPS - 16
    }

    async fn revision(&self) -> Result<Option<Revision>> {
        let resp = self
            .kv_get(
                self.prefix.clone().into_bytes(),
                Some(GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(resp.header().map(|h| h.revision() as Revision))
    }

    async fn ping(&self) -> Result<()> {
        self.revision().await.map(|_| ())
    }

    async fn watch(&self, after: Revision, kinds: &[Kind]) -> Result<Option<Changes>> {
        // One watch stream carrying a watch per object kind and, when the pools are watched,
        // one on the allocations, all from the same revision, so together they miss nothing
        // after `after`.
        let from = || {
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(after as i64 + 1)
        };
        let mut prefixes: Vec<String> = kinds.iter().map(|k| self.kind_prefix(*k)).collect();
        if kinds.contains(&Kind::IPPool) || kinds.is_empty() {
            prefixes.insert(0, format!("{}/allocations/", self.prefix));
        }
        let first = prefixes.remove(0);
        let mut stream = self
            .call(|mut c| {
                let (key, opts) = (first.clone(), from());
                async move { c.watch(key, Some(opts)).await }
            })
            .await?;
        for prefix in prefixes {
            stream
                .watch(prefix, Some(from()))
                .await
                .map_err(|e| self.err(e))?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (prefix, kinds, endpoints) =
            (self.prefix.clone(), kinds.to_vec(), self.endpoints.clone());
        tokio::spawn(async move {
            let ended = |why: String| {
                Err(StoreError::Unavailable(format!(
                    "etcd {endpoints}: watch ended: {why}"
                )))
            };
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    () = tx.closed() => return,
                };
                let batch = match msg {
                    Ok(Some(resp)) if resp.canceled() => ended(format!(
                        "canceled ({}; compacted at {})",
                        resp.cancel_reason(),
                        resp.compact_revision()
                    )),
                    Ok(Some(resp)) => Ok(changes_of(&prefix, &kinds, resp.events())),
                    Ok(None) => ended("the stream closed".into()),
                    Err(e) => ended(e.to_string()),
                };
                let last = batch.is_err();
                if matches!(&batch, Ok(c) if c.is_empty()) {
                    continue;
                }
                if tx.send(batch).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Some(rx))
    }
}
