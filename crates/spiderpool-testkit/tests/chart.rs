//! The Helm chart `deploy/helm/spiderpool`: `helm lint` and `helm template` with helm built from
//! its Go module, the rendered chart accepted by the real API server, and the agent and the
//! controller doing their whole job under exactly the chart's ServiceAccount permissions (a verb
//! the chart forgot fails a step here).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use spiderpool_testkit::{
    free_port, helm_bin, json_of, kube_bin, run, until, Agent, CniCall, ControlPlane, Controller,
    Output,
};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/spiderpool")
}

fn helm(bin: &Path, args: &[&str]) -> Output {
    run(Command::new(bin.join("helm")).args(args), "")
}

fn render(bin: &Path, set: &[&str]) -> String {
    let chart = chart();
    let mut args = vec![
        "template",
        "spiderpool",
        chart.to_str().unwrap(),
        "--namespace",
        "kube-system",
        "--include-crds",
    ];
    for s in set {
        args.extend(["--set", s]);
    }
    let out = helm(bin, &args);
    assert!(out.success, "helm template: {}", out.stderr);
    out.stdout
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---")
        .filter_map(|d| serde_norway::from_str::<Value>(d).ok())
        .filter(|v| v.is_object())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

#[test]
fn the_chart_lints_renders_and_installs_on_the_api_server() {
    let Some(hbin) = helm_bin() else { return };
    let Some(kbin) = kube_bin() else { return };
    let out = helm(&hbin, &["lint", chart().to_str().unwrap()]);
    assert!(
        out.success && out.stdout.contains("0 chart(s) failed"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let yaml = render(&hbin, &[]);
    let docs = documents(&yaml);
    let ds = find(&docs, "DaemonSet", "spiderpool-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "spiderpool-agent");
    assert_eq!(pod["initContainers"][0]["name"], "install-cni");
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(volumes
        .iter()
        .any(|v| v["hostPath"]["path"] == "/var/run/spidernet"));
    assert!(volumes
        .iter()
        .any(|v| v["hostPath"]["path"] == "/opt/cni/bin"));
    // The socket's directory as this chart gives it, or the socket file as upstream's chart
    // does: the same agent either way.
    for value in [
        "/var/run/spidernet",
        "/var/run/spidernet/",
        "/var/run/spidernet/spiderpool.sock",
    ] {
        let set = format!("global.ipamUNIXSocketHostPath={value}");
        let docs = documents(&render(&hbin, &[&set]));
        let pod = &find(&docs, "DaemonSet", "spiderpool-agent")["spec"]["template"]["spec"];
        let args = pod["containers"][0]["args"].to_string();
        assert!(
            args.contains("\"--socket=/var/run/spidernet/spiderpool.sock\""),
            "{value}: {args}"
        );
        let socket_dir = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "socket-dir")
            .unwrap()
            .clone();
        assert_eq!(
            socket_dir["hostPath"]["path"], "/var/run/spidernet",
            "{value}"
        );
    }
    // Multus's cluster network in upstream's value, and the namespace of bare names.
    let docs = documents(&render(
        &hbin,
        &["multus.multusCNI.defaultCniCRName=macvlan-conf"],
    ));
    let env = find(&docs, "DaemonSet", "spiderpool-agent")["spec"]["template"]["spec"]
        ["containers"][0]["env"]
        .to_string();
    assert!(
        env.contains(r#"{"name":"MULTUS_CLUSTER_NETWORK","value":"macvlan-conf"}"#)
            && env.contains(r#"{"name":"SPIDERPOOL_MULTUS_NAMESPACE","value":"kube-system"}"#),
        "{env}"
    );
    // upstream's detection switches and the conflict hold reach the agent.
    let agent_args = pod["containers"][0]["args"].to_string();
    for want in [
        "--enable-ip-conflict-detection=false",
        "--enable-gateway-detection=false",
        "--ip-conflict-hold=10m",
    ] {
        assert!(agent_args.contains(want), "{want} not in {agent_args}");
    }
    let deploy = find(&docs, "Deployment", "spiderpool-controller");
    assert_eq!(deploy["spec"]["replicas"], 2);
    // On the host's network (as upstream's), replaced one at a time: a surge replica would
    // want ports its node already serves.
    assert_eq!(deploy["spec"]["template"]["spec"]["hostNetwork"], true);
    assert_eq!(
        deploy["spec"]["strategy"]["rollingUpdate"]["maxSurge"], 0,
        "{deploy}"
    );
    // The agent removes the plugins it installed when its pod goes.
    let stop = ds["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]
        ["command"]
        .to_string();
    assert!(stop.contains("/host/opt/cni/bin/spiderpool"), "{stop}");
    let args: Vec<&str> = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for want in [
        "--enable-ipv4=true",
        "--enable-ipv6=true",
        "--gc-enabled=true",
        "--gc-interval=600s",
        "--webhook-service=spiderpool-controller",
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    // upstream's ipam switches reach the controller.
    let off = documents(&render(
        &hbin,
        &[
            "ipam.enableIPv6=false",
            "ipam.gc.enabled=false",
            "spiderpoolController.hostnetwork=false",
        ],
    ));
    let off_deploy = find(&off, "Deployment", "spiderpool-controller");
    assert!(
        off_deploy["spec"]["template"]["spec"]["hostNetwork"].is_null()
            && off_deploy["spec"]["strategy"].is_null(),
        "{off_deploy}"
    );
    let args = off_deploy["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--enable-ipv6=false") && args.contains("--gc-enabled=false"),
        "{args}"
    );
    // Five kinds each; the validating ones also restrict agents to their own node.
    for (kind, n) in [
        ("MutatingWebhookConfiguration", 5),
        ("ValidatingWebhookConfiguration", 6),
    ] {
        let w = find(&docs, kind, "spiderpool-controller");
        let hooks = w["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), n);
        assert_eq!(
            hooks[0]["clientConfig"]["service"]["name"],
            "spiderpool-controller"
        );
    }
    assert_eq!(
        docs.iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .count(),
        7
    );

    // The API server accepts every rendered object.
    let cp = ControlPlane::start(&kbin, false);
    let out = cp.kubectl(&["apply", "--dry-run=server", "-f", "-"], &yaml);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(out
        .stdout
        .contains("daemonset.apps/spiderpool-agent created (server dry run)"));
}

#[test]
fn agent_and_controller_work_under_exactly_the_charts_permissions() {
    let Some(hbin) = helm_bin() else { return };
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    // The whole chart, with the webhooks reached on loopback where the test runs the controller
    // (no kubelet here runs the chart's pods).
    let webhook = format!("127.0.0.1:{}", free_port());
    let yaml = render(
        &hbin,
        &[&format!(
            "spiderpoolController.webhookURL=https://{webhook}"
        )],
    );
    cp.kubectl_ok(&["apply", "-f", "-"], &yaml);
    cp.kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ],
        "",
    );
    // The agent runs as the chart's service account with the token kubelet gives its pod on
    // n1: the webhook's node restriction reads n1 from it.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}).to_string(),
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "spiderpool-agent-n1", "namespace": "kube-system"},
            "spec": {"nodeName": "n1", "serviceAccountName": "spiderpool-agent",
                "containers": [{"name": "agent", "image": "registry.invalid/agent"}]}})
        .to_string(),
    );
    let agent_kc = cp.service_account_kubeconfig_for(
        "kube-system",
        "spiderpool-agent",
        Some("spiderpool-agent-n1"),
    );
    let controller_kc = cp.service_account_kubeconfig("kube-system", "spiderpool-controller");
    let dir = tempfile::tempdir().unwrap();
    // The chart's SpiderCoordinator `default`, as its Deployment passes it.
    let docs = documents(&yaml);
    let default_coordinator = find(&docs, "Deployment", "spiderpool-controller")["spec"]
        ["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .find(|a| a.starts_with("--default-coordinator="))
        .expect("the chart passes --default-coordinator")
        .to_string();
    let ctl = Controller::start_as(
        &controller_kc,
        dir.path(),
        "spiderpool-controller-0",
        &webhook,
        &[
            &default_coordinator,
            "--namespace",
            "kube-system",
            "--gc-interval",
            "3s",
            "--gc-grace-delay",
            "1s",
            "--gc-trace-gap",
            "1s",
        ],
    );
    until("the controller ready", || {
        (spiderpool_testkit::http_get(&ctl.health, "/readyz").0 == 200).then_some(())
    });

    // Admission under the controller's permissions.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderSubnet",
            "metadata": {"name": "s"}, "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.1-10.6.0.100"]}})
        .to_string(),
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
            "metadata": {"name": "p"}, "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.10-10.6.0.20"]}})
        .to_string(),
    );
    let p = json_of(&cp, &["get", "spiderippool", "p"]);
    assert_eq!(p["spec"]["ipVersion"], 4);
    assert_eq!(
        p["metadata"]["labels"]["ipam.spidernet.io/owner-spider-subnet"],
        "s"
    );
    let out = cp.kubectl(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
            "metadata": {"name": "q"}, "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.15"]}})
        .to_string(),
    );
    assert!(
        !out.success && out.stderr.contains("overlap with IPPool p"),
        "{}",
        out.stderr
    );

    // The agent under its permissions: a node, two pods, ADD and DEL.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}).to_string(),
    );
    for name in ["web", "api"] {
        cp.kubectl_ok(
            &["apply", "-f", "-"],
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "registry.invalid/c"}]}})
            .to_string(),
        );
    }
    let socket = dir.path().join("agent.sock");
    let agent = Agent::start_with(
        "kubernetes",
        &socket,
        "n1",
        "",
        &[
            "--kubeconfig",
            agent_kc.to_str().unwrap(),
            "--ip-conflict-hold",
            "2s",
        ],
        None,
    );
    // The chart lets it watch the pods of its node (an ADD reads its pod from there).
    agent.wait_for_log(&["following the node's pods", "node=n1"], 1);
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["p"]}});
    let uid = |name: &str| {
        json_of(&cp, &["get", "pod", name])["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut api_ip = String::new();
    for name in ["web", "api"] {
        let mut add = CniCall::new("ADD", &format!("c-{name}"), name, &conf);
        add.args.push_str(&format!(";K8S_POD_UID={}", uid(name)));
        let out = add.run();
        assert!(out.success, "{}\n{}", out.stdout, agent.log());
        api_ip = out.json()["ips"][0]["address"]
            .as_str()
            .unwrap()
            .to_string();
    }
    assert_eq!(
        json_of(&cp, &["get", "spiderippool", "p"])["status"]["allocatedIPCount"],
        2
    );
    // api's address found in conflict: held back by a SpiderReservedIP (through the webhook)
    // and released; the hold (2 s here) is then swept.
    let api_ip = api_ip.split('/').next().unwrap().to_string();
    let (status, held) = spiderpool_testkit::request(
        &agent.socket,
        "DELETE",
        spiderpool_api::agent::PATH_IPS,
        &json!({"containerID": "c-api", "ifName": "eth0", "podNamespace": "default",
            "podName": "api", "podUID": uid("api"), "isReleaseConflictIPs": true,
            "conflicts": [{"ip": api_ip, "mac": "02:00:00:00:00:01"}]})
        .to_string(),
    );
    assert_eq!(status, 200, "{held}\n{}", agent.log());
    assert_eq!(held["released"], true, "{held}");
    let hold = held["heldBack"][0]["reservation"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        json_of(&cp, &["get", "spiderreservedip", &hold])["spec"]["ips"][0],
        api_ip.as_str()
    );
    assert_eq!(
        json_of(&cp, &["get", "spiderippool", "p"])["status"]["allocatedIPCount"],
        1
    );
    until("the conflict hold swept", || {
        (!cp.kubectl(&["get", "spiderreservedip", &hold], "").success).then_some(())
    });
    let out = CniCall::new("DEL", "c-api", "api", &conf).run();
    assert!(out.success, "{}\n{}", out.stdout, agent.log());

    // The controller reclaims a deleted pod's address and lets an emptied pool go.
    cp.kubectl_ok(&["delete", "pod", "web", "--grace-period=0", "--force"], "");
    until("web's address reclaimed", || {
        let p = json_of(&cp, &["get", "spiderippool", "p"]);
        (p["status"]["allocatedIPCount"] == 0).then_some(())
    });
    cp.kubectl_ok(&["delete", "spidersubnet", "s", "--wait=false"], "");
    until("the subnet and its pool gone", || {
        let gone = |k: &str, n: &str| !cp.kubectl(&["get", k, n], "").success;
        (gone("spiderippool", "p") && gone("spidersubnet", "s")).then_some(())
    });

    // The chart's SpiderCoordinator `default`, created by the leader through the webhooks
    // (upstream's defaults filled in), and its status: every source read under the chart's
    // permissions.
    let c = until("the coordinator synced", || {
        let c = cp.kubectl(&["get", "scc", "default", "-o", "json"], "");
        let c: serde_json::Value = serde_json::from_str(&c.stdout).ok()?;
        (c["status"]["phase"] == "Synced").then_some(c)
    });
    assert_eq!(
        (
            &c["spec"]["mode"],
            &c["spec"]["podCIDRType"],
            &c["spec"]["hijackCIDR"],
            &c["spec"]["hostRuleTable"],
            &c["spec"]["vethMTU"],
        ),
        (
            &json!("auto"),
            &json!("auto"),
            &json!(["169.254.0.0/16"]),
            &json!(500),
            &json!(1500)
        ),
        "{c}"
    );
    // ... and served by the agent to the coordinator plugin under its permissions.
    let (status, config) = spiderpool_testkit::request(
        &agent.socket,
        "POST",
        spiderpool_api::agent::PATH_COORDINATOR_CONFIG,
        r#"{"podNamespace": "default", "podName": "web"}"#,
    );
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["serviceCIDR"], json!(["10.233.0.0/18"]), "{config}");

    // Nothing either of them did was refused.
    for (who, log) in [("controller", ctl.log()), ("agent", agent.log())] {
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "the {who} was refused something:\n{log}"
        );
    }
}
