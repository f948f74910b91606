//! The CNI call as one command enum: environment and stdin checked (by pure, public parsers),
//! the agent asked, the result shaped for the requested spec version.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use spiderpool_api::agent::{
    IpamAddArgs, IpamAddResponse, IpamDelArgs, IpamGcArgs, IpamGcResponse, IpamStatusArgs,
    PATH_CHECK, PATH_GC, PATH_IP, PATH_STATUS,
};
use spiderpool_api::cni::{
    code, IpamResult, NetConf, ResultIp, ResultRoute, DEFAULT_SOCKET, SUPPORTED_VERSIONS,
};
use spiderpool_api::{names, ValidationError};

use crate::client;
use crate::log_file::LogFile;
use crate::{excerpt, CniError};

/// Version used in an error reply before the config's own version is known.
pub const FALLBACK_VERSION: &str = "1.0.0";

/// The CNI verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// ADD: allocate.
    Add,
    /// DEL: release.
    Del,
    /// CHECK: the reservation is still held (and matches `prevResult`).
    Check,
    /// VERSION: the spec versions spoken.
    Version,
    /// GC (1.1.0): release what the runtime no longer uses.
    Gc,
    /// STATUS (1.1.0): whether ADD can be served.
    Status,
}

impl Command {
    /// `CNI_COMMAND`; unset or unknown is code 4 naming the value. Pure.
    pub fn parse(s: Option<&str>) -> Result<Self, CniError> {
        let s = s.ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                "environment variable CNI_COMMAND is not set",
            )
        })?;
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                    "CNI_COMMAND {other:?} is not supported (supported: ADD, DEL, CHECK, GC, STATUS, VERSION)"
                ),
                ))
            }
        })
    }
}

/// The `CNI_*` environment of one ADD, DEL or CHECK, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_CONTAINERID`, as libcni accepts it.
    pub container_id: String,
    /// `CNI_NETNS` (may be empty on DEL).
    pub netns: String,
    /// `CNI_IFNAME`, as the kernel accepts it.
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: HashMap<String, String>,
}

fn required<'a>(env: &'a HashMap<String, String>, name: &str) -> Result<&'a str, CniError> {
    env.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("environment variable {name} is not set"),
            )
        })
}

fn invalid_env(name: &str, e: ValidationError) -> CniError {
    CniError::new(
        code::INVALID_ENV,
        format!("environment variable {name}: {e}"),
    )
}

/// `CNI_ARGS` (`K=V;K2=V2`) as key/value pairs, the last of a repeated key winning; an entry
/// without `=` is code 4 naming it. Pure.
pub fn parse_cni_args(s: &str) -> Result<HashMap<String, String>, CniError> {
    let mut out = HashMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
            )
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

impl CniEnv {
    /// Reads and checks the environment of `cmd` (ADD, DEL or CHECK) as libcni does before it
    /// calls a plugin: `CNI_CONTAINERID` and `CNI_IFNAME` set and well-formed, `CNI_NETNS` set
    /// for ADD and CHECK, `CNI_ARGS` well-formed with `K8S_POD_NAMESPACE` a DNS-1123 label and
    /// `K8S_POD_NAME` a DNS-1123 subdomain when given. Anything else is code 4 naming the
    /// variable and its value. Pure.
    pub fn read(env: &HashMap<String, String>, cmd: Command) -> Result<Self, CniError> {
        let container_id = required(env, "CNI_CONTAINERID")?;
        names::container_id(container_id).map_err(|e| invalid_env("CNI_CONTAINERID", e))?;
        let ifname = required(env, "CNI_IFNAME")?;
        names::interface_name(ifname).map_err(|e| invalid_env("CNI_IFNAME", e))?;
        let netns = match cmd {
            Command::Add | Command::Check => required(env, "CNI_NETNS")?.to_string(),
            _ => env.get("CNI_NETNS").cloned().unwrap_or_default(),
        };
        let args = parse_cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""))?;
        let given = |k: &str| args.get(k).map(String::as_str).filter(|v| !v.is_empty());
        if let Some(ns) = given("K8S_POD_NAMESPACE") {
            names::dns1123_label("K8S_POD_NAMESPACE", ns)
                .map_err(|e| invalid_env("CNI_ARGS", e))?;
        }
        if let Some(name) = given("K8S_POD_NAME") {
            names::dns1123_subdomain("K8S_POD_NAME", name)
                .map_err(|e| invalid_env("CNI_ARGS", e))?;
        }
        Ok(CniEnv {
            container_id: container_id.to_string(),
            netns,
            ifname: ifname.to_string(),
            args,
        })
    }

    /// The container as the agent's `DELETE /v1/ipam/ips` names it (no conflicts yet).
    pub fn holder(&self) -> spiderpool_api::agent::IpamBatchDelArgs {
        spiderpool_api::agent::IpamBatchDelArgs {
            container_id: self.container_id.clone(),
            if_name: self.ifname.clone(),
            net_namespace: self.netns.clone(),
            pod_namespace: self.arg("K8S_POD_NAMESPACE"),
            pod_name: self.arg("K8S_POD_NAME"),
            pod_uid: self.arg("K8S_POD_UID"),
            is_release_conflict_ips: false,
            conflicts: Vec::new(),
        }
    }

    fn arg(&self, k: &str) -> String {
        self.args.get(k).cloned().unwrap_or_default()
    }

    fn del_args(&self) -> IpamDelArgs {
        IpamDelArgs {
            container_id: self.container_id.clone(),
            if_name: self.ifname.clone(),
            net_namespace: self.netns.clone(),
            pod_namespace: self.arg("K8S_POD_NAMESPACE"),
            pod_name: self.arg("K8S_POD_NAME"),
            pod_uid: self.arg("K8S_POD_UID"),
        }
    }
}

/// The network configuration on stdin: decoded (code 6 otherwise), its `cniVersion` one this
/// plugin speaks (code 1), its log rotation keys whole numbers (code 7, see
/// [`LogFile::from_ipam`]). Pure.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            format!("decoding the network configuration on stdin: {e}"),
        )
    })?;
    check_version(&conf.cni_version)?;
    LogFile::from_ipam(&conf.ipam)?;
    Ok(conf)
}

/// A config's `cniVersion`: one this plugin speaks, else code 1 naming it. Pure.
pub fn check_version(v: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&v) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "cniVersion {v:?} is not supported (supported: {})",
            SUPPORTED_VERSIONS.join(", ")
        ),
    ))
}

/// The answer to VERSION: the versions spoken, in the config's `cniVersion` when it is one of
/// them, else the newest (stdin unreadable included). Pure.
pub fn version_answer(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED_VERSIONS.last().expect("versions").to_string());
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})
}

/// The version an error is reported in: the config's `cniVersion` if this plugin speaks it,
/// [`FALLBACK_VERSION`] otherwise (stdin unreadable included). Pure.
pub fn reply_version(stdin: &[u8]) -> String {
    // Only `cniVersion` is decoded: the rest may hold anything the config parser skips too
    // (invalid UTF-8 inside an ignored string, say) without changing the answer's version.
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_slice::<Version>(stdin)
        .ok()
        .and_then(|v| v.cni_version)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| FALLBACK_VERSION.to_string())
}

/// The addresses of a CHECK's `prevResult`, sorted. A `prevResult` that is not a result (not a
/// JSON object, `ips` not an array, an entry without a string `address`) is a decoding failure
/// (code 6) naming what was found. Pure.
pub fn prev_result_addresses(prev: &Value) -> Result<Vec<String>, CniError> {
    let bad = |what: &str, v: &Value, why: &str| {
        CniError::new(
            code::DECODING_FAILURE,
            format!("decoding prevResult: {what} {} {why}", excerpt(v)),
        )
    };
    let obj = prev
        .as_object()
        .ok_or_else(|| bad("prevResult", prev, "is not a JSON object"))?;
    let mut out = Vec::new();
    match obj.get("ips") {
        None | Some(Value::Null) => {}
        Some(Value::Array(ips)) => {
            for (i, ip) in ips.iter().enumerate() {
                let address = ip.get("address").and_then(Value::as_str).ok_or_else(|| {
                    bad(
                        &format!("prevResult.ips[{i}]"),
                        ip,
                        "is not an object with a string \"address\"",
                    )
                })?;
                out.push(address.to_string());
            }
        }
        Some(other) => return Err(bad("prevResult.ips", other, "is not a JSON array")),
    }
    out.sort();
    Ok(out)
}

fn init_logging(conf: &NetConf) {
    let level = conf
        .ipam
        .log_level
        .as_deref()
        .unwrap_or("info")
        .to_ascii_lowercase();
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    // parse_conf has checked the rotation keys; an unwritable file means stderr.
    let file = LogFile::from_ipam(&conf.ipam)
        .ok()
        .flatten()
        .and_then(|l| l.open().ok());
    let _ = match file {
        Some(f) => b.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => b.with_writer(std::io::stderr).try_init(),
    };
}

/// Runs one CNI call. `Ok(Some(json))` is printed on stdout; errors carry the version to
/// report them in.
pub fn run(
    env: &HashMap<String, String>,
    stdin: &[u8],
) -> Result<Option<Value>, (String, CniError)> {
    let cmd = Command::parse(env.get("CNI_COMMAND").map(String::as_str))
        .map_err(|e| (FALLBACK_VERSION.to_string(), e))?;
    if cmd == Command::Version {
        return Ok(Some(version_answer(stdin)));
    }
    // As libcni does, the environment is judged before the config: a bad container ID or
    // interface name is refused whatever stdin holds. The config is still read so that the
    // refusal lands in the configured log.
    let cenv = match cmd {
        Command::Add | Command::Del | Command::Check => Some(CniEnv::read(env, cmd)),
        Command::Version | Command::Gc | Command::Status => None,
    };
    let conf = parse_conf(stdin);
    if let Ok(conf) = &conf {
        init_logging(conf);
    }
    let early = |e: CniError| (reply_version(stdin), e);
    let cenv = cenv.transpose().map_err(early)?;
    let conf = conf.map_err(early)?;
    let version = conf.cni_version.clone();
    let with_version = |e: CniError| (version.clone(), e);
    let socket = PathBuf::from(
        conf.ipam
            .ipam_unix_socket_path
            .as_deref()
            .unwrap_or(DEFAULT_SOCKET),
    );
    let Some(cenv) = cenv else {
        // GC and STATUS are about the network, not one container.
        let done = match cmd {
            Command::Gc => gc(&conf, &socket),
            _ => status(&conf, &socket),
        };
        return done.map(|()| None).map_err(with_version);
    };
    tracing::debug!(command = ?cmd, container_id = %cenv.container_id, ifname = %cenv.ifname, "called");
    match cmd {
        Command::Add => add(&conf, &cenv, &socket).map(Some).map_err(with_version),
        Command::Del => del(&cenv, &socket).map(|()| None).map_err(with_version),
        Command::Check => check(&conf, &cenv, &socket)
            .map(|()| None)
            .map_err(with_version),
        Command::Version | Command::Gc | Command::Status => unreachable!("answered above"),
    }
}

fn to_result(resp: &IpamAddResponse, ifname: &str) -> Result<IpamResult, CniError> {
    let ips: Vec<ResultIp> = resp
        .ips
        .iter()
        .filter(|ip| ip.nic == ifname)
        .map(|ip| ResultIp {
            version: ip.version,
            address: ip.address.clone(),
            gateway: ip.gateway.clone(),
        })
        .collect();
    if ips.is_empty() {
        return Err(CniError::new(
            code::NO_ADDRESS,
            format!("spiderpool IP allocation error: no Interface {ifname} IP allocation found"),
        ));
    }
    let routes = resp
        .routes
        .iter()
        .filter(|r| r.if_name == ifname)
        .map(|r| ResultRoute {
            dst: r.dst.clone(),
            gw: Some(r.gw.clone()).filter(|g| !g.is_empty()),
        })
        .collect();
    Ok(IpamResult { ips, routes })
}

fn add(conf: &NetConf, env: &CniEnv, socket: &Path) -> Result<Value, CniError> {
    let args = IpamAddArgs {
        container_id: env.container_id.clone(),
        if_name: env.ifname.clone(),
        net_namespace: env.netns.clone(),
        pod_namespace: env.arg("K8S_POD_NAMESPACE"),
        pod_name: env.arg("K8S_POD_NAME"),
        pod_uid: env.arg("K8S_POD_UID"),
        default_ipv4_ippool: conf.ipam.default_ipv4_ippool.clone(),
        default_ipv6_ippool: conf.ipam.default_ipv6_ippool.clone(),
        clean_gateway: conf.ipam.clean_gateway,
        network: conf.name.clone(),
    };
    let resp: IpamAddResponse = client::call(socket, "POST", PATH_IP, Some(&args))?
        .json(socket)
        .map_err(|e| CniError::new(e.code, format!("spiderpool IP allocation error: {}", e.msg)))?;
    let result = to_result(&resp, &env.ifname)?;
    let json = result.to_json(&conf.cni_version);
    let detect = crate::probe::Detect {
        ip_conflict: resp.detect_ip_conflict,
        gateway: resp.detect_gateway,
    };
    if detect != crate::probe::Detect::default() {
        crate::probe::ipam_checks(detect, &json, &env.holder(), socket)?;
    }
    tracing::info!(container_id = %env.container_id, ifname = %env.ifname, ips = ?result.ips, "ADD");
    Ok(json)
}

fn del(env: &CniEnv, socket: &Path) -> Result<(), CniError> {
    client::call(socket, "DELETE", PATH_IP, Some(&env.del_args()))?.ok(socket)?;
    tracing::info!(container_id = %env.container_id, ifname = %env.ifname, "DEL");
    Ok(())
}

fn needs_1_1(conf: &NetConf, what: &str) -> Result<(), CniError> {
    if conf.cni_version == "1.1.0" {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "{what} is not defined for cniVersion {:?}; it needs 1.1.0",
            conf.cni_version
        ),
    ))
}

fn gc(conf: &NetConf, socket: &Path) -> Result<(), CniError> {
    needs_1_1(conf, "GC")?;
    // An absent list is not an empty one: without it nothing is known to be stale.
    let valid = conf.valid_attachments.clone().or_else(|| conf.attachments.clone()).ok_or_else(|| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "GC needs the list of attachments in use (cni.dev/valid-attachments); nothing was released",
        )
    })?;
    let args = IpamGcArgs {
        network: conf.name.clone(),
        valid_attachments: valid,
    };
    let resp: IpamGcResponse = client::call(socket, "POST", PATH_GC, Some(&args))?.json(socket)?;
    tracing::info!(network = %conf.name, released = ?resp.released, "GC");
    Ok(())
}

fn status(conf: &NetConf, socket: &Path) -> Result<(), CniError> {
    needs_1_1(conf, "STATUS")?;
    let args = IpamStatusArgs {
        default_ipv4_ippool: conf.ipam.default_ipv4_ippool.clone(),
        default_ipv6_ippool: conf.ipam.default_ipv6_ippool.clone(),
    };
    // Whatever keeps ADD from being served, an unreachable agent included, is code 50.
    client::call(socket, "POST", PATH_STATUS, Some(&args))
        .and_then(|r| r.ok(socket))
        .map_err(|e| CniError::new(code::PLUGIN_NOT_AVAILABLE, e.msg))
}

fn addresses(v: &Value) -> Vec<String> {
    let mut a: Vec<String> = v
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    a.sort();
    a
}

fn check(conf: &NetConf, env: &CniEnv, socket: &Path) -> Result<(), CniError> {
    if matches!(conf.cni_version.as_str(), "0.3.0" | "0.3.1") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK is not defined for cniVersion {:?}; it needs 0.4.0 or later",
                conf.cni_version
            ),
        ));
    }
    // A prevResult that cannot be read is a decoding failure, found before the agent is asked.
    let want = conf
        .prev_result
        .as_ref()
        .map(prev_result_addresses)
        .transpose()?;
    let resp: IpamAddResponse =
        client::call(socket, "POST", PATH_CHECK, Some(&env.del_args()))?.json(socket)?;
    let held = to_result(&resp, &env.ifname)?.to_json(&conf.cni_version);
    if let Some(want) = want {
        let have = addresses(&held);
        if want != have {
            return Err(CniError::new(
                code::CHECK_MISMATCH,
                format!(
                    "container {} interface {}: prevResult has {want:?} but the reservation holds {have:?}",
                    env.container_id, env.ifname
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn errors_answer_in_the_configs_version_whatever_its_ignored_fields_hold() {
        let conf = b"{\"cniVersion\":\"1.1.0\",\"ipam\":{\"type\":\"spiderpool\",\"x\":\"\xff\"}}";
        assert_eq!(reply_version(conf), "1.1.0");
        assert_eq!(reply_version(b"not json"), FALLBACK_VERSION);
    }

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_is_checked_as_libcni_checks_it() {
        let ok = |args: &str| {
            env(&[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/n"),
                ("CNI_ARGS", args),
            ])
        };
        let e = CniEnv::read(&ok("K8S_POD_NAMESPACE=;K8S_POD_NAME=web-0"), Command::Add).unwrap();
        assert_eq!(e.args["K8S_POD_NAME"], "web-0");
        assert!(
            CniEnv::read(&ok(""), Command::Del).is_ok(),
            "pod keys are optional"
        );
        for (args, needle) in [
            (
                "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b/c",
                "K8S_POD_NAME \"b/c\"",
            ),
            (
                "K8S_POD_NAMESPACE=a/b;K8S_POD_NAME=c",
                "K8S_POD_NAMESPACE \"a/b\"",
            ),
            ("K8S_POD_NAME", "\"K8S_POD_NAME\""),
        ] {
            let e = CniEnv::read(&ok(args), Command::Check).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV);
            assert!(e.msg.contains(needle), "{}", e.msg);
        }
        let mut bad = ok("");
        bad.insert("CNI_CONTAINERID".into(), "a/b".into());
        let e = CniEnv::read(&bad, Command::Del).unwrap_err();
        assert!(
            e.msg.contains("CNI_CONTAINERID") && e.msg.contains("\"a/b\""),
            "{}",
            e.msg
        );
        let mut bad = ok("");
        bad.insert("CNI_IFNAME".into(), "../x".into());
        let e = CniEnv::read(&bad, Command::Add).unwrap_err();
        assert!(
            e.msg.contains("CNI_IFNAME") && e.msg.contains("\"../x\""),
            "{}",
            e.msg
        );
    }

    #[test]
    fn prev_result_must_be_a_result() {
        let ok = json!({"ips": [{"address": "b"}, {"address": "a"}]});
        assert_eq!(prev_result_addresses(&ok).unwrap(), ["a", "b"]);
        assert_eq!(
            prev_result_addresses(&json!({})).unwrap(),
            Vec::<String>::new()
        );
        let long = "é".repeat(500);
        for bad in [
            json!("x"),
            json!(1),
            json!({"ips": {}}),
            json!({"ips": [{"address": 1}]}),
            json!(long),
        ] {
            let e = prev_result_addresses(&bad).unwrap_err();
            assert_eq!(e.code, code::DECODING_FAILURE);
            assert!(e.msg.starts_with("decoding prevResult"), "{}", e.msg);
        }
    }

    /// Inputs a fuzzer would try first: multi-byte characters at every cut, control bytes,
    /// odd JSON. Every parser answers, none panics.
    #[test]
    fn parsers_never_panic() {
        let nasty = [
            "",
            ";",
            "=",
            ";;=;",
            "é",
            "😀=😀",
            "a=b=c",
            "\0",
            "\n=\n",
            "K8S_POD_NAME=",
            "K8S_POD_NAMESPACE=😀;K8S_POD_NAME=é.é",
            "x y\"'é😀;",
        ];
        let long = "😀".repeat(300);
        for s in nasty.iter().copied().chain([long.as_str()]) {
            let _ = Command::parse(Some(s));
            let _ = parse_cni_args(s);
            for cmd in [Command::Add, Command::Del, Command::Check] {
                let e = env(&[
                    ("CNI_CONTAINERID", s),
                    ("CNI_IFNAME", s),
                    ("CNI_NETNS", s),
                    ("CNI_ARGS", s),
                ]);
                let _ = CniEnv::read(&e, cmd);
            }
            for stdin in [
                s.to_string(),
                json!({"cniVersion": s, "ipam": {"log_file_path": s, "log_file_max_size": s}})
                    .to_string(),
                json!({"cniVersion": "1.0.0", "prevResult": s, "ipam": {"log_file_max_count": -1}})
                    .to_string(),
            ] {
                let _ = parse_conf(stdin.as_bytes());
                let _ = reply_version(stdin.as_bytes());
            }
            let _ = prev_result_addresses(&json!(s));
        }
        for bytes in [
            &b"\xff\xfe"[..],
            b"{\"cniVersion\":\"1.0.0\",\"ipam\":\xff}",
            b"[",
            b"null",
        ] {
            let _ = parse_conf(bytes);
            let _ = reply_version(bytes);
        }
    }
}
