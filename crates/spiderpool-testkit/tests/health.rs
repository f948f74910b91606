//! The agent's health endpoints on `--health-addr`, as a kubelet probe or a supervisor sees
//! them: `/healthz` while the process serves, `/readyz` only while the datastore answers.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use spiderpool_testkit::{etcd_available, free_port, Agent, Etcd, Sandbox};

/// `GET path` on `addr`: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("health endpoint");
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

/// Polls `GET path` until it answers `status` (panics after 30 s).
fn until(addr: &str, path: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, body) = get(addr, path);
        if s == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} kept answering {s}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn readyz_follows_the_datastore_and_healthz_the_process() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::single();
    let sb = Sandbox::on(etcd.datastore("/health"));
    let addr = format!("127.0.0.1:{}", free_port());
    let _agent = Agent::start_with(
        &sb.datastore(),
        &sb.socket("node-1"),
        "node-1",
        "",
        &["--health-addr", &addr],
        None,
    );
    assert_eq!(get(&addr, "/healthz"), (200, "ok".to_string()));
    assert_eq!(get(&addr, "/readyz"), (200, "ok".to_string()));
    etcd.kill(0);
    let why = until(&addr, "/readyz", 503);
    assert!(why.contains("datastore"), "{why}");
    assert_eq!(get(&addr, "/healthz").0, 200, "the process still serves");
    etcd.restart(0);
    until(&addr, "/readyz", 200);
}
