//! `spiderpool-agent` as a subprocess on its own socket, ready when it answers health.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::*;

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
    "info,spiderpool_agent=debug,spiderpool_store=debug,spiderpool_backends=debug,spiderpool_control=debug,spiderpool_agent::view=trace";

impl Agent {
    /// Starts an agent and waits until it is healthy.
    pub fn start(datastore: &str, socket: &Path, node: &str, labels: &str) -> Agent {
        Self::start_with(datastore, socket, node, labels, &[], None)
    }

    /// An agent for `node` on the control plane `cp` (`--datastore kubernetes` with its
    /// kubeconfig), with `extra` flags.
    pub fn on_cluster(
        cp: &crate::cluster::ControlPlane,
        socket: &Path,
        node: &str,
        extra: &[&str],
    ) -> Agent {
        let mut args = vec![
            "--kubeconfig",
            cp.kubeconfig.to_str().expect("a UTF-8 path"),
        ];
        args.extend_from_slice(extra);
        Self::start_with("kubernetes", socket, node, "", &args, None)
    }

    /// [`Agent::start`] with more flags, and after the shell commands `prelude` when given
    /// (`umask 000`, `ulimit -n 300`).
    pub fn start_with(
        datastore: &str,
        socket: &Path,
        node: &str,
        labels: &str,
        extra: &[&str],
        prelude: Option<&str>,
    ) -> Agent {
        Self::start_bin(
            &bin("spiderpool-agent"),
            datastore,
            socket,
            node,
            labels,
            extra,
            prelude,
        )
    }

    /// [`Agent::start_with`] from the binary `binary` (another build, say).
    pub fn start_bin(
        binary: &Path,
        datastore: &str,
        socket: &Path,
        node: &str,
        labels: &str,
        extra: &[&str],
        prelude: Option<&str>,
    ) -> Agent {
        // Beside the socket, or in the nearest directory that exists when the agent is to
        // create the socket's own.
        let dir = socket
            .ancestors()
            .skip(1)
            .find(|d| d.is_dir())
            .unwrap_or(Path::new("/tmp"));
        let log = dir.join(
            socket
                .with_extension("log")
                .file_name()
                .expect("socket file name"),
        );
        let mut cmd = match prelude {
            Some(p) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{p} && exec \"$0\" \"$@\""))
                    .arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let child = cmd
            .args(extra)
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
        wait_ready(
            "spiderpool-agent",
            &mut agent.child,
            &agent.log,
            Duration::from_secs(20),
            Duration::from_millis(20),
            || healthy(socket),
        );
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

    /// Asks the agent to stop (SIGTERM), as kubelet does, and waits for it.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
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

/// `GET path` on the TCP address `addr` (`--health-addr`, `--metrics-addr`): the status code
/// and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to the agent's endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of the sample `name` (with its labels, e.g. `m{pool="p"}`) in a Prometheus text
/// exposition; panics naming it when it is not there.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// One HTTP/1.1 request to the agent's API on `socket`, as the plugin would send it: the status
/// and the body (JSON when it is JSON, else a string); status 0 when the agent could not be
/// reached or closed the connection without an answer.
pub fn request(socket: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return (0, Value::Null);
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, Value::Null);
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.into()));
    (status, value)
}
