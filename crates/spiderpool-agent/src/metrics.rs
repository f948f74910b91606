//! The agent's Prometheus metrics, under upstream Spiderpool's documented snake_case names
//! (`spiderpool_ipam_allocation_*`, `spiderpool_ipam_release_*`; counters carry `_total` in the
//! exposition, as upstream's exporter writes them), plus what this agent adds: the size of its
//! group commits and the time of its datastore commits. Served on `--metrics-addr`.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as Labelled;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Which failure counter a failed request counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Every candidate pool is exhausted (`err_ip_used_out_counts`).
    IpUsedOut,
    /// No pool fits the request (`err_no_available_pool_counts`).
    NoAvailablePool,
    /// Conflicts outlasted the retries (`err_retries_exhausted_counts`).
    RetriesExhausted,
    /// Anything else (`err_internal_counts`).
    Internal,
}

/// An error that says which failure counter it belongs to.
pub trait Outcome {
    /// The counter.
    fn failure(&self) -> Failure;
}

/// Upstream's buckets for request durations, in seconds.
const DURATION_BUCKETS: [f64; 9] = [0.1, 0.3, 0.5, 1.0, 3.0, 5.0, 7.0, 10.0, 15.0];

/// One verb's family: `spiderpool_ipam_allocation_*` or `spiderpool_ipam_release_*`.
pub struct Family {
    counts: Counter,
    failure_counts: Counter,
    conflict_counts: Counter,
    err_internal_counts: Counter,
    err_retries_exhausted_counts: Counter,
    /// Allocation only.
    err_no_available_pool_counts: Counter,
    /// Allocation only.
    err_ip_used_out_counts: Counter,
    duration: Histogram,
    latest: Gauge<f64, AtomicU64>,
    max: Gauge<f64, AtomicU64>,
    min: Gauge<f64, AtomicU64>,
    average: Gauge<f64, AtomicU64>,
    /// (sum of seconds, count) behind the average.
    totals: Mutex<(f64, u64)>,
}

impl Family {
    fn new() -> Family {
        Family {
            counts: Counter::default(),
            failure_counts: Counter::default(),
            conflict_counts: Counter::default(),
            err_internal_counts: Counter::default(),
            err_retries_exhausted_counts: Counter::default(),
            err_no_available_pool_counts: Counter::default(),
            err_ip_used_out_counts: Counter::default(),
            duration: Histogram::new(DURATION_BUCKETS),
            latest: Gauge::default(),
            max: Gauge::default(),
            min: Gauge::default(),
            average: Gauge::default(),
            totals: Mutex::new((0.0, 0)),
        }
    }

    fn register(&self, r: &mut Registry, prefix: &str, allocation: bool) {
        let name = |s: &str| format!("{prefix}_{s}");
        r.register(name("counts"), "Requests", self.counts.clone());
        r.register(
            name("failure_counts"),
            "Requests that failed",
            self.failure_counts.clone(),
        );
        r.register(
            name("update_ippool_conflict_counts"),
            "Datastore commits lost to another writer and retried",
            self.conflict_counts.clone(),
        );
        r.register(
            name("err_internal_counts"),
            "Failures of the datastore or of the request",
            self.err_internal_counts.clone(),
        );
        r.register(
            name("err_retries_exhausted_counts"),
            "Requests that kept conflicting until the retries ran out",
            self.err_retries_exhausted_counts.clone(),
        );
        if allocation {
            r.register(
                name("err_no_available_pool_counts"),
                "Allocations for which no pool fits the pod",
                self.err_no_available_pool_counts.clone(),
            );
            r.register(
                name("err_ip_used_out_counts"),
                "Allocations whose candidate pools were all exhausted",
                self.err_ip_used_out_counts.clone(),
            );
        }
        r.register(
            name("duration_seconds"),
            "Time to serve a request",
            self.duration.clone(),
        );
        for (g, what) in [
            (&self.latest, "latest"),
            (&self.max, "max"),
            (&self.min, "min"),
            (&self.average, "average"),
        ] {
            r.register(
                name(&format!("{what}_duration_seconds")),
                format!("The {what} time to serve a request"),
                g.clone(),
            );
        }
    }

    /// Records one request that took `took` and ended in `outcome`.
    fn observe(&self, took: Duration, outcome: Result<(), Failure>) {
        let secs = took.as_secs_f64();
        self.counts.inc();
        self.duration.observe(secs);
        self.latest.set(secs);
        let (sum, n) = {
            let mut t = self.totals.lock().expect("totals");
            t.0 += secs;
            t.1 += 1;
            *t
        };
        self.average.set(sum / n as f64);
        if n == 1 || secs > self.max.get() {
            self.max.set(secs);
        }
        if n == 1 || secs < self.min.get() {
            self.min.set(secs);
        }
        let Err(e) = outcome else { return };
        self.failure_counts.inc();
        match e {
            Failure::IpUsedOut => self.err_ip_used_out_counts.inc(),
            Failure::NoAvailablePool => self.err_no_available_pool_counts.inc(),
            Failure::RetriesExhausted => self.err_retries_exhausted_counts.inc(),
            Failure::Internal => self.err_internal_counts.inc(),
        };
    }

    /// Runs `work` and records how long it took and how it ended.
    pub async fn observed<T, E: Outcome>(
        &self,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = std::time::Instant::now();
        let r = work.await;
        self.observe(
            started.elapsed(),
            r.as_ref().map(|_| ()).map_err(E::failure),
        );
        r
    }

    /// Records a commit lost to another writer.
    pub fn conflict(&self) {
        self.conflict_counts.inc();
    }
}

/// Every metric of one agent.
pub struct Metrics {
    /// `spiderpool_ipam_allocation_*`.
    pub allocation: Family,
    /// `spiderpool_ipam_release_*`.
    pub release: Family,
    /// ADDs per group commit.
    pub batch_size: Histogram,
    /// DELs per group commit.
    pub del_batch_size: Histogram,
    /// How long a DEL waits for others to join its group commit, in seconds.
    pub release_gather_seconds: Gauge<f64, AtomicU64>,
    /// Time of a datastore commit, in seconds.
    pub commit_seconds: Histogram,
    /// The datastore's own counts of its writes, as of the last scrape.
    store_writes: [Counter; 3],
    store_seen: Mutex<spiderpool_store::WriteCounts>,
    pools: Gauge,
    pool_total: Labelled<Vec<(String, String)>, Gauge>,
    pool_free: Labelled<Vec<(String, String)>, Gauge>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let allocation = Family::new();
        let release = Family::new();
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        let del_batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        let commit_seconds = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ]);
        let mut registry = Registry::default();
        allocation.register(&mut registry, "spiderpool_ipam_allocation", true);
        release.register(&mut registry, "spiderpool_ipam_release", false);
        registry.register(
            "spiderpool_agent_group_commit_size",
            "ADDs committed together in one datastore transaction",
            batch_size.clone(),
        );
        registry.register(
            "spiderpool_agent_release_group_commit_size",
            "DELs committed together in one datastore transaction (two or more)",
            del_batch_size.clone(),
        );
        let release_gather_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "spiderpool_agent_release_gather_seconds",
            "How long a DEL waits for others to join its group commit (opened by pool-status write conflicts; 0: not at all)",
            release_gather_seconds.clone(),
        );
        registry.register(
            "spiderpool_agent_datastore_commit_duration_seconds",
            "Time of one datastore commit (a round trip to etcd, a SQLite transaction)",
            commit_seconds.clone(),
        );
        let store_writes: [Counter; 3] = Default::default();
        for (c, name, help) in [
            (&store_writes[0], "spiderpool_agent_datastore_pool_writes", "Writes of pools' holders (Kubernetes: SpiderIPPool status updates)"),
            (&store_writes[1], "spiderpool_agent_datastore_pool_write_conflicts", "Writes of pools' holders that another writer got in first (HTTP 409), laid again on a fresh read"),
            (&store_writes[2], "spiderpool_agent_datastore_object_writes", "Other object writes (SpiderEndpoints, …) of the Kubernetes datastore"),
        ] {
            registry.register(name, help, c.clone());
        }
        let pools = Gauge::default();
        let pool_total = Labelled::<Vec<(String, String)>, Gauge>::default();
        let pool_free = Labelled::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "spiderpool_total_ippool_counts",
            "SpiderIPPools this agent can allocate from",
            pools.clone(),
        );
        registry.register(
            "spiderpool_debug_ippool_total_ip_counts",
            "Addresses of a pool (spec.ips less spec.excludeIPs)",
            pool_total.clone(),
        );
        registry.register(
            "spiderpool_debug_ippool_available_ip_counts",
            "Addresses of a pool neither held nor reserved",
            pool_free.clone(),
        );
        Metrics {
            allocation,
            release,
            batch_size,
            del_batch_size,
            release_gather_seconds,
            commit_seconds,
            pools,
            pool_total,
            pool_free,
            store_writes,
            store_seen: Mutex::default(),
            registry,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition, with the datastore's write counts `store` brought
    /// up to date.
    pub fn render(
        &self,
        store: spiderpool_store::WriteCounts,
        space: &[(String, u64, u64)],
    ) -> String {
        self.pools.set(space.len() as i64);
        self.pool_total.clear();
        self.pool_free.clear();
        for (pool, total, free) in space {
            let l = vec![("pool".to_string(), pool.clone())];
            self.pool_total
                .get_or_create(&l)
                .set(i64::try_from(*total).unwrap_or(i64::MAX));
            self.pool_free
                .get_or_create(&l)
                .set(i64::try_from(*free).unwrap_or(i64::MAX));
        }
        {
            let mut seen = self.store_seen.lock().expect("store counts");
            for (c, (now, before)) in self.store_writes.iter().zip([
                (store.pool_writes, seen.pool_writes),
                (store.pool_conflicts, seen.pool_conflicts),
                (store.object_writes, seen.object_writes),
            ]) {
                c.inc_by(now.saturating_sub(before));
            }
            *seen = store;
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}
