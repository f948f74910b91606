//! The command line: every flag and subcommand of `spiderpoolctl`, parsed by clap.

use clap::{Parser, Subcommand, ValueEnum};
use spiderpool_backends::{DatastoreUrl, DEFAULT_DATASTORE};

#[derive(Debug, Parser)]
#[command(
    name = "spiderpoolctl",
    version,
    about = "Manage Spiderpool IPAM objects"
)]
pub(crate) struct Args {
    /// Datastore: sqlite:///path/db, etcd://host:port[,host:port]?prefix=/spiderpool or kubernetes.
    #[arg(long, env = "SPIDERPOOL_DATASTORE", default_value = DEFAULT_DATASTORE, global = true)]
    pub(crate) datastore: DatastoreUrl,
    /// With `--datastore kubernetes`: the kubeconfig file (else `KUBECONFIG` or
    /// `~/.kube/config`).
    #[arg(long, env = "SPIDERPOOL_KUBECONFIG", global = true)]
    pub(crate) kubeconfig: Option<std::path::PathBuf>,
    /// Addresses an auto pool gets beyond its application's replicas when the pod template
    /// has no `ipam.spidernet.io/ippool-ip-number` (sqlite and etcd datastores).
    #[arg(
        long,
        env = "SPIDERPOOL_AUTO_POOL_REDUNDANCY",
        default_value_t = 1,
        global = true
    )]
    pub(crate) auto_pool_redundancy: u64,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Wide,
    Json,
    Yaml,
    /// `kind.group/name`, one per line (kubectl's `-o name`).
    Name,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create or update objects from multi-document YAML: all of them or none. Every object is
    /// checked against the datastore as the documents before it leave it, and all are written
    /// in one transaction; when one is refused, the error names its document and nothing is
    /// applied.
    Apply {
        /// File to read, or `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// List objects of a kind, or show one.
    Get {
        /// ippool, subnet, reservedip, endpoint, node, namespace, pod, workload (or their
        /// plural and short names).
        kind: String,
        /// Object name (`namespace/name` or `-n` for namespaced kinds).
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Output>,
        /// Namespace of namespaced objects.
        #[arg(short = 'n', long = "namespace")]
        namespace: Option<String>,
    },
    /// Address-space repairs.
    #[command(subcommand)]
    Ipam(Ipam),
    /// Moving a cluster from upstream Spiderpool (`--datastore kubernetes`).
    #[command(subcommand)]
    Migrate(Migrate),
    /// Print a shell completion script (`source <(spiderpoolctl completion bash)`).
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Why a pod gets the address it gets, or none: which candidate source applies, each pool
    /// considered with why it was kept or filtered, their order, and what would be allocated
    /// now. Nothing is allocated. Exit status 1 when no address could be given.
    Explain {
        /// `pod`.
        kind: String,
        /// `namespace/name` (or `name` in `default`).
        name: String,
        /// The interface.
        #[arg(long = "interface", default_value = "eth0")]
        interface: String,
        /// The node (default: the pod's `spec.nodeName`).
        #[arg(long)]
        node: Option<String>,
        /// `default_ipv4_ippool` of the CNI config the pod is attached with.
        #[arg(long = "default-ipv4-ippool", value_delimiter = ',')]
        default_ipv4_ippool: Vec<String>,
        /// `default_ipv6_ippool` of the CNI config.
        #[arg(long = "default-ipv6-ippool", value_delimiter = ',')]
        default_ipv6_ippool: Vec<String>,
        /// Multus's cluster network: eth0's network when the pod names no default network
        /// (as the agents are told).
        #[arg(long, env = "MULTUS_CLUSTER_NETWORK")]
        multus_cluster_network: Option<String>,
        /// Namespace of a bare default or cluster network name (as the agents are told; else
        /// the pod's).
        #[arg(long, env = "SPIDERPOOL_MULTUS_NAMESPACE")]
        multus_namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Output>,
    },
    /// Bring every SpiderSubnet auto pool in line with its application (sqlite and etcd
    /// datastores; in a cluster the controller does it): create, scale and take over pools, and
    /// delete those of applications gone once their addresses are released. `apply` and
    /// `delete` of a workload do it for that workload.
    Reconcile,
    /// Delete an object. Deleting a SpiderEndpoint releases the addresses it records.
    Delete {
        /// Kind, as for `get`.
        kind: String,
        /// Object name.
        name: String,
        /// Namespace of namespaced objects.
        #[arg(short = 'n', long = "namespace")]
        namespace: Option<String>,
    },
}

/// `spiderpoolctl migrate …`.
#[derive(Debug, Subcommand)]
pub(crate) enum Migrate {
    /// What stands in the way of moving this cluster from upstream Spiderpool, read-only (it
    /// works while upstream still runs): each hazard with the objects involved and what to do.
    /// Exit status 1 when any blocks the move.
    Check {
        /// Output format (`json` for scripts).
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Output>,
    },
}

/// `spiderpoolctl ipam …`.
#[derive(Debug, Subcommand)]
pub(crate) enum Ipam {
    /// The address space per subnet and pool: total, used, free, the free ranges and a
    /// utilisation bar; with `--ip`, who holds that address (pod, UID, container, interface,
    /// node, since when) and through which pool, or why it is not handed out.
    Show {
        /// Only this pool (and its subnet).
        pool: Option<String>,
        /// The address to look up.
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        /// Output format (`json` for scripts).
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Output>,
    },
    /// Release an address that is held without an endpoint recording it (an address its pod's
    /// endpoint records is refused: use CNI DEL or `delete endpoint`); or, with
    /// `--from-report FILE`, repair what an `ipam check -o json` report lists, each item checked
    /// again first (what changed since the report is left alone).
    Release {
        /// The pool.
        #[arg(required_unless_present = "from_report")]
        pool: Option<String>,
        /// The address.
        #[arg(required_unless_present = "from_report")]
        ip: Option<std::net::IpAddr>,
        /// An `ipam check -o json` report (`-` for stdin).
        #[arg(long, conflicts_with_all = ["pool", "ip"])]
        from_report: Option<std::path::PathBuf>,
    },
    /// Every inconsistency between pools, endpoints and pods: an address held twice, an address
    /// held without an endpoint, an endpoint recording what its pool does not hold for it, an
    /// endpoint whose pod is gone, a count that disagrees. Exit status 1 when any is found.
    Check {
        /// Output format (`json`: a report for `ipam release --from-report`).
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Output>,
    },
    /// Reclaim the addresses of dead pods with the controller's rules: a pod deleted, replaced
    /// by another UID, Succeeded or Failed, terminating past its grace period, or on a node that
    /// is gone; a StatefulSet member within `replicas` keeps its addresses. A leak must be seen
    /// twice, `--grace` apart, and is judged once more as it is released. In Kubernetes mode the
    /// controller's leader does this on its own.
    Gc {
        /// Time between the two sightings a release needs (also added to each pod's grace
        /// period).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// How long a Node may be NotReady before its terminating pods' addresses are taken.
        #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
        node_grace: std::time::Duration,
        /// Only say what would be reclaimed (one sighting, nothing released).
        #[arg(long)]
        dry_run: bool,
        /// Output format (`json` for scripts).
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Output>,
    },
}
