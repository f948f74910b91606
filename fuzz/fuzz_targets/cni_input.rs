//! The CNI plugin's reading of its call: `CNI_COMMAND`, the `CNI_*` environment, `CNI_ARGS`,
//! and the network config on stdin (its `prevResult` and log keys included), through the
//! plugin's pure parsers, never the agent socket or the log file. The input is the
//! environment as `KEY=VALUE` lines, an empty line, then stdin, so a corpus file reads like a
//! call:
//!
//! ```text
//! CNI_COMMAND=ADD
//! CNI_CONTAINERID=0123abcd
//! CNI_IFNAME=eth0
//! CNI_NETNS=/var/run/netns/pod
//! CNI_ARGS=K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0
//!
//! {"cniVersion":"1.0.0","name":"macvlan-conf","type":"macvlan","ipam":{"type":"spiderpool"}}
//! ```
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use spiderpool_api::cni::code;
use spiderpool_cni::plugin::{self, CniEnv, Command};

fuzz_target!(|data: &[u8]| {
    let (head, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    // The binary reads the environment lossily (a value that is not UTF-8 is not a panic).
    let env: HashMap<String, String> = String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();

    let cmd = Command::parse(env.get("CNI_COMMAND").map(String::as_str));
    if let Err(e) = &cmd {
        assert_eq!(e.code, code::INVALID_ENV, "{e}");
    }
    if matches!(cmd, Ok(Command::Version)) {
        // VERSION is answered from stdin alone, before any I/O.
        let answer = plugin::run(&env, stdin).expect("VERSION always answers");
        assert!(answer.is_some());
    }
    for cmd in [Command::Add, Command::Del, Command::Check] {
        if let Err(e) = CniEnv::read(&env, cmd) {
            assert_eq!(e.code, code::INVALID_ENV, "{e}");
        }
    }
    if let Some(args) = env.get("CNI_ARGS") {
        let _ = plugin::parse_cni_args(args);
    }

    let version = plugin::reply_version(stdin);
    match plugin::parse_conf(stdin) {
        Ok(conf) => {
            // Errors are reported in the config's version (even when a field the plugin
            // ignores holds bytes that are not UTF-8).
            assert_eq!(version, conf.cni_version);
            if let Some(prev) = &conf.prev_result {
                if let Err(e) = plugin::prev_result_addresses(prev) {
                    assert_eq!(e.code, code::DECODING_FAILURE, "{e}");
                }
            }
        }
        Err(e) => assert!(
            [
                code::INCOMPATIBLE_VERSION,
                code::DECODING_FAILURE,
                code::INVALID_NETWORK_CONFIG
            ]
            .contains(&e.code),
            "{e}"
        ),
    }
});
