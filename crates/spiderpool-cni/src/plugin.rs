//! The CNI call as one command enum: environment and stdin checked, the agent asked, the result
//! shaped for the requested spec version.

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

use crate::client;
use crate::CniError;

/// Version used in an error reply before the config's own version is known.
pub const FALLBACK_VERSION: &str = "1.0.0";

/// The CNI verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    fn parse(s: Option<&String>) -> Result<Self, CniError> {
        let s = s.ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                "environment variable CNI_COMMAND is not set",
            )
        })?;
        Ok(match s.as_str() {
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

/// The `CNI_*` environment of one call.
struct CniEnv {
    container_id: String,
    netns: String,
    ifname: String,
    args: HashMap<String, String>,
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

fn parse_cni_args(s: &str) -> Result<HashMap<String, String>, CniError> {
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
    fn read(env: &HashMap<String, String>, cmd: Command) -> Result<Self, CniError> {
        let container_id = required(env, "CNI_CONTAINERID")?.to_string();
        let ifname = required(env, "CNI_IFNAME")?.to_string();
        let netns = match cmd {
            Command::Add | Command::Check => required(env, "CNI_NETNS")?.to_string(),
            _ => env.get("CNI_NETNS").cloned().unwrap_or_default(),
        };
        let args = parse_cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""))?;
        Ok(CniEnv {
            container_id,
            netns,
            ifname,
            args,
        })
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

fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            format!("decoding the network configuration on stdin: {e}"),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {:?} is not supported (supported: {})",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    Ok(conf)
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
    let file = conf.ipam.log_file_path.as_deref().and_then(|p| {
        if let Some(dir) = Path::new(p).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
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
    let cmd =
        Command::parse(env.get("CNI_COMMAND")).map_err(|e| (FALLBACK_VERSION.to_string(), e))?;
    if cmd == Command::Version {
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| SUPPORTED_VERSIONS.last().expect("versions").to_string());
        return Ok(Some(
            json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let conf = parse_conf(stdin).map_err(|e| {
        let v = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| FALLBACK_VERSION.to_string());
        (v, e)
    })?;
    let version = conf.cni_version.clone();
    init_logging(&conf);
    let with_version = |e: CniError| (version.clone(), e);
    let socket = PathBuf::from(
        conf.ipam
            .ipam_unix_socket_path
            .as_deref()
            .unwrap_or(DEFAULT_SOCKET),
    );
    match cmd {
        Command::Gc => return gc(&conf, &socket).map(|()| None).map_err(with_version),
        Command::Status => return status(&conf, &socket).map(|()| None).map_err(with_version),
        _ => {}
    }
    let cenv = CniEnv::read(env, cmd).map_err(with_version)?;
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
    tracing::info!(container_id = %env.container_id, ifname = %env.ifname, ips = ?result.ips, "ADD");
    Ok(result.to_json(&conf.cni_version))
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
    let resp: IpamAddResponse =
        client::call(socket, "POST", PATH_CHECK, Some(&env.del_args()))?.json(socket)?;
    let held = to_result(&resp, &env.ifname)?.to_json(&conf.cni_version);
    if let Some(prev) = &conf.prev_result {
        let (want, have) = (addresses(prev), addresses(&held));
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
