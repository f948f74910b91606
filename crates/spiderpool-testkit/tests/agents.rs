//! Several agents on one datastore: their cached views never hand out an address another agent
//! holds, and changes made with the CLI while they run take effect. Each scenario runs on SQLite
//! (agents on one host; every request checks the datastore's revision, so changes are seen at
//! once) and on etcd (agents on many hosts; views follow a watch, so a change is seen once the
//! watch has delivered it: the etcd runs wait for the agent to log that before going on, and
//! changes a commit guards — the pool's own spec — are seen at once there too).

use std::collections::HashSet;

use serde_json::json;
use spiderpool_testkit::{etcd_available, Agent, CniCall, Etcd, Sandbox};

/// Runs `scenario` on a SQLite sandbox and, where etcd is installed, on an etcd one; the flag
/// says whether the datastore is watched.
fn on_both(scenario: fn(&Sandbox, bool)) {
    // (SPIDERPOOL_TEST_DATASTORE=etcd makes the first one etcd too.)
    let sb = Sandbox::new();
    scenario(&sb, sb.datastore().starts_with("etcd://"));
    if etcd_available() {
        let etcd = Etcd::single();
        scenario(&Sandbox::on(etcd.datastore("/agents")), true);
    }
}

/// On a watched datastore, waits until `agent` has seen the change its log names.
fn heard(watched: bool, agent: &Agent, needles: &[&str]) {
    if watched {
        agent.wait_for_log(needles, 1);
    }
}

const POOL: &str = r#"
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: shared}
spec:
  subnet: 10.6.0.0/16
  ips: [10.6.0.10-10.6.0.59]
  gateway: 10.6.0.1
"#;

fn conf(socket: &std::path::Path) -> serde_json::Value {
    json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "spiderpool", "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["shared"]}})
}

fn add(socket: &std::path::Path, i: usize) -> String {
    let out = CniCall::new("ADD", &format!("c{i}"), &format!("p{i}"), &conf(socket)).run();
    assert!(out.success, "ADD {i}: {}{}", out.stdout, out.stderr);
    out.json()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn alternating_agents_never_share_an_address() {
    on_both(alternating);
}

fn alternating(sb: &Sandbox, watched: bool) {
    sb.apply(POOL);
    let a = sb.agent("node-a", "");
    let b = sb.agent("node-b", "");
    let mut seen = HashSet::new();
    for i in 0..10 {
        let agent = if i % 2 == 0 { &a } else { &b };
        if i > 0 {
            // The other agent's last claim has reached this one.
            heard(
                watched,
                agent,
                &[&format!("ip=10.6.0.{}", 9 + i), "held=true"],
            );
        }
        let ip = add(&agent.socket, i);
        assert!(seen.insert(ip.clone()), "{ip} handed out twice");
        assert_eq!(ip, format!("10.6.0.{}/16", 10 + i), "lowest free address");
    }
    // A release through one agent is seen by the other, even right after that other agent's
    // own allocation: the lowest address comes back.
    assert_eq!(add(&a.socket, 10), "10.6.0.20/16");
    let del = CniCall::new("DEL", "c3", "p3", &conf(&b.socket)).run();
    assert!(del.success);
    heard(watched, &a, &["ip=10.6.0.13", "held=false"]);
    assert_eq!(add(&a.socket, 100), "10.6.0.13/16");
    assert_eq!(sb.allocated("shared"), 11);
}

#[test]
fn concurrent_adds_through_two_agents_are_all_distinct() {
    on_both(concurrent);
}

fn concurrent(sb: &Sandbox, _watched: bool) {
    sb.apply(POOL);
    let a = sb.agent("node-a", "");
    let b = sb.agent("node-b", "");
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let socket = if i % 2 == 0 {
                a.socket.clone()
            } else {
                b.socket.clone()
            };
            std::thread::spawn(move || add(&socket, i))
        })
        .collect();
    let ips: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let unique: HashSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), 40, "duplicates in {ips:?}");
    assert_eq!(sb.allocated("shared"), 40);
}

#[test]
fn pool_changes_made_while_agents_run_take_effect() {
    on_both(pool_changes);
}

fn pool_changes(sb: &Sandbox, watched: bool) {
    sb.apply(POOL);
    let a = sb.agent("node-a", "");
    assert_eq!(add(&a.socket, 0), "10.6.0.10/16");
    // Exclude the next address: the claim is guarded by the pool's revision, so the agent
    // skips it at once even before it hears of the change.
    sb.apply(&format!("{POOL}  excludeIPs: [10.6.0.11]\n"));
    assert_eq!(add(&a.socket, 1), "10.6.0.12/16");
    // Reserve the next one.
    sb.apply(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderReservedIP\nmetadata: {name: r}\nspec: {ips: [10.6.0.13]}\n",
    );
    heard(watched, &a, &["spiderreservedips/r"]);
    assert_eq!(add(&a.socket, 2), "10.6.0.14/16");
    // Disabled (again guarded): nothing more is handed out, and the error says why.
    sb.apply(&format!("{POOL}  disable: true\n"));
    let out = CniCall::new("ADD", "c3", "p3", &conf(&a.socket)).run();
    assert!(!out.success);
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("shared: pool is disabled (spec.disable: true)"),
        "{msg}"
    );
    // Release still works on a disabled pool.
    assert!(
        CniCall::new("DEL", "c1", "p1", &conf(&a.socket))
            .run()
            .success
    );
    assert_eq!(sb.allocated("shared"), 2);
}

#[test]
fn an_address_an_endpoint_records_is_not_handed_out_though_the_pool_lost_it() {
    on_both(recorded);
}

/// Drops `pool`'s holder of `ip` straight in the datastore, leaving the pod's endpoint
/// record as it is: what a bad edit or a faulty tool does to a pool.
fn lose_holder(sb: &Sandbox, pool: &str, ip: &str) {
    let url: spiderpool_backends::DatastoreUrl =
        sb.datastore().parse().expect("the sandbox's datastore URL");
    let ip: std::net::IpAddr = ip.parse().expect("an address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let store = spiderpool_backends::open(&url)
            .await
            .expect("the datastore");
        let held = store.allocations(pool).await.expect("the pool's holders");
        let a = held
            .iter()
            .find(|a| a.ip == ip)
            .unwrap_or_else(|| panic!("{pool} holds no {ip}"));
        store
            .commit(vec![spiderpool_store::Op::Release {
                pool: pool.into(),
                ip,
                container_id: a.holder.container_id.clone(),
                nic: a.holder.nic.clone(),
                pod_uid: a.holder.pod_uid.clone(),
            }])
            .await
            .expect("the release");
    });
}

/// A pod's record names an address its pool's holders lost (an edit, a faulty tool, a
/// compromised node): the agent passes over it, says why, and hands it out again once no record
/// names it.
fn recorded(sb: &Sandbox, _watched: bool) {
    sb.apply(POOL);
    let a = sb.agent("node-a", "");
    // Where a watch follows the records, the agent has heard of each change before the ADD.
    let follows = !sb.datastore().starts_with("sqlite://");
    if follows {
        a.wait_for_log(&["following the endpoint records"], 1);
    }
    assert_eq!(add(&a.socket, 0), "10.6.0.10/16");
    if follows {
        a.wait_for_log(&["an endpoint record changed", "default/p0"], 1);
    }
    lose_holder(sb, "shared", "10.6.0.10");
    assert_eq!(sb.allocated("shared"), 0, "the pool lost its holder");
    assert_eq!(add(&a.socket, 1), "10.6.0.11/16");
    a.wait_for_log(
        &[
            "not handing out an address the pool's holders lost",
            "10.6.0.10",
            "default/p0",
        ],
        1,
    );
    // The record goes with its pod: the address is free again.
    let del = CniCall::new("DEL", "c0", "p0", &conf(&a.socket)).run();
    assert!(del.success, "{}{}", del.stdout, del.stderr);
    if follows {
        a.wait_for_log(&["an endpoint record changed", "default/p0"], 2);
    }
    assert_eq!(add(&a.socket, 2), "10.6.0.10/16");
    assert_eq!(sb.allocated("shared"), 2);
}

/// `POST /v1/coordinator/config` on the agent's socket.
fn coordinator_config(agent: &Agent, namespace: &str, pod: &str) -> (u16, serde_json::Value) {
    spiderpool_testkit::request(
        &agent.socket,
        "POST",
        spiderpool_api::agent::PATH_COORDINATOR_CONFIG,
        &json!({"podNamespace": namespace, "podName": pod}).to_string(),
    )
}

#[test]
fn the_coordinator_plugin_gets_the_coordinators_settings_and_the_pods_default_route_nic() {
    let sb = Sandbox::new();
    let agent = sb.agent("node-a", "zone=a");
    // No SpiderCoordinator: not available, saying what to do.
    let (status, body) = coordinator_config(&agent, "default", "web");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], 50, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains(
            "coordinator config not found: no SpiderCoordinator (apply one named \"default\")"
        ),
        "{body}"
    );
    sb.apply(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderCoordinator\nmetadata: {name: default}\n\
         spec: {podCIDRType: none, mode: underlay, podDefaultRouteNIC: eth0, hijackCIDR: [169.254.25.10]}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: default\n  uid: 5e1f0000-0000-4000-8000-000000000001\n  \
         annotations: {ipam.spidernet.io/default-route-nic: net1}\nspec: {nodeName: node-a, containers: [{name: c, image: x}]}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\n  namespace: default\n  uid: 5e1f0000-0000-4000-8000-000000000002\n  \
         annotations: {ipam.spidernet.io/default-route-nic: 'eth0/../x'}\nspec: {nodeName: node-a, containers: [{name: c, image: x}]}\n",
    );
    let mut services = json!([]);
    if let Some(cp) = sb.cluster() {
        // In a cluster the controller writes the status; until it is Synced, nothing is served.
        let (status, body) = coordinator_config(&agent, "default", "web");
        assert_eq!(status, 503, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains(
                "spidercoordinator: default not ready (phase \"\"): the controller has not written its status yet"
            ),
            "{body}"
        );
        cp.kubectl_ok(
            &[
                "patch",
                "scc",
                "default",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"phase":"Synced","serviceCIDR":["10.233.0.0/18"],"overlayPodCIDR":[]}}"#,
            ],
            "",
        );
        services = json!(["10.233.0.0/18"]);
    }
    let (status, body) = coordinator_config(&agent, "default", "web");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"mode": "underlay", "overlayPodCIDR": [], "serviceCIDR": services,
            "hijackCIDR": ["169.254.25.10/32"], "policyRoutes": [], "podMACPrefix": "",
            "tunePodRoutes": true, "podDefaultRouteNIC": "net1", "hostRuleTable": 500,
            "hostRPFilter": 0, "podRPFilter": 0, "txQueueLen": 0, "vethLinkAddress": "",
            "vethMTU": 1500, "detectIPConflict": false, "detectGateway": false})
    );
    // Without the annotation (or without a Pod object), the coordinator's NIC.
    let (_, body) = coordinator_config(&agent, "default", "other");
    assert_eq!(body["podDefaultRouteNIC"], "eth0", "{body}");
    // Upstream's switches on the agent are the IPAM plugin's (its ADD answer says to probe):
    // the coordinator probes again only when its own settings say so.
    let probing = sb.agent_with(
        "node-b",
        "",
        &[
            "--enable-ip-conflict-detection=true",
            "--enable-gateway-detection=true",
        ],
    );
    let (_, body) = coordinator_config(&probing, "default", "other");
    assert_eq!(
        (&body["detectIPConflict"], &body["detectGateway"]),
        (&json!(false), &json!(false)),
        "{body}"
    );
    // A bad annotation is refused by name.
    let (status, body) = coordinator_config(&agent, "default", "bad");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("pod default/bad: annotation ipam.spidernet.io/default-route-nic")
            && body["message"].as_str().unwrap().contains("eth0/../x"),
        "{body}"
    );
}
