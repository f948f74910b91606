//! Test-only helpers: the workspace's binaries as subprocesses (agents on their own sockets,
//! the `spiderpool` CNI plugin with a CNI environment, `spiderpoolctl`), and network namespaces
//! standing in for hosts and pods. Never shipped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The directory holding the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SPIDERPOOL_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("profile dir")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// The path of a workspace binary; panics with advice when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace --bins) or run cargo test --workspace",
        p.display()
    );
    p
}

/// Whether the tests run as root (needed for network namespaces).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A fresh temporary directory with a datastore URL inside it.
pub struct Sandbox {
    /// The directory; removed on drop.
    pub dir: tempfile::TempDir,
    /// The datastore, when it is not the SQLite file inside the directory.
    url: Option<String>,
    /// The sandbox's own etcd, if it has one.
    _etcd: Option<Etcd>,
}

impl Sandbox {
    /// A new sandbox: on its own SQLite file, or with SPIDERPOOL_TEST_DATASTORE=etcd on an etcd
    /// of its own (so every test that uses sandboxes can run on either datastore).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        if std::env::var("SPIDERPOOL_TEST_DATASTORE").as_deref() == Ok("etcd") {
            let etcd = Etcd::single();
            return Sandbox {
                dir,
                url: Some(etcd.datastore("/sandbox")),
                _etcd: Some(etcd),
            };
        }
        Sandbox {
            dir,
            url: None,
            _etcd: None,
        }
    }

    /// A sandbox whose datastore is `url` (etcd, say) instead of its own SQLite file.
    pub fn on(url: String) -> Self {
        Sandbox {
            dir: tempfile::tempdir().expect("tempdir"),
            url: Some(url),
            _etcd: None,
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

    /// Starts an agent for `node` with `labels` (`k=v,…`) on its own socket.
    pub fn agent(&self, node: &str, labels: &str) -> Agent {
        Agent::start(&self.datastore(), &self.socket(node), node, labels)
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

/// What a subprocess printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status was 0.
    pub success: bool,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Standard output as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `cmd` to completion with `stdin`.
pub fn run(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(data.as_bytes());
    });
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("stdin writer");
    Output {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running `spiderpool-agent`, killed on drop.
pub struct Agent {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    log: PathBuf,
}

/// Whether an agent answers `GET /v1/ipam/healthy` with 200 on `socket`.
pub fn healthy(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /v1/ipam/healthy HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

/// The agents' log level in tests (SPIDERPOOL_TEST_LOG_LEVEL overrides it): debug for the
/// project's own crates (not for the HTTP/2 and gRPC libraries, which log every frame), and
/// every address change the view hears of.
pub const TEST_LOG_LEVEL: &str =
    "info,spiderpool_agent=debug,spiderpool_store=debug,spiderpool_agent::view=trace";

impl Agent {
    /// Starts an agent and waits until it is healthy.
    pub fn start(datastore: &str, socket: &Path, node: &str, labels: &str) -> Agent {
        let log = socket.with_extension("log");
        let child = Command::new(bin("spiderpool-agent"))
            .args([
                "--node-name",
                node,
                "--node-labels",
                labels,
                "--datastore",
                datastore,
            ])
            .arg("--log-level")
            .arg(
                std::env::var("SPIDERPOOL_TEST_LOG_LEVEL")
                    .unwrap_or_else(|_| TEST_LOG_LEVEL.into()),
            )
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("spawning spiderpool-agent");
        let mut agent = Agent {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !healthy(socket) {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("spiderpool-agent exited with {status}:\n{}", agent.log());
            }
            assert!(
                Instant::now() < deadline,
                "spiderpool-agent not healthy in time:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent has logged `times` lines containing every one of `needles`
    /// (panics with the log after 20 s).
    pub fn wait_for_log(&self, needles: &[&str], times: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let n = log
                .lines()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .count();
            if n >= times {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent logged {needles:?} {n} times, not {times}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the agent (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

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
        }
    }

    /// Sets the interface.
    pub fn ifname(mut self, ifname: &str) -> Self {
        self.ifname = Some(ifname.into());
        self
    }

    /// Runs the real `spiderpool` binary.
    pub fn run(&self) -> Output {
        let mut cmd = Command::new(bin("spiderpool"));
        cmd.env_clear()
            .env("CNI_PATH", "/usr/lib/cni")
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

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name under /var/run/netns.
    pub name: String,
}

impl Netns {
    /// Creates the namespace (root only).
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh(&["ip", "netns", "add", name]);
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
        Netns { name: name.into() }
    }

    /// Its path.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// CPU time (user + system) of process `pid` (a number or `self`) so far; with `children`, that
/// of its children which have been waited for instead (from `/proc/<pid>/stat`, whose clock
/// ticks are 10 ms on Linux).
pub fn cpu_time(pid: &str, children: bool) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces: the
    // first of them is field 3 of the line.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
    // utime and stime are fields 14 and 15; cutime and cstime 16 and 17.
    let ticks = if children {
        field(16) + field(17)
    } else {
        field(14) + field(15)
    };
    Duration::from_millis(ticks * 10)
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Whether Debian's `etcd` is installed; says how to get it otherwise. With
/// SPIDERPOOL_E2E_REQUIRED=1 (CI) its absence is a failure, not a skip.
pub fn etcd_available() -> bool {
    if Command::new("etcd").arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("SPIDERPOOL_E2E_REQUIRED").as_deref() != Ok("1"),
        "etcd is missing (apt-get install etcd-server)"
    );
    eprintln!("SKIPPED: etcd is missing (apt-get install etcd-server)");
    false
}

/// One etcd member started by the test, with its data in a temporary directory.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// An etcd cluster of one or more members on loopback ports, removed on drop.
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// A single-member cluster.
    pub fn single() -> Etcd {
        Etcd::cluster(1)
    }

    /// A cluster of `n` members, started and healthy.
    pub fn cluster(n: usize) -> Etcd {
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut etcd = Etcd {
            members,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for i in 0..n {
            etcd.start_member(i, "new");
        }
        for i in 0..n {
            etcd.wait_healthy(i);
        }
        etcd
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_member(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log =
            std::fs::File::create(self.dir.path().join(format!("{}.log", m.name))).expect("log");
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                state,
            ])
            .args([
                "--initial-cluster-token",
                "spiderpool-test",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning etcd");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, i: usize) {
        let port = self.members[i].client_port;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ =
                    s.write_all(b"GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.contains("\"health\":\"true\"") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {i} not healthy in time:\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What member `i` logged.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default()
    }

    /// The `--datastore` URL naming every member.
    pub fn datastore(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}?prefix={prefix}", hosts.join(","))
    }

    /// The process id of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_member(i, "existing");
        self.wait_healthy(i);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
