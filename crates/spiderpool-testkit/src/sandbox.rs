//! A sandbox per test: a temporary directory with its own datastore, and `spiderpoolctl` run
//! against it.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::*;

/// A fresh temporary directory with a datastore URL inside it.
pub struct Sandbox {
    /// The directory; removed on drop.
    pub dir: tempfile::TempDir,
    /// The datastore, when it is not the SQLite file inside the directory.
    url: Option<String>,
    /// The sandbox's own etcd, if it has one.
    _etcd: Option<Etcd>,
    /// The sandbox's own control plane, if it has one.
    _cluster: Option<ControlPlane>,
}

impl Sandbox {
    /// A new sandbox: on its own SQLite file, or with SPIDERPOOL_TEST_DATASTORE=etcd on an etcd
    /// of its own, or with SPIDERPOOL_TEST_DATASTORE=kubernetes on a control plane of its own
    /// (etcd and kube-apiserver, the project's CRDs installed), so every test that uses
    /// sandboxes can run on any datastore.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        if Self::on_kubernetes() {
            let bin =
                kube_bin().expect("SPIDERPOOL_TEST_DATASTORE=kubernetes needs SPIDERPOOL_KUBE_BIN");
            let cp = ControlPlane::start(&bin, false);
            cp.install_crds();
            return Sandbox {
                dir,
                url: Some(format!("kubernetes?kubeconfig={}", cp.kubeconfig.display())),
                _etcd: None,
                _cluster: Some(cp),
            };
        }
        if std::env::var("SPIDERPOOL_TEST_DATASTORE").as_deref() == Ok("etcd") {
            let etcd = Etcd::single();
            return Sandbox {
                dir,
                url: Some(etcd.datastore("/sandbox")),
                _etcd: Some(etcd),
                _cluster: None,
            };
        }
        Sandbox {
            dir,
            url: None,
            _etcd: None,
            _cluster: None,
        }
    }

    /// Whether sandboxes run on Kubernetes (SPIDERPOOL_TEST_DATASTORE=kubernetes).
    pub fn on_kubernetes() -> bool {
        std::env::var("SPIDERPOOL_TEST_DATASTORE").as_deref() == Ok("kubernetes")
    }

    /// A sandbox whose datastore is `url` (etcd, say) instead of its own SQLite file.
    pub fn on(url: String) -> Self {
        Sandbox {
            dir: tempfile::tempdir().expect("tempdir"),
            url: Some(url),
            _etcd: None,
            _cluster: None,
        }
    }

    /// `sqlite:///…/spiderpool.db` inside the sandbox, or the URL it was made [`Sandbox::on`].
    pub fn datastore(&self) -> String {
        self.url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.dir.path().join("spiderpool.db").display()
            )
        })
    }

    /// The control plane the sandbox runs on (SPIDERPOOL_TEST_DATASTORE=kubernetes).
    pub fn cluster(&self) -> Option<&ControlPlane> {
        self._cluster.as_ref()
    }

    /// A socket path inside the sandbox.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// Runs `spiderpoolctl --datastore … ARGS` with `stdin`.
    pub fn ctl(&self, args: &[&str], stdin: &str) -> Output {
        ctl(&self.datastore(), args, stdin)
    }

    /// Applies YAML, panicking with the CLI's output on failure.
    pub fn apply(&self, yaml: &str) {
        let out = self.ctl(&["apply", "-f", "-"], yaml);
        assert!(out.success, "apply failed:\n{}\n{}", out.stdout, out.stderr);
    }

    /// `get KIND NAME -o json` as JSON.
    pub fn get_json(&self, kind: &str, name: &str) -> Value {
        let out = self.ctl(&["get", kind, name, "-o", "json"], "");
        assert!(out.success, "get {kind} {name} failed: {}", out.stderr);
        serde_json::from_str(&out.stdout).expect("get -o json prints JSON")
    }

    /// `.status.allocatedIPCount` of a pool.
    pub fn allocated(&self, pool: &str) -> u64 {
        allocated(&self.datastore(), pool)
    }

    /// Starts an agent for `node` with `labels` (`k=v,…`) on its own socket. On Kubernetes the
    /// Node object is made first, as kubelet would have registered it.
    pub fn agent(&self, node: &str, labels: &str) -> Agent {
        self.agent_with(node, labels, &[])
    }

    /// [`Sandbox::agent`] with the agent flags `extra`.
    pub fn agent_with(&self, node: &str, labels: &str, extra: &[&str]) -> Agent {
        if Self::on_kubernetes() && self.ctl(&["get", "node", node], "").stdout.is_empty() {
            self.apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n"
            ));
        }
        Agent::start_with(
            &self.datastore(),
            &self.socket(node),
            node,
            labels,
            extra,
            None,
        )
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `spiderpoolctl --datastore DATASTORE ARGS` with `stdin`.
pub fn ctl(datastore: &str, args: &[&str], stdin: &str) -> Output {
    run(
        Command::new(bin("spiderpoolctl"))
            .arg("--datastore")
            .arg(datastore)
            .args(args),
        stdin,
    )
}

/// `.status.allocatedIPCount` of a pool in `datastore`.
pub fn allocated(datastore: &str, pool: &str) -> u64 {
    let out = ctl(datastore, &["get", "ippool", pool, "-o", "json"], "");
    assert!(out.success, "get ippool {pool}: {}", out.stderr);
    out.json()["status"]["allocatedIPCount"]
        .as_u64()
        .expect("allocatedIPCount")
}
