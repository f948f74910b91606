//! Addresses found in conflict: the chained `coordinator` plugin probed a pod's address before
//! using it and another host of the segment answered. The address is held back from allocation
//! by a SpiderReservedIP `ip-conflict-ADDRESS` (labelled, naming the MAC that answered and the
//! pod) for `--ip-conflict-hold`, as DHCP servers hold a declined lease for a probation period,
//! so the pod's next sandbox and every other pod get another address while the other host has
//! it; then the address is tried again (and held back again if the host still answers). Only
//! the container holding an address can report it. With upstream's `isReleaseConflictIPs` the
//! container's addresses on the interface are released too (a StatefulSet member keeps them,
//! as upstream). Every agent sweeps expired holds; an operator can delete one to end it early.

use std::time::SystemTime;

use spiderpool_api::agent::{HeldBack, IpamBatchDelArgs, IpamBatchDelResponse, IpamDelArgs};
use spiderpool_api::crd::ReservedIPSpec;
use spiderpool_api::{ObjectMeta, SpiderReservedIP};

use super::*;

/// How long an address found in conflict is held back by default (`--ip-conflict-hold`).
pub const CONFLICT_HOLD: Duration = Duration::from_secs(600);

/// The SpiderReservedIP holding back `ip`: `ip-conflict-10-6-168-61`, `ip-conflict-fd00--5`.
pub fn conflict_reservation_name(ip: &IpAddr) -> String {
    let mut name = format!(
        "{}{}",
        spiderpool_api::keys::CONFLICT_PREFIX,
        ip.to_string().replace([':', '.'], "-")
    );
    if name.ends_with('-') {
        name.push('0');
    }
    name
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl IpamService {
    /// How long an address found in conflict is held back from allocation.
    pub fn with_conflict_hold(mut self, hold: Duration) -> Self {
        self.conflict_hold = hold;
        self
    }

    /// `DELETE /v1/ipam/ips`: holds back the container's addresses another host answered for,
    /// then (`isReleaseConflictIPs`) releases what the container holds on the interface.
    pub async fn release_conflicts(&self, args: &IpamBatchDelArgs) -> Result<IpamBatchDelResponse> {
        let del = IpamDelArgs {
            container_id: args.container_id.clone(),
            if_name: args.if_name.clone(),
            net_namespace: args.net_namespace.clone(),
            pod_namespace: args.pod_namespace.clone(),
            pod_name: args.pod_name.clone(),
            pod_uid: args.pod_uid.clone(),
        };
        let pod = PodRef::of_del(&del)?;
        let bad = |m: String| ServiceError::BadArgs(ValidationError::Invalid(m));
        let record = record_of(self.store.as_ref(), &pod).await?;
        let held: Vec<IpAddr> = record
            .as_ref()
            .filter(|(_, ep, _, _)| {
                args.pod_uid.is_empty() || ep.status.current.uid == args.pod_uid
            })
            .map(|(_, _, _, nic)| nic.held().into_iter().map(|(_, ip)| ip).collect())
            .unwrap_or_default();
        let mut out = IpamBatchDelResponse::default();
        let until = SystemTime::now() + self.conflict_hold;
        let until_text = humantime::format_rfc3339_seconds(until).to_string();
        let mut ops = Vec::new();
        for c in &args.conflicts {
            if !held.contains(&c.ip) {
                return Err(bad(format!(
                    "{} is not held by container {} of pod {} on {}: only its holder can report a conflict for it",
                    c.ip,
                    pod.container_id,
                    pod.key(),
                    pod.nic
                )));
            }
            if !valid_mac(&c.mac) {
                return Err(bad(format!(
                    "conflict for {}: MAC address {:?} is not six hex pairs",
                    c.ip, c.mac
                )));
            }
            let name = conflict_reservation_name(&c.ip);
            let r = SpiderReservedIP {
                api_version: spiderpool_api::crd::API_VERSION.into(),
                kind: "SpiderReservedIP".into(),
                metadata: ObjectMeta {
                    name: name.clone(),
                    labels: [(
                        spiderpool_api::keys::LABEL_IP_CONFLICT.to_string(),
                        "true".to_string(),
                    )]
                    .into(),
                    annotations: [
                        (
                            spiderpool_api::keys::CONFLICT_MAC.to_string(),
                            c.mac.to_lowercase(),
                        ),
                        (spiderpool_api::keys::CONFLICT_POD.to_string(), pod.key()),
                        (
                            spiderpool_api::keys::CONFLICT_UNTIL.to_string(),
                            until_text.clone(),
                        ),
                    ]
                    .into(),
                    ..Default::default()
                },
                spec: ReservedIPSpec {
                    ip_version: Some(if c.ip.is_ipv4() { 4 } else { 6 }),
                    ips: vec![c.ip.to_string()],
                },
            };
            ops.push(Op::Put {
                kind: Kind::ReservedIP,
                key: name.clone(),
                value: typed::to_stored_value(&Object::ReservedIP(r)),
                expect: Expect::Any,
            });
            out.held_back.push(HeldBack {
                ip: c.ip,
                reservation: name,
                until: until_text.clone(),
            });
        }
        // The holds first, in a commit of their own: the addresses are never free and unheld.
        if !ops.is_empty() {
            self.commit(ops).await?;
            // This agent's next ADD must not pick a held address: a view that follows the
            // datastore's watch would learn of the holds only when the watch brings them.
            self.state.lock().await.invalidate();
            for h in &out.held_back {
                tracing::warn!(ip = %h.ip, pod = %pod.key(), reservation = %h.reservation, until = %h.until,
                    "another host answers for this address: held back from allocation");
            }
        }
        if !args.is_release_conflict_ips {
            return Ok(out);
        }
        if let Some((_, ep, _, _)) = &record {
            if self.keeps_addresses(&pod, ep).await? {
                tracing::info!(pod = %pod.key(), "a StatefulSet member keeps its addresses despite the conflict");
                return Ok(out);
            }
        }
        let mut cache = self.state.lock().await;
        retrying!(
            "release after a conflict",
            Some(&self.metrics.release),
            self.try_del(&pod, &mut cache)
        )?;
        out.released = record.is_some();
        Ok(out)
    }

    /// Deletes, every `every`, the conflict holds whose time is up.
    pub fn sweep_conflicts(self: &Arc<Self>, every: Duration) {
        let svc = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = svc.upgrade() else { return };
                if let Err(e) = s.sweep_conflicts_once().await {
                    tracing::warn!(error = %e, "sweeping expired IP-conflict holds");
                }
            }
        });
    }

    async fn sweep_conflicts_once(&self) -> Result<()> {
        let now = SystemTime::now();
        for (o, rev) in typed::list(self.store.as_ref(), Kind::ReservedIP).await? {
            let meta = o.metadata();
            if !meta
                .labels
                .contains_key(spiderpool_api::keys::LABEL_IP_CONFLICT)
            {
                continue;
            }
            let Some(until) = meta
                .annotations
                .get(spiderpool_api::keys::CONFLICT_UNTIL)
                .and_then(|u| humantime::parse_rfc3339(u).ok())
            else {
                continue;
            };
            if until > now {
                continue;
            }
            let name = meta.name.clone();
            // Another agent may have swept it first: that is fine.
            match self
                .commit(vec![Op::Delete {
                    kind: Kind::ReservedIP,
                    key: name.clone(),
                    expect: Expect::Revision(rev),
                }])
                .await
            {
                Ok(_) => {
                    tracing::info!(reservation = %name, "IP-conflict hold over: the address is tried again")
                }
                Err(e) => {
                    tracing::debug!(reservation = %name, error = %e, "IP-conflict hold not swept")
                }
            }
        }
        Ok(())
    }
}
