//! The hardening issue's attacks and inputs, through the real binaries: each is refused (or
//! repaired), the datastore is left as it was, and the victim's address stays its own.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use spiderpool_testkit::{bin, healthy, is_root, request, run, Agent, CniCall, Output, Sandbox};

const POOL: &str = r#"
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: p}
spec:
  subnet: 10.20.0.0/16
  ips: [10.20.1.1-10.20.1.9]
  gateway: 10.20.0.1
"#;

fn conf(socket: &Path) -> Value {
    json!({"cniVersion": "1.1.0", "name": "net", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["p"]}})
}

/// A CNI call for pod `ns/name` (or a bare container when `name` is empty) with `uid`.
fn call(cmd: &str, socket: &Path, ctr: &str, ns: &str, name: &str, uid: &str) -> CniCall {
    let mut c = CniCall::new(cmd, ctr, name, &conf(socket));
    c.args = if name.is_empty() {
        String::new()
    } else {
        format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}")
    };
    c
}

fn ip(out: &Output) -> String {
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    out.json()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .to_string()
}

/// (code, msg) of a failed plugin call.
fn failure(out: &Output) -> (u64, String) {
    assert!(!out.success, "expected a failure: {}", out.stdout);
    let v = out.json();
    (
        v["code"].as_u64().unwrap(),
        v["msg"].as_str().unwrap().to_string(),
    )
}

/// CHECK of `ctr`'s reservation with the result its ADD gave.
fn check_holds(socket: &Path, ctr: &str, ns: &str, name: &str, added: &Output) {
    let mut c = call("CHECK", socket, ctr, ns, name, "");
    let mut conf = conf(socket);
    conf["prevResult"] = added.json();
    c.stdin = conf.to_string();
    let out = c.run();
    assert!(out.success, "CHECK {ctr}: {}{}", out.stdout, out.stderr);
}

fn add_body(ctr: &str, ns: &str, name: &str, uid: &str) -> String {
    json!({"containerID": ctr, "ifName": "eth0", "podNamespace": ns, "podName": name,
        "podUID": uid, "defaultIPv4IPPool": ["p"]})
    .to_string()
}

#[test]
fn crafted_pod_names_and_bare_containers_never_share_an_address() {
    let sb = Sandbox::new();
    sb.apply(POOL);
    let agent = sb.agent("node-1", "");
    let s = &agent.socket;
    // The pod key must be unambiguous: namespace and name are checked as Kubernetes does.
    for (ns, name) in [("a", "b/c"), ("a/b", "c"), ("A", "c"), ("a", "x y")] {
        let out = call("ADD", s, "c1", ns, name, "u1").run();
        let (code, msg) = failure(&out);
        assert_eq!(code, 4, "{ns}/{name}: {msg}");
        // The agent refuses them too, whoever asks it.
        let (status, body) = request(s, "POST", "/v1/ipam/ip", &add_body("c1", ns, name, "u1"));
        assert_eq!((status, body["code"].as_u64()), (400, Some(4)), "{body}");
    }
    // Container IDs and interface names as libcni and the kernel take them.
    let long = "a".repeat(4096);
    for ctr in ["a/b", "x\ny", long.as_str(), "x y\"'é😀;"] {
        let (code, _) = failure(&call("ADD", s, ctr, "default", "p1", "u1").run());
        assert_eq!(code, 4, "{ctr:?}");
        let (status, body) = request(
            s,
            "POST",
            "/v1/ipam/ip",
            &add_body(ctr, "default", "p1", "u1"),
        );
        assert_eq!((status, body["code"].as_u64()), (400, Some(4)), "{body}");
    }
    for nic in ["twenty-characters-xx", "../x", "a b"] {
        let body = json!({"containerID": "c1", "ifName": nic, "podNamespace": "default",
            "podName": "p1", "defaultIPv4IPPool": ["p"]});
        let (status, body) = request(s, "POST", "/v1/ipam/ip", &body.to_string());
        assert_eq!(
            (status, body["code"].as_u64()),
            (400, Some(4)),
            "{nic}: {body}"
        );
    }
    assert_eq!(sb.allocated("p"), 0, "nothing was handed out");

    // A bare container named like a pod lives in its own key space.
    let pod = call("ADD", s, "c-web", "default", "web", "uid-web").run();
    assert_eq!(ip(&pod), "10.20.1.1/16");
    let bare = call("ADD", s, "web", "", "", "").run();
    assert_eq!(ip(&bare), "10.20.1.2/16");
    check_holds(s, "c-web", "default", "web", &pod);
    check_holds(s, "web", "", "", &bare);
    assert_eq!(sb.allocated("p"), 2);
    // The bare container's DEL frees its own address only.
    assert!(call("DEL", s, "web", "", "", "").run().success);
    check_holds(s, "c-web", "default", "web", &pod);
    assert_eq!(sb.allocated("p"), 1);
}

#[test]
fn a_new_uid_never_takes_a_live_pods_addresses() {
    let sb = Sandbox::new();
    sb.apply(POOL);
    let agent = sb.agent("node-1", "");
    let s = &agent.socket;
    let victim = call("ADD", s, "v1", "default", "victim", "uid-1").run();
    assert_eq!(ip(&victim), "10.20.1.1/16");
    // Another container claiming the victim's name with a new UID is refused...
    let (code, msg) = failure(&call("ADD", s, "x1", "default", "victim", "uid-2").run());
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("\"uid-1\"") && msg.contains("v1"), "{msg}");
    // ...and so is the same request straight to the socket.
    let (status, body) = request(
        s,
        "POST",
        "/v1/ipam/ip",
        &add_body("x2", "default", "victim", "uid-3"),
    );
    assert_eq!(status, 409, "{body}");
    check_holds(s, "v1", "default", "victim", &victim);
    assert_eq!(sb.allocated("p"), 1);
    let ep = sb.get_json("endpoint", "default/victim");
    assert_eq!(ep["status"]["current"]["uid"], "uid-1");

    // Once the Pod object says the new incarnation is the live one, the old record is stale.
    sb.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: victim, namespace: default, uid: uid-2}\nspec: {nodeName: node-1}\n",
    );
    assert_eq!(
        ip(&call("ADD", s, "x1", "default", "victim", "uid-2").run()),
        "10.20.1.1/16"
    );
    assert_eq!(sb.allocated("p"), 1);
    assert_eq!(
        sb.get_json("endpoint", "default/victim")["status"]["current"]["uid"],
        "uid-2"
    );
}

#[test]
fn validation_errors_are_http_400_and_keep_the_cni_code() {
    let sb = Sandbox::new();
    sb.apply(POOL);
    let agent = sb.agent("node-1", "");
    let body = json!({"containerID": "c1", "ifName": "eth0", "podNamespace": "default",
        "podName": "p1", "defaultIPv4IPPool": ["missing"]});
    let (status, body) = request(&agent.socket, "POST", "/v1/ipam/ip", &body.to_string());
    assert_eq!((status, body["code"].as_u64()), (400, Some(7)), "{body}");
    assert!(body["message"].as_str().unwrap().contains("missing"));
}

/// A directory `nobody` can traverse, holding a copy of the plugin it may run.
struct World {
    dir: tempfile::TempDir,
    plugin: PathBuf,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let plugin = dir.path().join("spiderpool");
        std::fs::copy(bin("spiderpool"), &plugin).unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        World { dir, plugin }
    }

    /// Runs the plugin as uid/gid 65534 (`nobody`), with `groups` as supplementary groups.
    fn as_nobody(&self, c: &CniCall, groups: &str) -> Output {
        let groups = if groups.is_empty() {
            "--clear-groups".to_string()
        } else {
            format!("--groups={groups}")
        };
        c.run_program_via(
            &self.plugin,
            &["setpriv", "--reuid=65534", "--regid=65534", &groups],
        )
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn a_hostile_local_user_cannot_reach_or_use_the_socket() {
    if !is_root() {
        eprintln!("skipped: needs root to run as another user (CI runs it)");
        return;
    }
    let sb = Sandbox::new();
    sb.apply(POOL);
    let world = World::new();
    let socket = world.dir.path().join("run/spidernet/agent.sock");
    // Under umask 000 the agent's directories and socket still get their fixed modes.
    let agent = Agent::start_with(
        &sb.datastore(),
        &socket,
        "node-1",
        "",
        &["--socket-group", "4242"],
        Some("umask 000"),
    );
    let run_dir = world.dir.path().join("run");
    for d in [run_dir.clone(), run_dir.join("spidernet")] {
        assert_eq!(mode(&d), 0o750, "{}", d.display());
        assert_eq!(std::fs::metadata(&d).unwrap().gid(), 4242);
    }
    assert_eq!(mode(&socket), 0o660);
    assert_eq!(std::fs::metadata(&socket).unwrap().gid(), 4242);

    let victim = call("ADD", &socket, "v1", "default", "victim", "uid-1").run();
    assert_eq!(ip(&victim), "10.20.1.1/16");
    let gc = |c: &mut CniCall| {
        let mut conf = conf(&socket);
        conf["cni.dev/valid-attachments"] = json!([]);
        c.stdin = conf.to_string();
    };
    let attacks = || {
        let mut g = call("GC", &socket, "x", "", "", "");
        gc(&mut g);
        [
            call("DEL", &socket, "v1", "default", "victim", "uid-1"),
            call("ADD", &socket, "x1", "default", "victim", "uid-2"),
            g,
        ]
    };
    // The directory keeps nobody out...
    for c in attacks() {
        let out = world.as_nobody(&c, "");
        assert!(!out.success, "{:?} as nobody: {}", c.command, out.stdout);
    }
    // ...and were the modes loosened, the peer check still does.
    for d in [run_dir.clone(), run_dir.join("spidernet"), socket.clone()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    for c in attacks() {
        let (_, msg) = failure(&world.as_nobody(&c, ""));
        assert!(msg.contains("not trusted"), "{:?}: {msg}", c.command);
    }
    check_holds(&socket, "v1", "default", "victim", &victim);
    assert_eq!(sb.allocated("p"), 1);
    // A member of the socket group is trusted.
    let member = world.as_nobody(
        &call("ADD", &socket, "m1", "default", "member", "uid-m"),
        "4242",
    );
    assert_eq!(ip(&member), "10.20.1.2/16");
    drop(agent);
}

#[test]
fn the_agent_never_takes_over_a_path_that_is_not_its_own() {
    let sb = Sandbox::new();
    sb.apply(POOL);
    let start = |socket: &Path| {
        run(
            Command::new(bin("spiderpool-agent")).args([
                "--node-name",
                "n",
                "--datastore",
                &sb.datastore(),
                "--socket",
                socket.to_str().unwrap(),
            ]),
            "",
        )
    };
    // A regular file is not removed.
    let file = sb.dir.path().join("precious");
    std::fs::write(&file, "keep me").unwrap();
    let out = start(&file);
    assert!(!out.success);
    assert!(out.stderr.contains("is not a socket"), "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    // A live agent's socket is not taken over, and stays usable once the second one gave up.
    let first = sb.agent("node-1", "");
    let out = start(&first.socket);
    assert!(!out.success);
    assert!(
        out.stderr.contains("another agent is serving"),
        "{}",
        out.stderr
    );
    assert!(healthy(&first.socket));
    assert_eq!(
        ip(&call("ADD", &first.socket, "c1", "default", "p1", "u1").run()),
        "10.20.1.1/16"
    );
    // A stale socket (nobody answers) is replaced.
    let mut first = first;
    first.kill();
    let stale = first.socket.clone();
    let _ = std::fs::remove_file(&stale);
    let l = std::os::unix::net::UnixListener::bind(&stale).unwrap();
    drop(l);
    let second = Agent::start(&sb.datastore(), &stale, "node-1", "");
    assert!(healthy(&second.socket));
}

#[test]
fn slow_clients_do_not_starve_the_plugin() {
    let sb = Sandbox::new();
    sb.apply(POOL);
    let socket = sb.socket("node-1");
    // Few descriptors, as on a crowded node: connections are capped below the limit.
    let agent = Agent::start_with(
        &sb.datastore(),
        &socket,
        "node-1",
        "",
        &["--header-timeout", "1s"],
        Some("ulimit -n 300"),
    );
    // 400 clients send half a request and then nothing.
    let slow: Vec<UnixStream> = (0..400)
        .map(|_| {
            let mut s = UnixStream::connect(&agent.socket).unwrap();
            s.write_all(b"POST /v1/ipam/ip HTTP/1.1\r\nHost: a\r\n")
                .unwrap();
            s
        })
        .collect();
    // The plugin still gets its answer (before its own 100 s timeout: no slot is held past the
    // header timeout, and the agent never runs out of descriptors).
    let out = call("ADD", &agent.socket, "c1", "default", "p1", "u1").run();
    assert_eq!(ip(&out), "10.20.1.1/16");
    // The half-sent requests were cut off (those beyond this client's share at once).
    for mut s in slow.into_iter().take(32) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf);
        assert!(
            !matches!(&n, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the agent did not close the slow connection: {n:?}"
        );
    }
    // (This process held its share of connections until now.)
    assert!(healthy(&agent.socket));
}

#[test]
fn one_client_holding_many_half_sent_requests_takes_only_its_share() {
    let sb = Sandbox::new();
    sb.apply(POOL);
    let socket = sb.socket("node-1");
    // The default cap (256 connections) and a header timeout far longer than the ADD's wait.
    let agent = Agent::start_with(
        &sb.datastore(),
        &socket,
        "node-1",
        "",
        &["--header-timeout", "60s"],
        Some("ulimit -n 4096"),
    );
    // One process (this test) opens 1,500 connections and sends half a request on each.
    let slow: Vec<UnixStream> = (0..1500)
        .map(|_| {
            let mut s = UnixStream::connect(&agent.socket).unwrap();
            let _ = s.write_all(b"POST /v1/ipam/ip HTTP/1.1\r\nHost: a\r\n");
            s
        })
        .collect();
    // Another process, the plugin, is served at once rather than after the header timeout.
    let started = std::time::Instant::now();
    let out = call("ADD", &agent.socket, "c1", "default", "p1", "u1").run();
    let waited = started.elapsed();
    assert_eq!(ip(&out), "10.20.1.1/16");
    // All but this client's share (a quarter of 256) were answered 429 and closed.
    let (mut refused, mut open) = (0, 0);
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        // The answer comes first; the close may then read as a reset (the request was unread).
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(n) if n > 0 => {
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(text.starts_with("HTTP/1.1 429"), "{text}");
                assert!(text.contains("holds too many connections"), "{text}");
                refused += 1;
            }
            _ => open += 1,
        }
    }
    eprintln!("1,500 half-sent requests from one client: {open} held open, {refused} refused; an ADD meanwhile took {waited:?}");
    assert_eq!((open, refused), (64, 1436));
}

#[test]
fn a_client_that_goes_away_drops_only_its_own_answer() {
    let sb = Sandbox::new();
    sb.apply(
        POOL.replace("10.20.1.1-10.20.1.9", "10.20.1.1-10.20.4.250")
            .as_str(),
    );
    let agent = sb.agent("node-1", "");
    // Enough rounds that some client hangs up while its request serves a batch for others.
    for round in 0..20 {
        let threads: Vec<_> = (0..48)
            .map(|i| {
                let socket = agent.socket.clone();
                std::thread::spawn(move || {
                    let body = add_body(&format!("c{round}-{i}"), "default", &format!("p{round}-{i}"), "");
                    if i % 2 == 1 {
                        // Sends its ADD and hangs up at once.
                        let mut s = UnixStream::connect(&socket).unwrap();
                        let req = format!("POST /v1/ipam/ip HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                        let _ = s.write_all(req.as_bytes());
                        // ...a moment later, while its request may be serving a batch.
                        std::thread::sleep(Duration::from_micros(500 * (i as u64 % 16)));
                        None
                    } else {
                        Some(request(&socket, "POST", "/v1/ipam/ip", &body))
                    }
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            if let Some((status, body)) = t.join().unwrap() {
                assert_eq!(status, 200, "round {round}, ADD {i}: {body}");
            }
        }
    }
}

#[test]
fn deleting_an_endpoint_releases_and_unrecorded_addresses_can_be_released() {
    let sb = Sandbox::new();
    sb.apply(POOL);
    let agent = sb.agent("node-1", "");
    let s = &agent.socket;
    assert_eq!(
        ip(&call("ADD", s, "h1", "default", "held1", "u1").run()),
        "10.20.1.1/16"
    );
    // Releasing a recorded address by hand is refused, naming the pod.
    let out = sb.ctl(&["ipam", "release", "p", "10.20.1.1"], "");
    assert!(!out.success);
    assert!(out.stderr.contains("default/held1"), "{}", out.stderr);
    assert_eq!(sb.allocated("p"), 1);
    // Deleting the endpoint releases what it records, in the same transaction.
    let out = sb.ctl(&["delete", "endpoint", "default/held1"], "");
    assert!(out.success, "{}", out.stderr);
    assert_eq!(sb.allocated("p"), 0);
    assert!(call("DEL", s, "h1", "default", "held1", "u1").run().success);
    // An address held without a record (as an earlier version could leave one) is repaired.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = spiderpool_backends::open(&sb.datastore().parse().unwrap())
            .await
            .unwrap();
        let (_, rev) =
            spiderpool_store::typed::get(store.as_ref(), spiderpool_store::Kind::IPPool, "p")
                .await
                .unwrap()
                .unwrap();
        store
            .commit(vec![spiderpool_store::Op::Claim {
                pool: "p".into(),
                ip: "10.20.1.5".parse().unwrap(),
                holder: spiderpool_store::Holder {
                    pod: "default/orphan".into(),
                    pod_uid: "u9".into(),
                    container_id: "o1".into(),
                    nic: "eth0".into(),
                    node: "node-1".into(),
                },
                pool_revision: rev,
            }])
            .await
            .unwrap();
    });
    assert_eq!(sb.allocated("p"), 1);
    let out = sb.ctl(&["ipam", "release", "p", "10.20.1.5"], "");
    assert!(out.success, "{}", out.stderr);
    assert!(out.stdout.contains("default/orphan"), "{}", out.stdout);
    assert_eq!(sb.allocated("p"), 0);
    let out = sb.ctl(&["delete", "ippool", "p"], "");
    assert!(out.success, "{}", out.stderr);
}

fn pool_doc(name: &str, subnet: &str, ips: &str, gateway: &str) -> String {
    format!(
        "---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: {name}}}\nspec: {{subnet: {subnet}, ips: [{ips}], gateway: {gateway}}}\n"
    )
}

#[test]
fn apply_is_all_or_nothing_and_checks_names() {
    let sb = Sandbox::new();
    let good = |i: u8| {
        pool_doc(
            &format!("p{i}"),
            &format!("10.{i}.0.0/16"),
            &format!("10.{i}.0.10"),
            &format!("10.{i}.0.1"),
        )
    };
    let bad_docs = [
        // Document 3: gateway outside its subnet.
        pool_doc("p3", "10.3.0.0/16", "10.3.0.10", "10.9.0.1"),
        // Document 3: overlaps document 1.
        pool_doc("p3", "10.1.0.0/16", "10.1.0.10", "10.1.0.1"),
    ];
    for bad in bad_docs {
        let file = [good(1), good(2), bad, good(4), good(5)].concat();
        let out = sb.ctl(&["apply", "-f", "-"], &file);
        assert!(!out.success);
        assert!(out.stderr.contains("document 3"), "{}", out.stderr);
        assert!(out.stderr.contains("nothing was applied"), "{}", out.stderr);
        let listed = sb.ctl(&["get", "ippool"], "");
        assert!(!listed.stdout.contains("p1"), "{}", listed.stdout);
    }
    let long = "a".repeat(300);
    for name in ["a/b", long.as_str(), "\"bad\\nname\"", "Upper"] {
        let out = sb.ctl(
            &["apply", "-f", "-"],
            &[
                good(1),
                pool_doc(name, "10.7.0.0/16", "10.7.0.10", "10.7.0.1"),
            ]
            .concat(),
        );
        assert!(!out.success, "{name}");
        assert!(out.stderr.contains("metadata.name"), "{}", out.stderr);
        assert!(!out.stdout.contains("created"), "{}", out.stdout);
    }
    let out = sb.ctl(&["get", "ippool"], "");
    assert!(!out.stdout.contains("p1"), "{}", out.stdout);
    // A good file is applied whole.
    let out = sb.ctl(&["apply", "-f", "-"], &[good(1), good(2)].concat());
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.matches("created").count(), 2);
}

#[test]
fn the_sqlite_datastore_is_not_left_open_by_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lib/spiderpool/spiderpool.db");
    let out = run(
        Command::new("sh")
            .arg("-c")
            .arg("umask 000 && exec \"$0\" \"$@\"")
            .arg(bin("spiderpoolctl"))
            .arg("--datastore")
            .arg(format!("sqlite://{}", db.display()))
            .args(["apply", "-f", "-"]),
        POOL,
    );
    assert!(out.success, "{}", out.stderr);
    assert_eq!(mode(&db), 0o600);
    for d in [dir.path().join("lib"), dir.path().join("lib/spiderpool")] {
        assert_eq!(mode(&d), 0o750, "{}", d.display());
    }
    // SQLite's companion files follow the database file.
    for f in ["spiderpool.db-wal", "spiderpool.db-shm"] {
        let f = dir.path().join("lib/spiderpool").join(f);
        if f.exists() {
            assert_eq!(mode(&f) & 0o077, 0, "{}", f.display());
        }
    }
}
