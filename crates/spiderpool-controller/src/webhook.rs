//! The admission webhooks (AdmissionReview v1 over HTTPS) for SpiderIPPool, SpiderSubnet and
//! SpiderReservedIP, served by every replica. The rules and mutations are
//! `spiderpool_control::admission`'s, the same `spiderpoolctl apply` runs. The serving
//! certificate and its CA live in the Secret `spiderpool-controller-webhook` (the first replica
//! makes them, the others read them), and the CA goes into the `caBundle` of the
//! ValidatingWebhookConfiguration and MutatingWebhookConfiguration `spiderpool-controller`, which
//! the controller applies.

use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::DynamicObject;
use kube::Api;
use serde_json::{json, Value};
use spiderpool_api::{Kind, Object};
use spiderpool_control::admission::{self, AdmissionError, Families};
use spiderpool_store::Store;

pub mod agents;

/// The name of the webhook configurations and of the Secret's prefix.
pub const NAME: &str = "spiderpool-controller";
/// The Secret holding the CA and the serving certificate.
pub const SECRET: &str = "spiderpool-controller-webhook";

/// The kinds served, with the resource, the webhook name and the path suffix.
const SERVED: [(Kind, &str, &str); 5] = [
    (Kind::IPPool, "spiderippools", "spiderippool"),
    (Kind::Subnet, "spidersubnets", "spidersubnet"),
    (Kind::ReservedIP, "spiderreservedips", "spiderreservedip"),
    (Kind::Coordinator, "spidercoordinators", "spidercoordinator"),
    (
        Kind::MultusConfig,
        "spidermultusconfigs",
        "spidermultusconfig",
    ),
];

/// Where the API server reaches the webhooks.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The Service `name` in the controller's namespace, on `port`.
    Service {
        /// Service name.
        name: String,
        /// Service port.
        port: i32,
    },
    /// A base URL (`https://host:port`), for a controller outside the cluster.
    Url(String),
}

/// The webhooks' settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub addr: std::net::SocketAddr,
    /// The controller's namespace.
    pub namespace: String,
    /// How the API server reaches the webhooks.
    pub endpoint: Endpoint,
    /// Whether to apply the webhook configurations.
    pub register: bool,
    /// The families the cluster serves.
    pub families: Families,
    /// The users that are Spiderpool agents (node restriction, see [`agents`]).
    pub agent_users: Vec<String>,
}

/// The path of the node restriction's webhook.
const AGENTS_PATH: &str = "/validate-spiderpool-spidernet-io-v2beta1-agents";

struct Ctx {
    store: Arc<dyn Store>,
    families: Families,
    agent_users: Vec<String>,
    /// The user this controller acts as: its writes are the auto-pool reconciler's.
    identity: Option<String>,
}

/// The user the API server knows this client as (a SelfSubjectReview).
async fn whoami(client: &kube::Client) -> Option<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    match api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
    {
        Ok(r) => r.status.and_then(|s| s.user_info).and_then(|u| u.username),
        Err(e) => {
            tracing::warn!(error = %e, "cannot learn this controller's own user (SelfSubjectReview): nobody may change an auto-created pool's addresses");
            None
        }
    }
}

fn path(mutate: bool, suffix: &str) -> String {
    let verb = if mutate { "mutate" } else { "validate" };
    format!("/{verb}-spiderpool-spidernet-io-v2beta1-{suffix}")
}

/// Starts serving the webhooks and registers them; returns once the server listens.
pub async fn start(
    client: kube::Client,
    store: Arc<dyn Store>,
    settings: Settings,
) -> anyhow::Result<()> {
    let pki = certificates(&client, &settings).await?;
    let tls = server_config(&pki)?;
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("binding --webhook-addr {}", settings.addr))?;
    tracing::info!(addr = %settings.addr, "serving the admission webhooks");
    let identity = whoami(&client).await;
    tracing::info!(user = ?identity, "the auto-pool reconciler's writes are this user's");
    let ctx = Arc::new(Ctx {
        store,
        families: settings.families,
        agent_users: settings.agent_users.clone(),
        identity,
    });
    let mut routes = Router::new().route(AGENTS_PATH, post(agents_review));
    for (kind, _, suffix) in SERVED {
        routes = routes
            .route(
                &path(true, suffix),
                post(move |s, b| review(s, b, kind, true)),
            )
            .route(
                &path(false, suffix),
                post(move |s, b| review(s, b, kind, false)),
            );
    }
    let routes = routes.with_state(ctx);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let routes = routes.clone();
            tokio::spawn(async move {
                let stream = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake");
                        return;
                    }
                };
                let svc = hyper_util::service::TowerToHyperService::new(routes);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "webhook connection");
                }
            });
        }
    });
    if settings.register {
        register(&client, &settings, &pki.ca).await?;
        tracing::info!("registered the admission webhooks");
        // Kept so: a `helm upgrade` re-renders the configurations without the caBundle, and
        // the API server could then reach no webhook until a restart.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REREGISTER);
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = register(&client, &settings, &pki.ca).await {
                    tracing::warn!(error = %e, "re-applying the webhook configurations");
                }
            }
        });
    }
    Ok(())
}

/// How often the webhook configurations are applied again (a no-op when nothing changed).
const REREGISTER: std::time::Duration = std::time::Duration::from_secs(30);

async fn review(
    State(ctx): State<Arc<Ctx>>,
    Json(body): Json<AdmissionReview<DynamicObject>>,
    kind: Kind,
    mutate: bool,
) -> Json<AdmissionReview<DynamicObject>> {
    let req = match request_of(body) {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e).into_review()),
    };
    let resp = if mutate {
        mutation(&ctx, &req, kind).await
    } else {
        validation(&ctx, &req, kind).await
    };
    Json(resp.into_review())
}

/// The request of a review, or why the body is not one.
fn request_of(
    body: AdmissionReview<DynamicObject>,
) -> Result<AdmissionRequest<DynamicObject>, String> {
    body.try_into()
        .map_err(|e| format!("not an AdmissionReview request: {e}"))
}

/// The node restriction of agents' writes to pool statuses and reserved IPs.
async fn agents_review(
    State(ctx): State<Arc<Ctx>>,
    Json(body): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req = match request_of(body) {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e).into_review()),
    };
    let asker = agents::asker(&req.user_info, &ctx.agent_users);
    let refusal = agents::refusal(ctx.store.as_ref(), &req, &asker).await;
    Json(agents::respond(&req, refusal).into_review())
}

fn object_of(kind: Kind, o: Option<&DynamicObject>) -> Result<Option<(Value, Object)>, String> {
    let Some(o) = o else { return Ok(None) };
    let raw = serde_json::to_value(o).map_err(|e| e.to_string())?;
    let obj = Object::from_value(kind, raw.clone()).map_err(|e| e.to_string())?;
    Ok(Some((raw, obj)))
}

fn deny(req: &AdmissionRequest<DynamicObject>, message: String) -> AdmissionResponse {
    let mut resp = AdmissionResponse::from(req).deny(message);
    resp.result.code = 422;
    resp.result.reason = "Invalid".into();
    resp
}

/// The paths the mutations of a kind write; the patch touches nothing else of the object.
fn mutated_paths(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Coordinator => &[
            "/spec/mode",
            "/spec/hijackCIDR",
            "/spec/tunePodRoutes",
            "/spec/hostRuleTable",
            "/spec/hostRPFilter",
            "/spec/podRPFilter",
            "/spec/txQueueLen",
            "/spec/vethMTU",
            "/spec/detectIPConflict",
            "/spec/detectGateway",
        ],
        Kind::MultusConfig => &[
            "/metadata/labels",
            "/spec/cniType",
            "/spec/macvlan",
            "/spec/ipvlan",
            "/spec/vlan",
            "/spec/sriov",
            "/spec/ibsriov",
            "/spec/ipoib",
            "/spec/ovs",
            "/spec/enableCoordinator",
            "/spec/disableIPAM",
            "/spec/coordinator",
        ],
        _ => &[
            "/metadata/finalizers",
            "/metadata/labels",
            "/metadata/ownerReferences",
            "/spec/ipVersion",
            "/spec/ips",
            "/spec/excludeIPs",
            "/spec/gateway",
            "/spec/routes",
        ],
    }
}

async fn mutation(
    ctx: &Ctx,
    req: &AdmissionRequest<DynamicObject>,
    kind: Kind,
) -> AdmissionResponse {
    let (raw, mut obj) = match object_of(kind, req.object.as_ref()) {
        Ok(Some(o)) => o,
        Ok(None) => return AdmissionResponse::from(req),
        // The validating webhook names what does not parse; a mutation never refuses.
        Err(e) => {
            tracing::debug!(error = %e, "mutating webhook: object does not parse");
            return AdmissionResponse::from(req);
        }
    };
    let by = by(ctx, req);
    if let Err(e) = admission::mutate(ctx.store.as_ref(), &mut obj, by).await {
        tracing::warn!(object = %obj.describe(), error = %e, "mutating webhook");
        return AdmissionResponse::from(req);
    }
    let mutated = obj.to_value();
    let mut desired = raw.clone();
    for p in mutated_paths(kind) {
        set_pointer(&mut desired, p, mutated.pointer(p).cloned());
    }
    let patch = json_patch::diff(&raw, &desired);
    if patch.0.is_empty() {
        return AdmissionResponse::from(req);
    }
    match AdmissionResponse::from(req).with_patch(patch) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "mutating webhook: patch");
            AdmissionResponse::from(req)
        }
    }
}

/// Who asks: this controller's own writes are the auto-pool reconciler's.
fn by(ctx: &Ctx, req: &AdmissionRequest<DynamicObject>) -> admission::By {
    let create = req.operation == Operation::Create;
    let own = ctx.identity.is_some() && req.user_info.username == ctx.identity;
    if own {
        admission::By::Reconciler { create }
    } else {
        admission::By::Webhook { create }
    }
}

/// Sets (or with `None`, removes) the value at a two-level JSON pointer.
fn set_pointer(v: &mut Value, pointer: &str, value: Option<Value>) {
    let mut parts = pointer.trim_start_matches('/').splitn(2, '/');
    let (Some(a), Some(b)) = (parts.next(), parts.next()) else {
        return;
    };
    let Some(parent) = v.get_mut(a).and_then(Value::as_object_mut) else {
        return;
    };
    match value {
        Some(Value::Null) | None => {
            parent.remove(b);
        }
        Some(x) => {
            parent.insert(b.to_string(), x);
        }
    }
}

async fn validation(
    ctx: &Ctx,
    req: &AdmissionRequest<DynamicObject>,
    kind: Kind,
) -> AdmissionResponse {
    let new = match object_of(kind, req.object.as_ref()) {
        Ok(Some((_, o))) => o,
        Ok(None) => return AdmissionResponse::from(req),
        Err(e) => return deny(req, e),
    };
    let old = match object_of(kind, req.old_object.as_ref()) {
        Ok(o) => o.map(|(_, o)| o),
        Err(_) => None,
    };
    let by = by(ctx, req);
    match admission::validate(ctx.store.as_ref(), &new, old.as_ref(), &ctx.families, by).await {
        Ok(()) => AdmissionResponse::from(req),
        Err(AdmissionError::Invalid(e)) => deny(req, e.to_string()),
        Err(e) => {
            // The datastore did not answer: refuse rather than admit unchecked.
            tracing::warn!(object = %new.describe(), error = %e, "validating webhook");
            deny(
                req,
                format!("{}: could not be checked: {e}", new.describe()),
            )
        }
    }
}

/// The CA and the serving certificate and key, PEM.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn dns_names(settings: &Settings) -> Vec<String> {
    let ns = &settings.namespace;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    match &settings.endpoint {
        Endpoint::Service { name, .. } => {
            for n in [
                name.clone(),
                format!("{name}.{ns}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}.svc.cluster.local"),
            ] {
                names.push(n);
            }
        }
        Endpoint::Url(url) => {
            if let Some(host) = url
                .strip_prefix("https://")
                .and_then(|r| r.split(['/', ':']).next())
                .filter(|h| !h.is_empty())
            {
                if !names.iter().any(|n| n == host) {
                    names.push(host.to_string());
                }
            }
        }
    }
    names
}

fn generate(names: &[String]) -> anyhow::Result<Pki> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "spiderpool-controller-webhook-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name
        .push(DnType::CommonName, "spiderpool-controller");
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(Pki {
        ca: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The Secret's certificates, made (and stored) by the first replica that finds none.
async fn certificates(client: &kube::Client, settings: &Settings) -> anyhow::Result<Pki> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let names = dns_names(settings);
    for _ in 0..5 {
        if let Some(s) = secrets
            .get_opt(SECRET)
            .await
            .with_context(|| format!("reading Secret {}/{SECRET}", settings.namespace))?
        {
            let field = |k: &str| {
                s.data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
            };
            if let (Some(ca), Some(cert), Some(key)) =
                (field("ca.crt"), field("tls.crt"), field("tls.key"))
            {
                return Ok(Pki { ca, cert, key });
            }
            anyhow::bail!(
                "Secret {}/{SECRET} lacks ca.crt, tls.crt or tls.key; delete it and the controller makes a new one",
                settings.namespace
            );
        }
        let pki = generate(&names)?;
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": settings.namespace},
            "type": "kubernetes.io/tls",
        }))?;
        let mut secret = secret;
        secret.data = Some(
            [
                ("ca.crt", &pki.ca),
                ("tls.crt", &pki.cert),
                ("tls.key", &pki.key),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect(),
        );
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(
                    secret = SECRET,
                    "made the webhook's CA and serving certificate"
                );
                return Ok(pki);
            }
            // Another replica was first: use its.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating Secret {}/{SECRET}", settings.namespace))
            }
        }
    }
    anyhow::bail!(
        "Secret {}/{SECRET} could not be read or made",
        settings.namespace
    )
}

fn server_config(pki: &Pki) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pki.cert.as_bytes())
        .collect::<Result<_, _>>()
        .context("the webhook certificate")?;
    let key = PrivateKeyDer::from_pem_slice(pki.key.as_bytes()).context("the webhook key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the webhook certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Applies the two webhook configurations with the CA.
async fn register(client: &kube::Client, settings: &Settings, ca: &str) -> anyhow::Result<()> {
    let bundle = base64_of(ca.as_bytes());
    let hooks = |mutate: bool| -> Vec<Value> {
        SERVED
            .iter()
            .map(|(kind, resource, suffix)| {
                let p = path(mutate, suffix);
                let scope = if kind.namespaced() { "Namespaced" } else { "Cluster" };
                let client_config = match &settings.endpoint {
                    Endpoint::Service { name, port } => json!({"caBundle": bundle,
                        "service": {"name": name, "namespace": settings.namespace, "port": port, "path": p}}),
                    Endpoint::Url(base) => json!({"caBundle": bundle,
                        "url": format!("{}{p}", base.trim_end_matches('/'))}),
                };
                json!({
                    "name": format!("{suffix}.spiderpool.spidernet.io"),
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 10,
                    "clientConfig": client_config,
                    "rules": [{"apiGroups": ["spiderpool.spidernet.io"], "apiVersions": ["v2beta1"],
                        "operations": ["CREATE", "UPDATE"], "resources": [resource], "scope": scope}],
                })
            })
            .collect()
    };
    let agents_client = match &settings.endpoint {
        Endpoint::Service { name, port } => json!({"caBundle": bundle,
            "service": {"name": name, "namespace": settings.namespace, "port": port, "path": AGENTS_PATH}}),
        Endpoint::Url(base) => json!({"caBundle": bundle,
            "url": format!("{}{AGENTS_PATH}", base.trim_end_matches('/'))}),
    };
    let mut validating_hooks = hooks(false);
    // Fails closed: a restriction that lets writes through while it is down restricts nothing.
    validating_hooks.push(json!({
        "name": "agents.spiderpool.spidernet.io",
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Fail",
        "timeoutSeconds": 10,
        "clientConfig": agents_client,
        "rules": [
            {"apiGroups": ["spiderpool.spidernet.io"], "apiVersions": ["v2beta1"],
             "operations": ["UPDATE"], "resources": ["spiderippools/status"], "scope": "Cluster"},
            {"apiGroups": ["spiderpool.spidernet.io"], "apiVersions": ["v2beta1"],
             "operations": ["CREATE", "UPDATE", "DELETE"], "resources": ["spiderreservedips"], "scope": "Cluster"},
        ],
    }));
    let params = PatchParams::apply(NAME).force();
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    mutating
        .patch(
            NAME,
            &params,
            &Patch::Apply(json!({"apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration", "metadata": {"name": NAME},
                "webhooks": hooks(true)})),
        )
        .await
        .context("applying MutatingWebhookConfiguration spiderpool-controller")?;
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    validating
        .patch(
            NAME,
            &params,
            &Patch::Apply(json!({"apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingWebhookConfiguration", "metadata": {"name": NAME},
                "webhooks": validating_hooks})),
        )
        .await
        .context("applying ValidatingWebhookConfiguration spiderpool-controller")?;
    tracing::debug!("registered the admission webhooks");
    Ok(())
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
