//! kubectl-style tables: the columns of each kind, left-aligned three spaces apart.

use spiderpool_api::{Kind, Object};

fn s(v: Option<impl ToString>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

pub(crate) fn table(kind: Kind, items: &[Object], wide: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let header: Vec<&str> = match kind {
        Kind::IPPool => {
            let mut h = vec![
                "NAME",
                "VERSION",
                "SUBNET",
                "ALLOCATED-IP-COUNT",
                "TOTAL-IP-COUNT",
                "DEFAULT",
                "DISABLE",
            ];
            if wide {
                h.extend(["NODENAME", "MULTUSNAME", "APP-NAMESPACE"]);
            }
            h
        }
        Kind::Subnet => vec![
            "NAME",
            "VERSION",
            "SUBNET",
            "ALLOCATED-IP-COUNT",
            "TOTAL-IP-COUNT",
        ],
        Kind::ReservedIP => vec!["NAME", "VERSION", "IPS"],
        Kind::Endpoint => vec![
            "NAMESPACE",
            "NAME",
            "INTERFACE",
            "IPV4POOL",
            "IPV4",
            "IPV6POOL",
            "IPV6",
            "NODE",
        ],
        Kind::Coordinator => vec!["NAME", "MODE", "PODCIDRTYPE", "PHASE"],
        Kind::MultusConfig => vec!["NAMESPACE", "NAME", "CNITYPE", "COORDINATOR"],
        Kind::Node | Kind::Namespace => vec!["NAME", "LABELS"],
        Kind::Pod => vec!["NAMESPACE", "NAME", "NODE", "UID"],
        Kind::Workload => vec!["NAMESPACE", "KIND", "NAME", "REPLICAS"],
        Kind::NetworkAttachment => vec!["NAMESPACE", "NAME"],
    };
    rows.push(header.iter().map(|h| h.to_string()).collect());
    for o in items {
        let m = o.metadata();
        match o {
            Object::IPPool(p) => {
                let version = p
                    .spec
                    .ip_version
                    .or_else(|| p.to_pool().ok().map(|x| i64::from(x.family.number())));
                let st = p.status.clone().unwrap_or_default();
                let mut r = vec![
                    m.name.clone(),
                    s(version),
                    p.spec.subnet.clone(),
                    s(st.allocated_ip_count),
                    s(st.total_ip_count),
                    p.spec.default.unwrap_or(false).to_string(),
                    p.spec.disable.unwrap_or(false).to_string(),
                ];
                if wide {
                    r.push(p.spec.node_name.join(","));
                    r.push(p.spec.multus_name.join(","));
                    r.push(s(p.spec.pod_affinity.as_ref().and_then(|a| {
                        a.match_labels.get("ipam.spidernet.io/app-namespace")
                    })));
                }
                rows.push(r);
            }
            Object::Subnet(sub) => {
                let version = sub
                    .spec
                    .ip_version
                    .or_else(|| sub.to_pool().ok().map(|x| i64::from(x.family.number())));
                let st = sub.status.clone().unwrap_or_default();
                rows.push(vec![
                    m.name.clone(),
                    s(version),
                    sub.spec.subnet.clone(),
                    s(st.allocated_ip_count),
                    s(st.total_ip_count),
                ]);
            }
            Object::ReservedIP(r) => {
                let version = r.spec.ip_version.or_else(|| {
                    r.to_set()
                        .ok()
                        .and_then(|set| set.ranges().next().map(|x| i64::from(x.family().number())))
                });
                rows.push(vec![m.name.clone(), s(version), r.spec.ips.join(",")]);
            }
            Object::Endpoint(e) => {
                for nic in &e.status.current.ips {
                    rows.push(vec![
                        s(m.namespace.as_ref()),
                        m.name.clone(),
                        nic.interface.clone(),
                        s(nic.ipv4_pool.as_ref()),
                        s(nic.ipv4.as_ref()),
                        s(nic.ipv6_pool.as_ref()),
                        s(nic.ipv6.as_ref()),
                        e.status.current.node.clone(),
                    ]);
                }
            }
            Object::Coordinator(c) => rows.push(vec![
                m.name.clone(),
                s(c.spec.mode.as_ref()),
                s(c.spec.pod_cidr_type.as_ref()),
                s(c.status.as_ref().map(|st| &st.phase)),
            ]),
            Object::MultusConfig(c) => rows.push(vec![
                s(m.namespace.as_ref()),
                m.name.clone(),
                c.cni_type().to_string(),
                c.spec.enable_coordinator.unwrap_or(true).to_string(),
            ]),
            Object::Kube(Kind::Pod, k) => rows.push(vec![
                s(m.namespace.as_ref()),
                m.name.clone(),
                s(k.node_name()),
                s(m.uid.as_ref()),
            ]),
            Object::Kube(Kind::Workload, k) => rows.push(vec![
                s(m.namespace.as_ref()),
                k.kind.clone(),
                m.name.clone(),
                k.replicas().to_string(),
            ]),
            Object::Kube(Kind::NetworkAttachment, _) => {
                rows.push(vec![s(m.namespace.as_ref()), m.name.clone()])
            }
            Object::Kube(_, _) => {
                let labels: Vec<String> =
                    m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                rows.push(vec![
                    m.name.clone(),
                    if labels.is_empty() {
                        "<none>".into()
                    } else {
                        labels.join(",")
                    },
                ]);
            }
        }
    }
    render(&rows)
}

/// Prints `header` and `rows` in kubectl's layout.
pub(crate) fn columns(header: &[&str], rows: &[Vec<String>]) {
    let mut all = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    all.extend(rows.iter().cloned());
    print!("{}", render(&all));
}

/// kubectl's layout: left-aligned columns, three spaces apart.
fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == r.len() {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i] + 3)
                }
            })
            .collect();
        out.push_str(line.concat().trim_end());
        out.push('\n');
    }
    out
}
