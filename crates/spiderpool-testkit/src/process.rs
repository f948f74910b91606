//! Subprocesses: what one printed and how it ended, commands that must succeed, CPU time, and
//! free loopback ports.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

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

/// A free TCP port on loopback for a server a test starts. It is taken below the kernel's
/// ephemeral range (`ip_local_port_range`), where no outgoing connection's source port lands
/// between the check and the server's bind (a port from `bind(:0)` is one of those, and a busy
/// control plane took one such before etcd could bind it), and never twice by one process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    let (low, span) = *START.get_or_init(|| {
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32768);
        let low = 10_000u32.min(ephemeral.saturating_sub(1_000));
        let span = ephemeral.saturating_sub(low).max(1);
        // Each test process starts somewhere else in the range.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        NEXT.store(
            std::process::id().wrapping_mul(7919).wrapping_add(nanos) % span,
            Ordering::SeqCst,
        );
        (low, span)
    });
    for _ in 0..span {
        let port = low + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = u16::try_from(port).expect("a port");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {low} and {}", low + span)
}

/// Polls `ready` every `every` until it answers true; panics with the process's log (the file
/// `log`) when `child` exits first or `within` passes. `what` names the process.
pub fn wait_ready(
    what: &str,
    child: &mut std::process::Child,
    log: &std::path::Path,
    within: Duration,
    every: Duration,
    mut ready: impl FnMut() -> bool,
) {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = std::time::Instant::now() + within;
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status}:\n{}", log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} not healthy in time:\n{}",
            log()
        );
        std::thread::sleep(every);
    }
}
