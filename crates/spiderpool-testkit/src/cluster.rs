//! A real Kubernetes control plane on loopback for the tests: etcd 3.6, kube-apiserver (client
//! certificates, RBAC) and, when a test needs workloads, kube-controller-manager and
//! kube-scheduler, all built from their Go modules by `scripts/kube-tools.sh` (its bin
//! directory in `SPIDERPOOL_KUBE_BIN`). Certificates are made with Debian's openssl; everything
//! lives in a temporary directory and is stopped and removed on drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::*;

/// The directory of the control plane's binaries: `SPIDERPOOL_KUBE_BIN`, which
/// `scripts/test.sh` sets from `scripts/kube-tools.sh`. `None` (with the reason printed) when
/// it is not set; with SPIDERPOOL_E2E_REQUIRED=1 (CI) that is a failure, not a skip.
pub fn kube_bin() -> Option<PathBuf> {
    let dir = std::env::var_os("SPIDERPOOL_KUBE_BIN").map(PathBuf::from);
    if let Some(d) = dir.filter(|d| d.join("kube-apiserver").exists()) {
        return Some(d);
    }
    let why = "SPIDERPOOL_KUBE_BIN does not name the control plane's bin directory \
               (export SPIDERPOOL_KUBE_BIN=$(scripts/kube-tools.sh | tail -n 1))";
    assert!(
        std::env::var("SPIDERPOOL_E2E_REQUIRED").as_deref() != Ok("1"),
        "{why}"
    );
    eprintln!("SKIPPED: {why}");
    None
}

/// The directory holding helm: `SPIDERPOOL_HELM_BIN`, which `scripts/test.sh` sets from
/// `scripts/helm-tool.sh`. `None` (with the reason printed) when it is not set; with
/// SPIDERPOOL_E2E_REQUIRED=1 (CI) that is a failure, not a skip.
pub fn helm_bin() -> Option<PathBuf> {
    let dir = std::env::var_os("SPIDERPOOL_HELM_BIN").map(PathBuf::from);
    if let Some(d) = dir.filter(|d| d.join("helm").exists()) {
        return Some(d);
    }
    let why = "SPIDERPOOL_HELM_BIN does not name helm's bin directory \
               (export SPIDERPOOL_HELM_BIN=$(scripts/helm-tool.sh | tail -n 1))";
    assert!(
        std::env::var("SPIDERPOOL_E2E_REQUIRED").as_deref() != Ok("1"),
        "{why}"
    );
    eprintln!("SKIPPED: {why}");
    None
}

/// How to start a control plane.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Also kube-controller-manager and kube-scheduler, so Deployments, DaemonSets and
    /// StatefulSets get pods placed on nodes.
    pub workloads: bool,
    /// The API server logs every request's metadata (see [`ControlPlane::requests_by`]).
    pub audit: bool,
    /// Real kubelets join: the API server listens on every address and advertises this one
    /// (which the nodes reach), authorizes kubelets (Node, RBAC), reaches them with a client
    /// certificate, resolves webhook Services to their endpoints, keeps the `kubernetes`
    /// Service's endpoints and admits pods as a cluster does (ServiceAccount tokens); the
    /// controller-manager runs every controller, node lifecycle included.
    pub real_nodes: Option<std::net::Ipv4Addr>,
}

/// A running control plane, stopped and removed on drop.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    bin: PathBuf,
    children: Vec<(String, Child)>,
    /// Each component's arguments, to start it again ([`ControlPlane::restart`]).
    args: Vec<(String, Vec<String>)>,
    /// The admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
}

impl ControlPlane {
    /// etcd and kube-apiserver, ready to serve; with `workloads`, also kube-controller-manager
    /// and kube-scheduler, so Deployments, DaemonSets and StatefulSets get pods placed on
    /// nodes.
    pub fn start(bin: &Path, workloads: bool) -> ControlPlane {
        Self::start_with(
            bin,
            Options {
                workloads,
                ..Options::default()
            },
        )
    }

    /// A control plane as `options` say.
    pub fn start_with(bin: &Path, options: Options) -> ControlPlane {
        let workloads = options.workloads;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cp = ControlPlane {
            kubeconfig: dir.path().join("admin.kubeconfig"),
            server: String::new(),
            dir,
            bin: bin.to_path_buf(),
            children: Vec::new(),
            args: Vec::new(),
        };
        let pki = cp.dir.path().join("pki");
        make_pki(&pki, options.real_nodes);
        let etcd_port = free_port();
        let peer_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cp.spawn(
            "etcd",
            &[
                "--name=default",
                &format!("--data-dir={}", cp.dir.path().join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        );
        let api_port = free_port();
        cp.server = format!("https://127.0.0.1:{api_port}");
        let p = |f: &str| pki.join(f).display().to_string();
        let mut audit = Vec::new();
        if options.audit {
            // Every request's metadata: who, which verb, which resource.
            let policy = cp.dir.path().join("audit-policy.yaml");
            std::fs::write(
                &policy,
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
            )
            .expect("audit policy");
            audit.push(format!("--audit-policy-file={}", policy.display()));
            audit.push(format!("--audit-log-path={}", cp.audit_log().display()));
            audit.push("--audit-log-format=json".into());
            // One file however long the run (0 would mean lumberjack's 100 MB, then a new
            // file, and counts read from the log would go backwards).
            audit.push("--audit-log-maxsize=1000000".into());
        }
        let real = options.real_nodes.map(|adv| {
            sign(
                &pki,
                "apiserver-kubelet-client",
                "/O=system:masters/CN=kube-apiserver-kubelet-client",
                CLIENT_EXT,
            );
            vec![
                "--bind-address=0.0.0.0".to_string(),
                format!("--advertise-address={adv}"),
                "--authorization-mode=Node,RBAC".into(),
                format!(
                    "--kubelet-client-certificate={}",
                    p("apiserver-kubelet-client.crt")
                ),
                format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
                format!("--kubelet-certificate-authority={}", p("ca.crt")),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--enable-aggregator-routing=true".into(),
            ]
        });
        let simulated: Vec<String> = [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--authorization-mode=RBAC",
            "--endpoint-reconciler-type=none",
            "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition",
        ]
        .map(String::from)
        .to_vec();
        let mode: Vec<&str> = real
            .as_ref()
            .unwrap_or(&simulated)
            .iter()
            .map(String::as_str)
            .collect();
        let audit: Vec<&str> = audit.iter().map(String::as_str).collect();
        cp.spawn(
            "kube-apiserver",
            &[
                &audit[..],
                &mode[..],
                &[
                    &format!("--etcd-servers={etcd_url}"),
                    &format!("--secure-port={api_port}"),
                    &format!("--tls-cert-file={}", p("apiserver.crt")),
                    &format!("--tls-private-key-file={}", p("apiserver.key")),
                    &format!(
                        "--cert-dir={}",
                        cp.dir.path().join("apiserver-certs").display()
                    ),
                    &format!("--client-ca-file={}", p("ca.crt")),
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    &format!("--service-account-key-file={}", p("sa.pub")),
                    &format!("--service-account-signing-key-file={}", p("sa.key")),
                    "--service-cluster-ip-range=10.233.0.0/18",
                    "--allow-privileged=true",
                    "--v=0",
                ],
            ]
            .concat(),
        );
        write_kubeconfig(&cp.kubeconfig, &cp.server, &pki);
        cp.wait_ready();
        if workloads {
            let kc = format!("--kubeconfig={}", cp.kubeconfig.display());
            cp.spawn(
                "kube-controller-manager",
                &[
                    &kc,
                    "--leader-elect=false",
                    if options.real_nodes.is_some() {
                        "--controllers=*"
                    } else {
                        "--controllers=*,-node-lifecycle-controller"
                    },
                    "--secure-port=0",
                    &format!("--service-account-private-key-file={}", p("sa.key")),
                    &format!("--root-ca-file={}", p("ca.crt")),
                    "--use-service-account-credentials=false",
                    "--v=0",
                ],
            );
            cp.spawn(
                "kube-scheduler",
                &[&kc, "--leader-elect=false", "--secure-port=0", "--v=0"],
            );
        }
        cp
    }

    fn spawn(&mut self, component: &str, args: &[&str]) {
        let log = self.dir.path().join(format!("{component}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("component log");
        let child = Command::new(self.bin.join(component))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {component}: {e}"));
        self.children.push((component.to_string(), child));
        self.args.retain(|(c, _)| c != component);
        self.args.push((
            component.to_string(),
            args.iter().map(|a| a.to_string()).collect(),
        ));
    }

    /// Kills `component` (`etcd`, `kube-apiserver`, …) with SIGKILL, as a crash would, starts
    /// it again with the same arguments and data, and waits until the API server serves again.
    pub fn restart(&mut self, component: &str) {
        let at = self
            .children
            .iter()
            .position(|(c, _)| c == component)
            .unwrap_or_else(|| panic!("no {component} runs"));
        let (_, mut child) = self.children.remove(at);
        let _ = child.kill();
        let _ = child.wait();
        let args = self
            .args
            .iter()
            .find(|(c, _)| c == component)
            .map(|(_, a)| a.clone())
            .expect("its arguments");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(component, &args);
        self.wait_ready();
    }

    /// The path of one of the control plane's binaries (`kube-proxy`, `kubectl`, ...).
    pub fn component(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// What `component` logged so far.
    pub fn log(&self, component: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{component}.log")))
            .unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            for (name, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                        .unwrap_or_default();
                    panic!("{name} exited with {status}:\n{log}");
                }
            }
            let out = self.kubectl(&["get", "--raw", "/readyz"], "");
            if out.success && out.stdout.trim() == "ok" {
                // The default namespace is made by a controller inside the apiserver.
                if self.kubectl(&["get", "namespace", "default"], "").success {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready in time:\n{}\n{}",
                out.stderr,
                self.log("kube-apiserver")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// How many requests `user` made so far, by verb (`get`, `list`, `watch`, `update`, …) and
    /// resource (`pods`, `spiderippools`, …), from the API server's audit log (a control plane
    /// started with [`Options::audit`]).
    pub fn requests_by(&self, user: &str) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        let Ok(file) = std::fs::File::open(self.audit_log()) else {
            return out;
        };
        // Line by line (the log of a big run is hundreds of MB), parsing only the user's.
        let needle = format!("\"username\":\"{user}\"");
        for line in std::io::BufRead::lines(std::io::BufReader::new(file)).map_while(Result::ok) {
            if !line.contains(&needle) {
                continue;
            }
            let Ok(ev) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if ev["user"]["username"] == user {
                let verb = ev["verb"].as_str().unwrap_or("?").to_string();
                let resource = ev["objectRef"]["resource"]
                    .as_str()
                    .unwrap_or("-")
                    .to_string();
                *out.entry((verb, resource)).or_insert(0) += 1;
            }
        }
        out
    }

    /// A kubeconfig authenticating as `user` in `groups` with a client certificate the
    /// control plane's CA signs (`system:masters` among the groups makes it an admin).
    pub fn client_kubeconfig(&self, user: &str, groups: &[&str]) -> PathBuf {
        let pki = self.dir.path().join("pki");
        let name = format!("user-{}", user.replace([':', '/'], "-"));
        let subj: String = groups
            .iter()
            .map(|g| format!("/O={g}"))
            .chain([format!("/CN={user}")])
            .collect();
        sign(&pki, &name, &subj, CLIENT_EXT);
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        write_kubeconfig_as(&path, &self.server, &pki, &name);
        path
    }

    /// The control plane's PKI directory (`ca.crt`, …).
    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// Issues `NAME.crt`/`NAME.key` in [`ControlPlane::pki`], signed by its CA: a client
    /// certificate for `user` in `groups`, or (with `serving_sans`, e.g. `IP:10.6.0.2,DNS:n1`) a
    /// serving one. Returns the certificate's path (the key is beside it).
    pub fn issue(
        &self,
        name: &str,
        user: &str,
        groups: &[&str],
        serving_sans: Option<&str>,
    ) -> PathBuf {
        let subj: String = groups
            .iter()
            .map(|g| format!("/O={g}"))
            .chain([format!("/CN={user}")])
            .collect();
        let ext = match serving_sans {
            Some(sans) => format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName={sans}\n"
            ),
            None => CLIENT_EXT.to_string(),
        };
        sign(&self.pki(), name, &subj, &ext);
        self.pki().join(format!("{name}.crt"))
    }

    /// A kubeconfig for the certificate `cert` (from [`ControlPlane::issue`]) reaching the API
    /// server at `server` (`https://ADDRESS:PORT`).
    pub fn kubeconfig_for(&self, cert: &str, server: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{cert}.kubeconfig"));
        write_kubeconfig_as(&path, server, &self.pki(), cert);
        path
    }

    /// The API server's port.
    pub fn port(&self) -> u16 {
        self.server
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("https://127.0.0.1:PORT")
    }

    /// Runs the real kubectl against the control plane as its admin.
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> Output {
        run(
            Command::new(self.bin.join("kubectl"))
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args),
            stdin,
        )
    }

    /// Applies the project's CRDs (`deploy/crds/`) with kubectl and waits until the API
    /// server serves every one.
    pub fn install_crds(&self) {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds");
        self.kubectl_ok(&["apply", "-f", crds.to_str().expect("utf-8 path")], "");
        self.kubectl_ok(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd",
                "--all",
            ],
            "",
        );
    }

    /// A kubeconfig that authenticates as the ServiceAccount `namespace/name` (a token from
    /// the TokenRequest API), so a process run with it has exactly that account's permissions.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        self.service_account_kubeconfig_for(namespace, name, None)
    }

    /// [`ControlPlane::service_account_kubeconfig`] with a token bound to the Pod `pod` of
    /// `namespace` (running as that account), as kubelet gives a pod: the API server then
    /// tells who uses it the pod's node (`authentication.kubernetes.io/node-name`).
    pub fn service_account_kubeconfig_for(
        &self,
        namespace: &str,
        name: &str,
        pod: Option<&str>,
    ) -> PathBuf {
        let mut args = vec!["create", "token", name, "-n", namespace, "--duration=2h"];
        if let Some(pod) = pod {
            args.extend(["--bound-object-kind=Pod", "--bound-object-name", pod]);
        }
        let token = self.kubectl_ok(&args, "");
        let ca = pki_base64(&self.dir.path().join("pki"), "ca.crt");
        let path = self
            .dir
            .path()
            .join(format!("{namespace}-{name}.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: sa\n  user:\n    token: {}\ncontexts:\n- name: local\n  context: {{cluster: local, user: sa, namespace: {namespace}}}\ncurrent-context: local\n",
                self.server,
                token.trim()
            ),
        )
        .expect("kubeconfig");
        path
    }

    /// [`ControlPlane::kubectl`], panicking with its output when it fails.
    pub fn kubectl_ok(&self, args: &[&str], stdin: &str) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.success,
            "kubectl {args:?} failed:\n{}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Stop in reverse order: the components before the apiserver before etcd.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs openssl in the PKI directory `dir`.
fn ossl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new EC key with a certificate request.
const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// Issues `NAME.key` and `NAME.crt` for the subject `subj` with the extensions `ext`, signed
/// by the CA in `dir`.
fn sign(dir: &Path, name: &str, subj: &str, ext: &str) {
    let (key, csr, crt, extf) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    ossl(
        dir,
        &[
            &["req"][..],
            &EC,
            &["-keyout", &key, "-out", &csr, "-subj", subj],
        ]
        .concat(),
    );
    std::fs::write(dir.join(&extf), ext).expect("ext file");
    ossl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "7",
            "-out",
            &crt,
            "-extfile",
            &extf,
        ],
    );
}

/// The extensions of a client certificate.
const CLIENT_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n";

/// A CA, the apiserver's serving certificate (IP SAN 127.0.0.1), an admin client certificate
/// in `system:masters`, and the service-account key pair, with openssl.
fn make_pki(dir: &Path, advertise: Option<std::net::Ipv4Addr>) {
    std::fs::create_dir_all(dir).expect("pki dir");
    ossl(
        dir,
        &[
            &["req", "-x509"][..],
            &EC,
            &[
                "-days",
                "7",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                "/CN=spiderpool-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            ],
        ]
        .concat(),
    );
    sign(
        dir,
        "apiserver",
        "/CN=kube-apiserver",
        &format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.233.0.1{}\n",
            advertise.map(|a| format!(",IP:{a}")).unwrap_or_default()
        ),
    );
    sign(dir, "admin", "/O=system:masters/CN=admin", CLIENT_EXT);
    ossl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-out",
            "sa.key",
        ],
    );
    ossl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

/// An admin kubeconfig with the certificates embedded.
/// A file of the control plane's PKI, base64 as a kubeconfig embeds it.
fn pki_base64(pki: &Path, file: &str) -> String {
    use base64::Engine as _;
    let data = std::fs::read(pki.join(file)).expect("pki file");
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn write_kubeconfig(path: &Path, server: &str, pki: &Path) {
    write_kubeconfig_as(path, server, pki, "admin");
}

/// A kubeconfig authenticating with the client certificate `cert` (`cert.crt`, `cert.key`).
fn write_kubeconfig_as(path: &Path, server: &str, pki: &Path, cert: &str) {
    use std::fmt::Write as _;
    let b64 = |f: &str| pki_base64(pki, f);
    let mut s = String::new();
    let _ = write!(
        s,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: local\n  context: {{cluster: local, user: admin}}\ncurrent-context: local\n",
        b64("ca.crt"),
        b64(&format!("{cert}.crt")),
        b64(&format!("{cert}.key")),
    );
    std::fs::write(path, s).expect("kubeconfig");
}
