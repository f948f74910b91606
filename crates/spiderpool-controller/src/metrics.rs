//! The controller's Prometheus metrics under upstream's documented names
//! (`spiderpool_ip_gc_counts`, `spiderpool_ip_gc_failure_counts`; counters carry `_total` in the
//! exposition), plus whether this replica leads and how many leaks it is watching.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The controller's metrics.
pub struct Metrics {
    registry: Registry,
    gc: Counter,
    gc_failures: Counter,
    gc_by_cause: Family<Vec<(String, String)>, Counter>,
    tracked: Gauge,
    leader: Gauge,
    passes: Family<Vec<(String, String)>, Counter>,
    pass_reads: Family<Vec<(String, String)>, Histogram>,
    invalid: Family<Vec<(String, String)>, Gauge>,
}

/// Buckets of API reads per pass: a pass on the caches reads nothing.
fn read_buckets() -> Histogram {
    Histogram::new([0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            gc: Counter::default(),
            gc_failures: Counter::default(),
            gc_by_cause: Family::default(),
            tracked: Gauge::default(),
            leader: Gauge::default(),
            passes: Family::default(),
            pass_reads: Family::new_with_constructor(read_buckets),
            invalid: Family::default(),
        };
        registry.register(
            "spiderpool_ip_gc_counts",
            "Addresses of dead pods reclaimed",
            m.gc.clone(),
        );
        registry.register(
            "spiderpool_ip_gc_failure_counts",
            "Reclaims that failed (retried at the next look)",
            m.gc_failures.clone(),
        );
        registry.register(
            "spiderpool_ip_gc_cause_counts",
            "Addresses reclaimed, by what became of their pod (deleted, replaced, finished, terminating, node)",
            m.gc_by_cause.clone(),
        );
        registry.register(
            "spiderpool_ip_gc_tracked_leaks",
            "Pod incarnations seen leaked and waiting for their second sighting",
            m.tracked.clone(),
        );
        registry.register(
            "spiderpool_controller_leader",
            "1 while this replica holds the Lease spiderpool-controller-leases",
            m.leader.clone(),
        );
        registry.register(
            "spiderpool_controller_passes",
            "Passes of the leader's loops (pools, autopool, reclaim)",
            m.passes.clone(),
        );
        registry.register(
            "spiderpool_controller_api_reads_per_pass",
            "API reads (GET, LIST) one pass of a leader's loop made; its objects come from the shared caches",
            m.pass_reads.clone(),
        );
        registry.register(
            "spiderpool_controller_invalid_objects",
            "Objects a leader's loop skips because they cannot be read or written (by loop and kind); an Event on each says why",
            m.invalid.clone(),
        );
        Metrics { registry, ..m }
    }

    /// `n` addresses reclaimed from a pod that was `cause`.
    pub fn reclaimed(&self, cause: &str, n: u64) {
        self.gc.inc_by(n);
        self.gc_by_cause
            .get_or_create(&vec![("cause".to_string(), cause.to_string())])
            .inc_by(n);
    }

    /// A reclaim failed.
    pub fn failed(&self) {
        self.gc_failures.inc();
    }

    /// How many leaks wait for their second sighting.
    pub fn tracking(&self, n: usize) {
        self.tracked.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One pass of the loop `name` that made `reads` API reads.
    pub fn pass(&self, name: &str, reads: u64) {
        let labels = vec![("loop".to_string(), name.to_string())];
        self.passes.get_or_create(&labels).inc();
        self.pass_reads.get_or_create(&labels).observe(reads as f64);
    }

    /// How many objects of `kind` the loop `name` skips as invalid.
    pub fn invalid(&self, name: &str, kind: &str, n: usize) {
        self.invalid
            .get_or_create(&vec![
                ("loop".to_string(), name.to_string()),
                ("kind".to_string(), kind.to_string()),
            ])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Whether this replica leads.
    pub fn leading(&self, yes: bool) {
        self.leader.set(i64::from(yes));
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// `GET /metrics` on `--metrics-addr`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    async fn render(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.render(),
        )
    }
    Router::new()
        .route("/metrics", get(render))
        .with_state(metrics)
}
