//! One invocation of the `spiderpool` CNI plugin, with the environment a runtime would set.

use std::process::Command;

use serde_json::Value;

use crate::*;

/// One CNI invocation of the `spiderpool` plugin.
#[derive(Debug, Clone)]
pub struct CniCall {
    /// `CNI_COMMAND` (None leaves it unset).
    pub command: Option<String>,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_ARGS`.
    pub args: String,
    /// stdin.
    pub stdin: String,
    /// `CNI_PATH`.
    pub cni_path: String,
}

impl CniCall {
    /// A call with the usual environment for pod `default/<pod>` and container `<container>`.
    pub fn new(command: &str, container: &str, pod: &str, conf: &Value) -> Self {
        CniCall {
            command: Some(command.into()),
            container_id: Some(container.into()),
            ifname: Some("eth0".into()),
            netns: Some(format!("/var/run/netns/{container}")),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container}"),
            stdin: conf.to_string(),
            cni_path: "/usr/lib/cni".into(),
        }
    }

    /// Sets the interface.
    pub fn ifname(mut self, ifname: &str) -> Self {
        self.ifname = Some(ifname.into());
        self
    }

    /// Sets `CNI_PATH` to the reference plugins and the workspace's binaries, for an interface
    /// plugin (macvlan) whose IPAM is `spiderpool`.
    pub fn with_workspace_plugins(mut self) -> Self {
        self.cni_path = format!("/usr/lib/cni:{}", bin_dir().display());
        self
    }

    /// Runs the real `spiderpool` binary.
    pub fn run(&self) -> Output {
        self.run_via(&[])
    }

    /// Runs the real `spiderpool` binary through `wrapper` (a command that ends by executing
    /// its last argument, e.g. `["setpriv", "--reuid=65534", …]` or
    /// `["sh", "-c", "umask 000; exec \"$0\""]`), with the same environment and stdin.
    pub fn run_via(&self, wrapper: &[&str]) -> Output {
        self.run_program_via(&bin("spiderpool"), wrapper)
    }

    /// [`CniCall::run_via`] for a copy of the plugin at `program`.
    pub fn run_program_via(&self, program: &std::path::Path, wrapper: &[&str]) -> Output {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.env_clear()
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_ARGS", &self.args);
        for (k, v) in [
            ("CNI_COMMAND", &self.command),
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_NETNS", &self.netns),
        ] {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        run(&mut cmd, &self.stdin)
    }
}
