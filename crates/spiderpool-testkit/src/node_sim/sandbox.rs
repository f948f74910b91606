//! A pod's sandbox, as the container runtime makes it: a network namespace, the pod's CNI
//! chain run there with the runtime's environment, the pod reported Running with its addresses.

use std::process::Command;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

use super::*;

impl Sim {
    pub(super) async fn setup(
        self: &Arc<Self>,
        pod: &Pod,
        slot: &mut Option<SetUp>,
    ) -> SimResult<()> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let network = self.network_of(pod).await?;
        let netns = format!("sim-{}", &uid.replace('-', "")[..12]);
        let container_id = format!("{:0>64}", uid.replace('-', ""));
        let add = netns.clone();
        self.netns.lock().expect("netns lock").insert(netns.clone());
        tokio::task::spawn_blocking(move || sh(&["ip", "netns", "add", &add]))
            .await
            .map_err(|e| e.to_string())?;
        let mut set = SetUp {
            namespace,
            name,
            netns,
            container_id,
            network,
            results: Vec::new(),
            servers: Vec::new(),
        };
        let sim = self.clone();
        let key = uid.clone();
        let (set, result) = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let r = sim.chain(&mut set, &key, "ADD");
            sim.adds.lock().expect("timings lock").push(AddTiming {
                started,
                took: started.elapsed(),
                ok: r.is_ok(),
            });
            (set, r)
        })
        .await
        .map_err(|e| e.to_string())?;
        // Recorded even when ADD failed part way, so that deletion runs DEL for what was made.
        let ips = result.as_ref().map(ips_of);
        let (ns, name) = (set.namespace.clone(), set.name.clone());
        let served = if ips.is_ok() {
            serve_ports(pod, &set.netns, &name).await
        } else {
            Ok(Vec::new())
        };
        *slot = Some(set);
        let ips = ips.map_err(|e| e.clone())?;
        let servers = served?;
        if let Some(set) = slot.as_mut() {
            set.servers = servers;
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let now = Self::now();
        let containers: Vec<Value> = pod
            .spec
            .as_ref()
            .map(|s| {
                s.containers
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                json!({"name": c, "ready": true, "started": true, "restartCount": 0,
                    "image": "sim", "imageID": "sim", "containerID": format!("sim://{c}"),
                    "state": {"running": {"startedAt": now}}})
            })
            .collect();
        let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": self.addresses[0],
            "hostIPs": self.addresses.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "podIP": ips.first(),
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "startTime": now,
            "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("ContainersReady"), cond("Ready"), cond("PodScheduled")],
            "containerStatuses": containers,
        }});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .map_err(|e| format!("pod status: {e}"))?;
        Ok(())
    }

    /// Runs the network's plugins for `command` (ADD in order, each given the previous result;
    /// DEL in reverse with the last result). Returns the final result of an ADD.
    pub(super) fn chain(&self, set: &mut SetUp, uid: &str, command: &str) -> SimResult<Value> {
        let net = &set.network;
        let version = net["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
        let name = net["name"].as_str().unwrap_or("net").to_string();
        let plugins: Vec<Value> = match net["plugins"].as_array() {
            Some(p) => p.clone(),
            None => vec![net.clone()],
        };
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={uid}",
            set.namespace, set.name, set.container_id
        );
        let mut prev: Option<Value> = set.results.last().cloned();
        let order: Vec<usize> = if command == "DEL" {
            (0..plugins.len()).rev().collect()
        } else {
            (0..plugins.len()).collect()
        };
        for i in order {
            let mut conf = plugins[i].clone();
            conf["cniVersion"] = json!(version);
            conf["name"] = json!(name);
            if let Some(p) = &prev {
                conf["prevResult"] = p.clone();
            }
            let plugin = conf["type"].as_str().unwrap_or_default().to_string();
            let out = self.exec(&plugin, command, set, &args, &conf)?;
            if command == "ADD" {
                let result: Value = serde_json::from_str(&out)
                    .map_err(|e| format!("{plugin} ADD printed no result ({e}): {out}"))?;
                set.results.push(result.clone());
                prev = Some(result);
            }
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    pub(super) fn exec(
        &self,
        plugin: &str,
        command: &str,
        set: &SetUp,
        args: &str,
        conf: &Value,
    ) -> SimResult<String> {
        let path = self
            .spec
            .cni_path
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.exists())
            .ok_or_else(|| {
                format!(
                    "CNI plugin {plugin:?} not found in {:?}",
                    self.spec.cni_path
                )
            })?;
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(dir) = &self.spec.run_dir {
            // A mount namespace of the plugin's own, with the node's directory as RUN_DIR.
            std::fs::create_dir_all(RUN_DIR).map_err(|e| format!("creating {RUN_DIR}: {e}"))?;
            argv.extend(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#,
                    "sh",
                ]
                .map(Into::into),
            );
            argv.push(dir.into());
            argv.push(RUN_DIR.into());
        }
        if let Some(ns) = &self.spec.host_netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()].map(Into::into));
        }
        argv.push(path.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let cni_path = std::env::join_paths(&self.spec.cni_path).expect("CNI_PATH");
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &set.container_id)
            .env("CNI_NETNS", format!("/var/run/netns/{}", set.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env("CNI_ARGS", args);
        let out = run(&mut cmd, &conf.to_string());
        if out.success {
            Ok(out.stdout)
        } else {
            Err(format!(
                "{plugin} {command} failed: {}{}",
                out.stdout, out.stderr
            ))
        }
    }
}

/// The addresses of a CNI result, without prefix length.
pub(super) fn ips_of(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|i| i["address"].as_str())
                .filter_map(|a| a.split('/').next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn humantime_now_micro() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}
