//! etcd clusters of one or more members on loopback ports, started and removed by the tests.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::*;

/// Whether etcd ([`etcd_binary`]) can be run; says how to get it otherwise. With
/// SPIDERPOOL_E2E_REQUIRED=1 (CI) its absence is a failure, not a skip.
pub fn etcd_available() -> bool {
    if Command::new(etcd_binary())
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    let why = "etcd is missing: export SPIDERPOOL_KUBE_BIN=$(scripts/kube-tools.sh | tail -n 1)";
    assert!(
        std::env::var("SPIDERPOOL_E2E_REQUIRED").as_deref() != Ok("1"),
        "{why}"
    );
    eprintln!("SKIPPED: {why}");
    false
}

/// The etcd the tests run: the 3.6 built with the control plane (`SPIDERPOOL_KUBE_BIN`, see
/// `scripts/kube-tools.sh`), else whatever `etcd` the PATH has.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("SPIDERPOOL_KUBE_BIN")
        .map(|d| PathBuf::from(d).join("etcd"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("etcd"))
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
        let child = Command::new(etcd_binary())
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
