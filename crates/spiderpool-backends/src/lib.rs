//! Where the Store contract is kept: the durable backends and the `--datastore` URL that picks
//! one. Each backend is a cargo feature, so a binary links only what it opens (the controller
//! only `kubernetes`):
//!
//! - [`sqlite::SqliteStore`] (`sqlite`, the default datastore): one file, safe for several
//!   processes on one host;
//! - [`etcd::EtcdStore`] (`etcd`): an etcd v3 cluster shared by hosts;
//! - [`kubernetes::KubeStore`] (`kubernetes`): the cluster's API server, over upstream
//!   Spiderpool's objects in their exact shapes.
//!
//! All pass `spiderpool_store::conformance` (`tests/conformance.rs`).

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::sync::Arc;

use spiderpool_store::memory::MemoryStore;
use spiderpool_store::{Result, Store, StoreError};

/// A datastore location as the `--datastore` flag takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreUrl {
    /// `sqlite:///path/to/file.db`.
    Sqlite(std::path::PathBuf),
    /// `memory:` (one process only; for tests).
    Memory,
    /// `etcd://host:port[,host:port]?prefix=/spiderpool`.
    Etcd {
        /// Endpoints.
        endpoints: Vec<String>,
        /// Key prefix.
        prefix: String,
    },
    /// `kubernetes[?kubeconfig=/path]`: the cluster's API server.
    Kubernetes {
        /// The kubeconfig file (else `--kubeconfig`, `KUBECONFIG`, `~/.kube/config` or the
        /// in-cluster service account).
        kubeconfig: Option<std::path::PathBuf>,
    },
}

impl DatastoreUrl {
    /// The backend's name, as its cargo feature and URL scheme say it.
    pub fn scheme(&self) -> &'static str {
        match self {
            DatastoreUrl::Sqlite(_) => "sqlite",
            DatastoreUrl::Memory => "memory",
            DatastoreUrl::Etcd { .. } => "etcd",
            DatastoreUrl::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// The default datastore.
pub const DEFAULT_DATASTORE: &str = "sqlite:///var/lib/spiderpool/spiderpool.db";

impl std::str::FromStr for DatastoreUrl {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            StoreError::Config(format!(
                "datastore {s:?}: {why} (valid: sqlite:///path/to/db, etcd://host:2379[,host:2379]?prefix=/spiderpool, kubernetes[?kubeconfig=/path])"
            ))
        };
        if let Some(path) = s.strip_prefix("sqlite://") {
            if !path.starts_with('/') {
                return Err(bad("the sqlite path must be absolute, e.g. sqlite:///var/lib/spiderpool/spiderpool.db"));
            }
            return Ok(DatastoreUrl::Sqlite(path.into()));
        }
        if s == "memory:" {
            return Ok(DatastoreUrl::Memory);
        }
        if let Some(rest) = s.strip_prefix("kubernetes") {
            let kubeconfig = match rest {
                "" => None,
                q => match q.strip_prefix("?kubeconfig=") {
                    Some(p) if p.starts_with('/') => Some(p.into()),
                    _ => return Err(bad("the only setting is an absolute ?kubeconfig=/path")),
                },
            };
            return Ok(DatastoreUrl::Kubernetes { kubeconfig });
        }
        if let Some(rest) = s.strip_prefix("etcd://") {
            let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
            let endpoints: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect();
            if endpoints.is_empty() {
                return Err(bad("no etcd endpoint"));
            }
            let prefix = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("prefix="))
                .unwrap_or("/spiderpool")
                .to_string();
            return Ok(DatastoreUrl::Etcd { endpoints, prefix });
        }
        Err(bad("unknown scheme"))
    }
}

/// Opens the datastore at `url` (`kubernetes`: with `KUBECONFIG`, `~/.kube/config` or the
/// in-cluster service account).
pub async fn open(url: &DatastoreUrl) -> Result<Arc<dyn Store>> {
    open_with(url, None).await
}

/// Opens the datastore at `url`; `kubernetes` with the kubeconfig file `kubeconfig` when given.
pub async fn open_with(
    url: &DatastoreUrl,
    kubeconfig: Option<&std::path::Path>,
) -> Result<Arc<dyn Store>> {
    let _ = kubeconfig;
    match url {
        #[cfg(feature = "sqlite")]
        DatastoreUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteStore::open(path).await?)),
        DatastoreUrl::Memory => Ok(Arc::new(MemoryStore::new())),
        #[cfg(feature = "etcd")]
        DatastoreUrl::Etcd { endpoints, prefix } => {
            Ok(Arc::new(etcd::EtcdStore::connect(endpoints, prefix).await?))
        }
        #[cfg(feature = "kubernetes")]
        DatastoreUrl::Kubernetes { kubeconfig: own } => {
            let store = kubernetes::KubeStore::connect(kubeconfig.or(own.as_deref())).await?;
            store.check_schemas().await?;
            Ok(Arc::new(store))
        }
        #[allow(unreachable_patterns)]
        other => Err(StoreError::Config(format!(
            "this build has no {} backend (cargo feature {:?} of spiderpool-backends)",
            other.scheme(),
            other.scheme()
        ))),
    }
}

/// The addresses a SpiderEndpoint's record holds, by pool, read from the stored object: what a
/// watch tells of an endpoint ([`spiderpool_store::Change::Recorded`]). A NIC that does not
/// parse records nothing.
#[cfg(any(feature = "etcd", feature = "kubernetes"))]
pub(crate) fn recorded_of(value: &serde_json::Value) -> Vec<(String, std::net::IpAddr)> {
    value
        .pointer("/status/current/ips")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|n| {
            serde_json::from_value::<spiderpool_api::crd::EndpointInterface>(n.clone()).ok()
        })
        .flat_map(|n| n.held())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_datastore_urls() {
        assert_eq!(
            "sqlite:///var/lib/spiderpool/spiderpool.db"
                .parse::<DatastoreUrl>()
                .unwrap(),
            DatastoreUrl::Sqlite("/var/lib/spiderpool/spiderpool.db".into())
        );
        assert_eq!(
            "etcd://h1:2379,h2:2379?prefix=/x"
                .parse::<DatastoreUrl>()
                .unwrap(),
            DatastoreUrl::Etcd {
                endpoints: vec!["h1:2379".into(), "h2:2379".into()],
                prefix: "/x".into()
            }
        );
        let err = "sqlite://rel.db"
            .parse::<DatastoreUrl>()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("datastore \"sqlite://rel.db\": the sqlite path must be absolute"),
            "{err}"
        );
        assert_eq!(
            "kubernetes".parse::<DatastoreUrl>().unwrap(),
            DatastoreUrl::Kubernetes { kubeconfig: None }
        );
        assert_eq!(
            "kubernetes?kubeconfig=/etc/k.conf"
                .parse::<DatastoreUrl>()
                .unwrap(),
            DatastoreUrl::Kubernetes {
                kubeconfig: Some("/etc/k.conf".into())
            }
        );
        let err = "kubernetes?server=x"
            .parse::<DatastoreUrl>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("?kubeconfig=/path"), "{err}");
        let err = "mysql://x".parse::<DatastoreUrl>().unwrap_err().to_string();
        assert!(err.contains("unknown scheme"), "{err}");
    }
}
