//! The CNI side: network config as the runtime passes it on stdin, the IPAM result in the shape
//! of each spec version, and the error JSON with the spec's codes.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Spec versions the `spiderpool` plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Default path of the agent's unix socket.
pub const DEFAULT_SOCKET: &str = "/var/run/spidernet/spiderpool.sock";

/// Well-known CNI error codes.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Spiderpool: no candidate pool fits the pod, or every candidate is exhausted.
    pub const NO_ADDRESS: u32 = 100;
    /// Spiderpool CHECK: the reservation differs from `prevResult`.
    pub const CHECK_MISMATCH: u32 = 101;
}

/// The `ipam` section of the network config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamConf {
    /// `spiderpool`.
    #[serde(default, rename = "type")]
    pub type_: String,
    /// debug, info, warn or error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Where the plugin logs; stderr when unset or unwritable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file_path: Option<String>,
    /// Rotate the log file once it is larger than this many MB (upstream default 100). Kept as
    /// the JSON given, so the plugin can refuse a bad value by name (code 7) instead of failing
    /// the whole decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file_max_size: Option<Value>,
    /// Remove rotated log files older than this many days (upstream default 30); JSON as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file_max_age: Option<Value>,
    /// Keep at most this many rotated log files (upstream default 10); JSON as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file_max_count: Option<Value>,
    /// CNI-config default IPv4 pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_ipv4_ippool: Vec<String>,
    /// CNI-config default IPv6 pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_ipv6_ippool: Vec<String>,
    /// Leave out the default route.
    #[serde(default)]
    pub clean_gateway: bool,
    /// SR-IOV: only pools in the master's subnet.
    #[serde(default)]
    pub match_master_subnet: bool,
    /// The agent's socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam_unix_socket_path: Option<String>,
}

/// The network configuration on stdin (the fields an IPAM plugin reads).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Spec version of the config and the result.
    #[serde(default)]
    pub cni_version: String,
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// The IPAM section.
    #[serde(default)]
    pub ipam: IpamConf,
    /// The result of ADD, on CHECK and DEL.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC: attachments still in use (current key).
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// GC: attachments still in use (the 1.1.0 text's key).
    #[serde(default, rename = "cni.dev/attachments")]
    pub attachments: Option<Vec<Attachment>>,
}

/// A (container, interface) pair the runtime still uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// One address of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultIp {
    /// 4 or 6.
    pub version: u8,
    /// Address with prefix, e.g. `10.6.168.60/16`.
    pub address: String,
    /// Gateway.
    pub gateway: Option<String>,
}

/// One route of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRoute {
    /// Destination CIDR.
    pub dst: String,
    /// Next hop.
    pub gw: Option<String>,
}

/// The IPAM result, independent of spec version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpamResult {
    /// Addresses.
    pub ips: Vec<ResultIp>,
    /// Routes.
    pub routes: Vec<ResultRoute>,
}

/// Whether results of `version` carry `ips[].version` (before 1.0.0).
pub fn has_ip_version_field(version: &str) -> bool {
    matches!(version, "0.3.0" | "0.3.1" | "0.4.0")
}

impl IpamResult {
    /// The result JSON for `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let with_version = has_ip_version_field(cni_version);
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = serde_json::Map::new();
                if with_version {
                    o.insert("version".into(), json!(ip.version.to_string()));
                }
                o.insert("address".into(), json!(ip.address));
                if let Some(gw) = &ip.gateway {
                    o.insert("gateway".into(), json!(gw));
                }
                Value::Object(o)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| match &r.gw {
                Some(gw) => json!({"dst": r.dst, "gw": gw}),
                None => json!({"dst": r.dst}),
            })
            .collect();
        json!({"cniVersion": cni_version, "ips": ips, "routes": routes, "dns": {}})
    }
}

/// A CNI error as printed on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniErrorJson {
    /// Spec version.
    pub cni_version: String,
    /// Error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer details.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_shape_per_version() {
        let r = IpamResult {
            ips: vec![ResultIp {
                version: 4,
                address: "10.6.168.60/16".into(),
                gateway: Some("10.6.0.1".into()),
            }],
            routes: vec![ResultRoute {
                dst: "0.0.0.0/0".into(),
                gw: Some("10.6.0.1".into()),
            }],
        };
        assert_eq!(
            r.to_json("0.3.1"),
            json!({"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.6.168.60/16","gateway":"10.6.0.1"}],
                   "routes":[{"dst":"0.0.0.0/0","gw":"10.6.0.1"}],"dns":{}})
        );
        assert_eq!(
            r.to_json("1.0.0")["ips"],
            json!([{"address":"10.6.168.60/16","gateway":"10.6.0.1"}])
        );
    }

    #[test]
    fn netconf_reads_ipam_keys_and_gc_lists() {
        let c: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.1.0","name":"n","ipam":{"type":"spiderpool","default_ipv4_ippool":["a"],"clean_gateway":true,"ipam_unix_socket_path":"/s"},
                "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.ipam.default_ipv4_ippool, ["a"]);
        assert!(c.ipam.clean_gateway);
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "c1");
    }

    #[test]
    fn log_rotation_keys_are_kept_as_given() {
        let c: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","ipam":{"log_file_path":"/l","log_file_max_size":1,"log_file_max_age":"x","log_file_max_count":-3}}"#,
        )
        .unwrap();
        assert_eq!(c.ipam.log_file_max_size, Some(json!(1)));
        assert_eq!(c.ipam.log_file_max_age, Some(json!("x")));
        assert_eq!(c.ipam.log_file_max_count, Some(json!(-3)));
        let unset: NetConf =
            serde_json::from_str(r#"{"ipam":{"log_file_max_size":null}}"#).unwrap();
        assert_eq!(unset.ipam.log_file_max_size, None);
    }
}
