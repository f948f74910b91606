//! The real `spiderpool` binary driven as a runtime would: per spec version, repeated calls,
//! and every kind of bad input, each answered with the right CNI error code and a message that
//! names the bad value, leaving the datastore as it was.

use serde_json::{json, Value};
use spiderpool_testkit::{Agent, CniCall, Sandbox};

const POOLS: &str = r#"
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: pool-a}
spec:
  subnet: 10.6.0.0/16
  ips: [10.6.168.60-10.6.168.62]
  gateway: 10.6.0.1
---
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: pool-v6}
spec:
  subnet: fd00:6::/64
  ips: [fd00:6::10-fd00:6::20]
  gateway: fd00:6::1
---
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: tiny}
spec:
  subnet: 10.9.0.0/24
  ips: [10.9.0.10]
"#;

struct Env {
    sb: Sandbox,
    agent: Agent,
}

fn setup() -> Env {
    let sb = Sandbox::new();
    sb.apply(POOLS);
    let agent = sb.agent("node-1", "zone=a");
    Env { sb, agent }
}

fn conf(env: &Env, version: &str, ipam: Value) -> Value {
    let mut ipam_obj = json!({"type": "spiderpool", "ipam_unix_socket_path": env.agent.socket});
    for (k, v) in ipam.as_object().unwrap() {
        ipam_obj[k] = v.clone();
    }
    json!({"cniVersion": version, "name": "macvlan-conf", "type": "macvlan", "ipam": ipam_obj})
}

/// What a user could observe of the datastore: pools with their holders, and endpoints.
fn snapshot(sb: &Sandbox) -> Value {
    let strip = |mut v: Value| {
        for item in v["items"].as_array_mut().unwrap() {
            item["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("resourceVersion");
        }
        v
    };
    let pools = sb.ctl(&["get", "ippool", "-o", "json"], "");
    let eps = sb.ctl(&["get", "endpoint", "-o", "json"], "");
    json!([strip(pools.json()), strip(eps.json())])
}

fn expect_error(out: &spiderpool_testkit::Output, code: u64, needle: &str) {
    assert!(
        !out.success,
        "expected failure, got success: {}",
        out.stdout
    );
    let j = out.json();
    assert_eq!(j["code"], code, "wrong code in {j}");
    let msg = j["msg"].as_str().unwrap();
    assert!(
        msg.contains(needle),
        "message {msg:?} does not name {needle:?}"
    );
    assert!(
        j["cniVersion"].is_string(),
        "error JSON has cniVersion: {j}"
    );
}

#[test]
fn add_check_del_for_every_supported_version() {
    let env = setup();
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let c = conf(&env, version, json!({"default_ipv4_ippool": ["pool-a"]}));
        let container = format!("ctr-{i}");
        let pod = format!("pod-{i}");
        let add = CniCall::new("ADD", &container, &pod, &c).run();
        assert!(add.success, "{version}: {}{}", add.stdout, add.stderr);
        let r = add.json();
        assert_eq!(r["cniVersion"], *version);
        let ip = &r["ips"][0];
        assert_eq!(
            ip["address"], "10.6.168.60/16",
            "{version}: lowest free address"
        );
        assert_eq!(ip["gateway"], "10.6.0.1");
        if version.starts_with('0') {
            assert_eq!(ip["version"], "4", "{version} results carry ips[].version");
        } else {
            assert!(
                ip.get("version").is_none(),
                "{version} results have no ips[].version"
            );
        }
        assert_eq!(r["routes"], json!([{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}]));
        assert!(
            r.get("interfaces").is_none(),
            "an IPAM result has no interfaces"
        );

        // ADD repeated for the same container and NIC: the same answer, nothing more taken.
        let again = CniCall::new("ADD", &container, &pod, &c).run();
        assert_eq!(again.json(), r);
        assert_eq!(env.sb.allocated("pool-a"), 1);

        if *version != "0.3.0" && *version != "0.3.1" {
            let mut check = CniCall::new("CHECK", &container, &pod, &c);
            let mut with_prev = c.clone();
            with_prev["prevResult"] = r.clone();
            check.stdin = with_prev.to_string();
            let out = check.run();
            assert!(out.success, "{version} CHECK: {}{}", out.stdout, out.stderr);
            assert_eq!(out.stdout, "", "CHECK prints nothing on success");
        }

        let del = CniCall::new("DEL", &container, &pod, &c).run();
        assert!(del.success, "{version} DEL: {}", del.stdout);
        assert_eq!(del.stdout, "");
        assert_eq!(env.sb.allocated("pool-a"), 0);
        let del_again = CniCall::new("DEL", &container, &pod, &c).run();
        assert!(
            del_again.success,
            "repeated DEL succeeds: {}",
            del_again.stdout
        );
    }
}

#[test]
fn version_lists_the_supported_versions() {
    let env = setup();
    let mut call = CniCall::new("VERSION", "x", "x", &conf(&env, "0.4.0", json!({})));
    call.container_id = None;
    let out = call.run();
    assert!(out.success);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn bad_input_gets_the_right_code_and_leaves_the_datastore_alone() {
    let env = setup();
    let good = conf(&env, "1.0.0", json!({"default_ipv4_ippool": ["pool-a"]}));
    // One pod holds an address throughout, so "unchanged" is about real data.
    assert!(CniCall::new("ADD", "holder", "holder", &good).run().success);
    let before = snapshot(&env.sb);

    let mut c = CniCall::new("ADD", "c1", "p1", &good);
    c.stdin = "{\"cniVersion\": \"1.0.0\", \"ipam\": ".into();
    expect_error(&c.run(), 6, "decoding the network configuration on stdin");

    let mut c = CniCall::new("ADD", "c1", "p1", &good);
    c.command = None;
    expect_error(&c.run(), 4, "CNI_COMMAND");

    let mut c = CniCall::new("ADD", "c1", "p1", &good);
    c.command = Some("FROB".into());
    expect_error(&c.run(), 4, "\"FROB\"");

    let mut c = CniCall::new("ADD", "c1", "p1", &good);
    c.container_id = None;
    expect_error(&c.run(), 4, "CNI_CONTAINERID");

    let mut c = CniCall::new("ADD", "c1", "p1", &good);
    c.ifname = None;
    expect_error(&c.run(), 4, "CNI_IFNAME");

    let mut c = CniCall::new("ADD", "c1", "p1", &good);
    c.netns = None;
    expect_error(&c.run(), 4, "CNI_NETNS");

    let c = CniCall::new("ADD", "c1", "p1", &conf(&env, "0.2.0", json!({})));
    expect_error(&c.run(), 1, "\"0.2.0\"");

    let c = CniCall::new(
        "ADD",
        "c1",
        "p1",
        &conf(
            &env,
            "1.0.0",
            json!({"default_ipv4_ippool": ["no-such-pool"]}),
        ),
    );
    expect_error(&c.run(), 7, "\"no-such-pool\"");

    let c = CniCall::new("ADD", "c1", "p1", &conf(&env, "1.0.0", json!({})));
    expect_error(&c.run(), 100, "no IPPool for pod default/p1");

    let mut c = CniCall::new("ADD", "c1", "p1", &good);
    c.args = "K8S_POD_NAME".into();
    expect_error(&c.run(), 4, "\"K8S_POD_NAME\"");

    // CHECK of a container that holds nothing.
    let c = CniCall::new("CHECK", "ghost", "ghost", &good);
    expect_error(&c.run(), 3, "ghost");
    // CHECK is not defined before 0.4.0.
    let c = CniCall::new("CHECK", "holder", "holder", &conf(&env, "0.3.1", json!({})));
    expect_error(&c.run(), 1, "\"0.3.1\"");
    // CHECK against a prevResult that differs from the reservation.
    let mut c = CniCall::new("CHECK", "holder", "holder", &good);
    let mut with_prev = good.clone();
    with_prev["prevResult"] =
        json!({"cniVersion": "1.0.0", "ips": [{"address": "10.6.168.99/16"}]});
    c.stdin = with_prev.to_string();
    expect_error(&c.run(), 101, "10.6.168.99/16");

    assert_eq!(snapshot(&env.sb), before, "bad input changed the datastore");
}

#[test]
fn exhausted_pool_is_named() {
    let env = setup();
    let c = conf(&env, "1.0.0", json!({"default_ipv4_ippool": ["tiny"]}));
    let first = CniCall::new("ADD", "c1", "p1", &c).run();
    assert_eq!(first.json()["ips"][0]["address"], "10.9.0.10/24");
    let before = snapshot(&env.sb);
    let out = CniCall::new("ADD", "c2", "p2", &c).run();
    expect_error(&out, 100, "tiny: exhausted (1 of 1 addresses in use)");
    assert!(out.json()["msg"]
        .as_str()
        .unwrap()
        .starts_with("spiderpool IP allocation error: "));
    assert_eq!(snapshot(&env.sb), before);
}

#[test]
fn agent_not_running_means_try_again_later() {
    let mut env = setup();
    let c = conf(&env, "1.0.0", json!({"default_ipv4_ippool": ["pool-a"]}));
    assert!(CniCall::new("ADD", "c1", "p1", &c).run().success);
    env.agent.kill();
    let before = snapshot(&env.sb);
    let socket = env.agent.socket.display().to_string();
    expect_error(&CniCall::new("ADD", "c2", "p2", &c).run(), 11, &socket);
    // DEL must not pretend success while it cannot release: the runtime retries.
    expect_error(&CniCall::new("DEL", "c1", "p1", &c).run(), 11, &socket);
    assert_eq!(snapshot(&env.sb), before);
}

#[test]
fn pod_annotation_dual_stack_and_bad_annotation() {
    let env = setup();
    env.sb.apply(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: dual
  namespace: default
  annotations:
    ipam.spidernet.io/ippool: '{"ipv4": ["pool-a"], "ipv6": ["pool-v6"]}'
spec: {containers: [{name: c, image: registry.invalid/c}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: broken
  namespace: default
  annotations:
    ipam.spidernet.io/ippool: '{"ipv4": "pool-a"}'
spec: {containers: [{name: c, image: registry.invalid/c}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: clean
  namespace: default
  annotations:
    ipam.spidernet.io/ippool: '{"ipv6": ["pool-v6"], "cleangateway": true}'
spec: {containers: [{name: c, image: registry.invalid/c}]}
"#,
    );
    let c = conf(&env, "0.4.0", json!({}));
    let out = CniCall::new("ADD", "c-dual", "dual", &c).run();
    let r = out.json();
    assert_eq!(
        r["ips"],
        json!([
            {"version": "4", "address": "10.6.168.60/16", "gateway": "10.6.0.1"},
            {"version": "6", "address": "fd00:6::10/64", "gateway": "fd00:6::1"}
        ])
    );
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}, {"dst": "::/0", "gw": "fd00:6::1"}])
    );
    let out = CniCall::new("ADD", "c-clean", "clean", &c).run();
    assert_eq!(out.json()["ips"][0]["address"], "fd00:6::11/64");
    assert_eq!(
        out.json()["routes"],
        json!([]),
        "cleangateway drops the default route"
    );

    let before = snapshot(&env.sb);
    let out = CniCall::new("ADD", "c-broken", "broken", &c).run();
    expect_error(&out, 7, "ipam.spidernet.io/ippool");
    assert_eq!(snapshot(&env.sb), before);

    // DEL of the dual-stack pod gives both families back.
    assert!(CniCall::new("DEL", "c-dual", "dual", &c).run().success);
    assert_eq!(env.sb.allocated("pool-a"), 0);
    assert_eq!(env.sb.allocated("pool-v6"), 1);
}

#[test]
fn stale_del_from_an_old_container_frees_nothing() {
    let env = setup();
    let c = conf(&env, "1.0.0", json!({"default_ipv4_ippool": ["pool-a"]}));
    let first = CniCall::new("ADD", "sandbox-1", "web", &c).run();
    assert_eq!(first.json()["ips"][0]["address"], "10.6.168.60/16");
    // The runtime recreates the sandbox of the same pod: the old address is given back and
    // the new sandbox takes the lowest free one again.
    let second = CniCall::new("ADD", "sandbox-2", "web", &c).run();
    assert_eq!(second.json()["ips"][0]["address"], "10.6.168.60/16");
    // A late DEL for the first sandbox must not free what the second holds.
    assert!(CniCall::new("DEL", "sandbox-1", "web", &c).run().success);
    assert_eq!(env.sb.allocated("pool-a"), 1);
    let other = CniCall::new("ADD", "sandbox-3", "other", &c).run();
    assert_eq!(other.json()["ips"][0]["address"], "10.6.168.61/16");
}

/// `text` as Rust's `{:?}` shows it in a message, without the quotes.
fn shown(text: &str) -> String {
    let q = format!("{text:?}");
    q[1..q.len() - 1].to_string()
}

#[test]
fn malformed_container_ids_and_ifnames_are_refused_before_anything_else() {
    let env = setup();
    let good = conf(&env, "1.0.0", json!({"default_ipv4_ippool": ["pool-a"]}));
    // The victim: a pod whose address a malformed call must not touch.
    assert!(CniCall::new("ADD", "holder", "holder", &good).run().success);
    let before = snapshot(&env.sb);
    let long = "a".repeat(4096);
    let ids = [
        ("a/b", shown("a/b")),
        ("holder\n", shown("holder\n")),
        ("a\nb", shown("a\nb")),
        (long.as_str(), shown(&long[..32])),
        ("x y\"'é😀;", shown("x y\"'é😀;")),
        ("../holder", shown("../holder")),
    ];
    let ifnames = ["twenty-characters-xx", "../x"];
    for cmd in ["ADD", "DEL", "CHECK"] {
        for (id, needle) in &ids {
            let out = CniCall::new(cmd, id, "holder", &good).run();
            expect_error(&out, 4, needle);
            expect_error(&out, 4, "CNI_CONTAINERID");
        }
        for ifname in ifnames {
            let out = CniCall::new(cmd, "holder", "holder", &good)
                .ifname(ifname)
                .run();
            expect_error(&out, 4, &format!("{ifname:?}"));
            expect_error(&out, 4, "CNI_IFNAME");
        }
    }
    // The environment is judged first, as libcni judges it: broken stdin does not hide it.
    let mut c = CniCall::new("ADD", "a/b", "p1", &good);
    c.stdin = "{\"cniVersion\": ".into();
    expect_error(&c.run(), 4, "\"a/b\"");

    assert_eq!(
        env.sb.allocated("pool-a"),
        1,
        "the victim keeps its address"
    );
    assert_eq!(snapshot(&env.sb), before, "bad input changed the datastore");
    let check = CniCall::new("CHECK", "holder", "holder", &good).run();
    assert!(check.success, "the victim still holds: {}", check.stdout);
}

#[test]
fn malformed_pod_namespace_and_name_in_cni_args_are_refused() {
    let env = setup();
    let good = conf(&env, "1.0.0", json!({"default_ipv4_ippool": ["pool-a"]}));
    assert!(CniCall::new("ADD", "holder", "holder", &good).run().success);
    let before = snapshot(&env.sb);
    for cmd in ["ADD", "DEL", "CHECK"] {
        for (args, key, value) in [
            (
                "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b/c",
                "K8S_POD_NAME",
                "\"b/c\"",
            ),
            (
                "K8S_POD_NAMESPACE=a/b;K8S_POD_NAME=c",
                "K8S_POD_NAMESPACE",
                "\"a/b\"",
            ),
            (
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=Holder",
                "K8S_POD_NAME",
                "\"Holder\"",
            ),
        ] {
            let mut c = CniCall::new(cmd, "holder", "holder", &good);
            c.args = format!("IgnoreUnknown=1;{args};K8S_POD_INFRA_CONTAINER_ID=holder");
            let out = c.run();
            // Refused by the plugin itself, which names the variable it read the value from.
            expect_error(&out, 4, "CNI_ARGS");
            expect_error(&out, 4, key);
            expect_error(&out, 4, value);
        }
    }

    assert_eq!(
        env.sb.allocated("pool-a"),
        1,
        "the victim keeps its address"
    );
    assert_eq!(snapshot(&env.sb), before, "bad input changed the datastore");
}

#[test]
fn check_with_a_prev_result_that_is_not_a_result_is_a_decoding_failure() {
    let env = setup();
    let good = conf(&env, "1.0.0", json!({"default_ipv4_ippool": ["pool-a"]}));
    assert!(CniCall::new("ADD", "holder", "holder", &good).run().success);
    let before = snapshot(&env.sb);
    for (prev, needle) in [
        (json!("10.6.168.60/16"), "prevResult \"10.6.168.60/16\""),
        (json!(42), "prevResult 42"),
        (json!([1, 2]), "prevResult [1,2]"),
        (
            json!({"ips": "10.6.168.60/16"}),
            "prevResult.ips \"10.6.168.60/16\"",
        ),
        (json!({"ips": [7]}), "prevResult.ips[0] 7"),
    ] {
        let mut c = CniCall::new("CHECK", "holder", "holder", &good);
        let mut with_prev = good.clone();
        with_prev["prevResult"] = prev;
        c.stdin = with_prev.to_string();
        let out = c.run();
        expect_error(&out, 6, needle);
        expect_error(&out, 6, "decoding");
    }
    assert_eq!(snapshot(&env.sb), before, "bad input changed the datastore");
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn numbered(path: &std::path::Path, n: u32) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    s.into()
}

#[test]
fn the_log_file_is_rotated_past_its_max_size_and_keeps_max_count() {
    let env = setup();
    let dir = env.sb.dir.path().join("log");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("spiderpool.log");
    let filler = "x".repeat(1024 * 1024 + 10);
    std::fs::write(&path, &filler).unwrap();
    std::fs::write(numbered(&path, 1), "old-1").unwrap();
    std::fs::write(numbered(&path, 2), "old-2").unwrap();
    let c = conf(
        &env,
        "1.0.0",
        json!({"default_ipv4_ippool": ["pool-a"], "log_file_path": path,
               "log_file_max_size": 1, "log_file_max_count": 2}),
    );
    let add = CniCall::new("ADD", "c1", "p1", &c).run();
    assert!(add.success, "{}{}", add.stdout, add.stderr);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert_eq!(read(&numbered(&path, 1)), filler, "the full file became .1");
    assert_eq!(read(&numbered(&path, 2)), "old-1");
    assert!(
        !numbered(&path, 3).exists(),
        "at most log_file_max_count rotated files"
    );
    let fresh = read(&path);
    assert!(
        fresh.contains("ADD"),
        "the call logged to a new file: {fresh:?}"
    );
    assert_eq!(mode(&path), 0o600);

    // Below the size, the file is appended to, not rotated.
    assert!(CniCall::new("DEL", "c1", "p1", &c).run().success);
    assert_eq!(read(&numbered(&path, 1)), filler);
    assert!(read(&path).starts_with(&fresh) && read(&path).len() > fresh.len());

    // Rotated files untouched for longer than log_file_max_age days are removed.
    let aged = dir.join("aged.log");
    std::fs::write(&aged, "small").unwrap();
    let forty_days = std::time::Duration::from_secs(40 * 86_400);
    for (n, old) in [(1, false), (2, true), (3, true)] {
        let f = std::fs::File::create(numbered(&aged, n)).unwrap();
        if old {
            f.set_modified(std::time::SystemTime::now() - forty_days)
                .unwrap();
        }
    }
    let c = conf(
        &env,
        "1.0.0",
        json!({"log_file_path": aged, "log_file_max_age": 30}),
    );
    assert!(CniCall::new("DEL", "c2", "p2", &c).run().success);
    assert!(numbered(&aged, 1).exists(), "a fresh rotated file stays");
    assert!(!numbered(&aged, 2).exists() && !numbered(&aged, 3).exists());
    assert_eq!(
        read(&aged).get(..5),
        Some("small"),
        "no rotation below the size"
    );
}

#[test]
fn bad_log_rotation_values_are_invalid_config_naming_key_and_value() {
    let env = setup();
    let good = conf(&env, "1.0.0", json!({"default_ipv4_ippool": ["pool-a"]}));
    assert!(CniCall::new("ADD", "holder", "holder", &good).run().success);
    let before = snapshot(&env.sb);
    let log = env.sb.dir.path().join("bad.log");
    for (key, value, needle) in [
        ("log_file_max_size", json!(-1), "log_file_max_size -1"),
        (
            "log_file_max_size",
            json!("100"),
            "log_file_max_size \"100\"",
        ),
        ("log_file_max_age", json!(1.5), "log_file_max_age 1.5"),
        ("log_file_max_age", json!("x"), "log_file_max_age \"x\""),
        ("log_file_max_count", json!(-3), "log_file_max_count -3"),
    ] {
        let c = conf(
            &env,
            "1.0.0",
            json!({"default_ipv4_ippool": ["pool-a"], "log_file_path": log, key: value}),
        );
        for cmd in ["ADD", "DEL"] {
            let who = if cmd == "ADD" { "c1" } else { "holder" };
            expect_error(&CniCall::new(cmd, who, who, &c).run(), 7, needle);
        }
    }
    assert!(!log.exists(), "a refused config opens no log file");
    assert_eq!(
        env.sb.allocated("pool-a"),
        1,
        "the victim keeps its address"
    );
    assert_eq!(snapshot(&env.sb), before, "bad input changed the datastore");
}

#[test]
fn the_log_file_and_its_directories_get_fixed_modes_whatever_the_umask() {
    let env = setup();
    let top = env.sb.dir.path().join("logs");
    let path = top.join("spidernet").join("spiderpool.log");
    let c = conf(
        &env,
        "1.0.0",
        json!({"default_ipv4_ippool": ["pool-a"], "log_file_path": path}),
    );
    let call = CniCall::new("ADD", "c1", "p1", &c);
    // The runtime's umask 000 would make 0777 directories and a 0666 file.
    let out = call.run_via(&["sh", "-c", "umask 000; exec \"$0\""]);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.json()["ips"][0]["address"], "10.6.168.60/16");
    assert_eq!(mode(&top), 0o750);
    assert_eq!(mode(&top.join("spidernet")), 0o750);
    assert_eq!(mode(&path), 0o600);
    assert!(std::fs::read_to_string(&path).unwrap().contains("ADD"));
}
