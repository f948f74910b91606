//! Upstream's SpiderMultusConfig webhook rules, with its messages; fields are named by their
//! JSON path (`spec.macvlan.vlanID`) and the value is quoted.

use super::*;
use crate::ValidationError;

fn field(path: &str, value: impl ToString, why: &str) -> ValidationError {
    ValidationError::field(path, value.to_string(), why)
}

fn vlan_id(path: &str, v: Option<i64>) -> Result<(), ValidationError> {
    match v {
        Some(n) if !(0..=4094).contains(&n) => Err(field(
            path,
            n,
            &format!("is invalid: invalid vlanId {n}, please make sure vlanId in range [0,4094]"),
        )),
        _ => Ok(()),
    }
}

fn not_negative(path: &str, v: Option<i64>, what: &str) -> Result<(), ValidationError> {
    match v {
        Some(n) if n < 0 => Err(field(
            path,
            n,
            &format!("is invalid: {what} must be greater than or equal to 0"),
        )),
        _ => Ok(()),
    }
}

/// The block each cniType takes, by JSON name.
fn block_of(kind: &str) -> &'static str {
    match kind {
        "macvlan" => "macvlan",
        "ipvlan" => "ipvlan",
        "vlan" => "vlan",
        "sriov" => "sriov",
        "ovs" => "ovs",
        "ib-sriov" => "ibsriov",
        "ipoib" => "ipoib",
        _ => "customCNI",
    }
}

impl SpiderMultusConfig {
    /// The blocks that are set, by JSON name.
    fn blocks(&self) -> Vec<&'static str> {
        let s = &self.spec;
        [
            ("macvlan", s.macvlan.is_some()),
            ("ipvlan", s.ipvlan.is_some()),
            ("vlan", s.vlan.is_some()),
            ("sriov", s.sriov.is_some()),
            ("ibsriov", s.ibsriov.is_some()),
            ("ipoib", s.ipoib.is_some()),
            ("ovs", s.ovs.is_some()),
            (
                "customCNI",
                s.custom_cni.as_deref().is_some_and(|c| !c.is_empty()),
            ),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(b, _)| b)
        .collect()
    }

    /// Upstream's webhook rules; the first broken one, naming the object, field and value.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validate_spec()
            .map_err(|e| e.in_object("SpiderMultusConfig", &self.full_name()))
    }

    /// The rules of an update from `old`: the NAD's name (annotation [`CR_NAME`]) may be
    /// removed but not set or changed, since the NAD already made would be left behind.
    pub fn validate_update(&self, old: &SpiderMultusConfig) -> Result<(), ValidationError> {
        let (was, now) = (
            old.metadata.annotations.get(CR_NAME),
            self.metadata.annotations.get(CR_NAME),
        );
        let path = format!("metadata.annotations[{CR_NAME}]");
        let err = match (was, now) {
            (Some(w), Some(n)) if w != n => Some(field(
                &path,
                n,
                &format!("is invalid: it's unsupported to change customized Multus net-attach-def resource name from '{w}' to '{n}'"),
            )),
            (None, Some(n)) => Some(field(
                &path,
                n,
                &format!(
                    "is invalid: it's unsupported to changed Multus net-attach-def '{}' to customized name '{n}'",
                    self.metadata.name
                ),
            )),
            _ => None,
        };
        match err {
            Some(e) => Err(e.in_object("SpiderMultusConfig", &self.full_name())),
            None => self.validate(),
        }
    }

    fn validate_spec(&self) -> Result<(), ValidationError> {
        let a = &self.metadata.annotations;
        if let Some(n) = a.get(CR_NAME) {
            crate::names::dns1123_subdomain(&format!("metadata.annotations[{CR_NAME}]"), n)
                .map_err(|e| {
                    ValidationError::Invalid(format!(
                        "invalid custom net-attach-def resource name: {e}"
                    ))
                })?;
        }
        if let Some(v) = a.get(CNI_VERSION) {
            if !CNI_VERSIONS.contains(&v.as_str()) {
                return Err(field(
                    &format!("metadata.annotations[{CNI_VERSION}]"),
                    v,
                    &format!(
                        "is invalid: unsupported CNI version (supported: {})",
                        CNI_VERSIONS.join(", ")
                    ),
                ));
            }
        }
        let kind = self.cni_type();
        if !CNI_TYPES.contains(&kind) {
            return Err(field(
                "spec.cniType",
                kind,
                &format!(
                    "is not supported (supported values: {})",
                    CNI_TYPES.join(", ")
                ),
            ));
        }
        let injects: Vec<&str> = INJECT_ANNOTATIONS
            .into_iter()
            .filter(|k| a.contains_key(*k))
            .collect();
        if matches!(kind, "ovs" | "custom") {
            if let Some(k) = injects.first() {
                return Err(ValidationError::Invalid(format!(
                    "metadata.annotations[{k}] is forbidden: the cniType {kind} does not support RDMA resource or network resource injected"
                )));
            }
        }
        let own = block_of(kind);
        if let Some(other) = self.blocks().into_iter().find(|b| *b != own) {
            return Err(ValidationError::Invalid(format!(
                "spec.{other} is forbidden: the cniType {kind} only supports spec.{own}, please remove other CNI configs"
            )));
        }
        let required = |what: &str| {
            ValidationError::Invalid(format!("spec.{what} is required: no spec.{what} specified"))
        };
        let s = &self.spec;
        // The pools and the resource name the pod webhook's injection needs.
        let (pools, resource) = match kind {
            "macvlan" | "ipvlan" | "vlan" => {
                let m = match kind {
                    "macvlan" => &s.macvlan,
                    "ipvlan" => &s.ipvlan,
                    _ => &s.vlan,
                };
                let m = m.as_ref().ok_or_else(|| required(kind))?;
                self.check_master(kind, m)?;
                (m.ippools.as_ref(), m.rdma_resource_name.clone())
            }
            "sriov" => {
                let c = s.sriov.as_ref().ok_or_else(|| required("sriov"))?;
                vlan_id("spec.sriov.vlanID", c.vlan_id)?;
                not_negative("spec.sriov.mtu", c.mtu, "MTU")?;
                not_negative(
                    "spec.sriov.minTxRateMbps",
                    c.min_tx_rate_mbps,
                    "minTxRateMbps",
                )?;
                not_negative(
                    "spec.sriov.maxTxRateMbps",
                    c.max_tx_rate_mbps,
                    "maxTxRateMbps",
                )?;
                if let (Some(min), Some(max)) = (c.min_tx_rate_mbps, c.max_tx_rate_mbps) {
                    if max > 0 && min > max {
                        return Err(field(
                            "spec.sriov.minTxRateMbps",
                            min,
                            &format!(
                                "is invalid: minTxRateMbps must be less than maxTxRateMbps ({max})"
                            ),
                        ));
                    }
                }
                if c.resource_name.as_deref().unwrap_or_default().is_empty() {
                    return Err(required("sriov.resourceName"));
                }
                (c.ippools.as_ref(), c.resource_name.clone())
            }
            "ib-sriov" => {
                let c = s.ibsriov.as_ref().ok_or_else(|| required("ibsriov"))?;
                if c.resource_name.as_deref().unwrap_or_default().is_empty() {
                    return Err(required("ibsriov.resourceName"));
                }
                if let Some(l) = &c.link_state {
                    if !["auto", "enable", "disable"].contains(&l.as_str()) {
                        return Err(field(
                            "spec.ibsriov.linkState",
                            l,
                            "is not supported (supported values: auto, enable, disable)",
                        ));
                    }
                }
                (c.ippools.as_ref(), c.resource_name.clone())
            }
            "ipoib" => {
                let c = s.ipoib.as_ref().ok_or_else(|| required("ipoib"))?;
                if c.master.is_empty() {
                    return Err(required("ipoib.master"));
                }
                (c.ippools.as_ref(), Some(c.master.clone()))
            }
            "ovs" => {
                let c = s.ovs.as_ref().ok_or_else(|| required("ovs"))?;
                if c.bridge.is_empty() {
                    return Err(required("ovs.bridge"));
                }
                vlan_id("spec.ovs.vlan", c.vlan)?;
                for (i, t) in c.trunk.iter().enumerate() {
                    let path = format!("spec.ovs.trunk[{i}]");
                    let show = serde_json::to_string(t).unwrap_or_default();
                    let bad = |why: &str| field(&path, &show, &format!("is invalid: {why}"));
                    if t.min_id.is_some_and(|n| !(0..=4094).contains(&n)) {
                        return Err(bad("incorrect trunk minID parameter"));
                    }
                    if t.max_id.is_some_and(|n| !(0..=4094).contains(&n)) {
                        return Err(bad("incorrect trunk maxID parameter"));
                    }
                    if let (Some(min), Some(max)) = (t.min_id, t.max_id) {
                        if max < min {
                            return Err(bad("minID is greater than maxID in trunk parameter"));
                        }
                    }
                    if t.id.is_some_and(|n| !(0..=4094).contains(&n)) {
                        return Err(bad("incorrect trunk id parameter"));
                    }
                }
                (c.ippools.as_ref(), None)
            }
            _ => {
                if let Some(c) = s.custom_cni.as_deref().filter(|c| !c.trim().is_empty()) {
                    if let Err(e) = serde_json::from_str::<serde_json::Value>(c) {
                        return Err(field(
                            "spec.customCNI",
                            c,
                            &format!(
                                "is invalid: customCniConfig isn't a valid JSON encoding: {e}"
                            ),
                        ));
                    }
                }
                (None, None)
            }
        };
        let name = self.full_name();
        let no_pools = pools.is_none_or(|p| p.ipv4.is_empty() && p.ipv6.is_empty());
        if a.contains_key(INJECT_ANNOTATIONS[0]) {
            if resource.as_deref().unwrap_or_default().is_empty() {
                return Err(ValidationError::Invalid(format!(
                    "spec.{own}: rdmaResourceName can not empty for spidermultusconfig {name} (annotation {})",
                    INJECT_ANNOTATIONS[0]
                )));
            }
            if no_pools {
                return Err(ValidationError::Invalid(format!(
                    "spec.{own}.ippools: no any ippools configured for spidermultusconfig {name} (annotation {})",
                    INJECT_ANNOTATIONS[0]
                )));
            }
        }
        if a.contains_key(INJECT_ANNOTATIONS[1])
            && !resource.as_deref().unwrap_or_default().is_empty()
            && no_pools
        {
            return Err(ValidationError::Invalid(format!(
                "spec.{own}.ippools: no any ippools configured for spidermultusconfig {name} (annotation {})",
                INJECT_ANNOTATIONS[1]
            )));
        }
        if let Some(c) = &s.coordinator {
            crate::coordinator::check_spec(c, "spec.coordinator", false)?;
        }
        if kind != "custom" {
            for (i, c) in s.chain_cni_json_data.iter().enumerate() {
                render::chain_plugin(i, c)?;
            }
        }
        Ok(())
    }

    fn check_master(&self, kind: &str, m: &MasterConfig) -> Result<(), ValidationError> {
        let p = format!("spec.{kind}");
        if kind == "vlan" {
            match m.vlan_mode.as_deref() {
                None | Some("manual") => {}
                Some("auto") if m.vlan_id.is_some() => {
                    return Err(field(
                        &format!("{p}.vlanID"),
                        m.vlan_id.unwrap_or_default(),
                        "is invalid: vlanId must not be specified when vlanMode is auto",
                    ))
                }
                Some("auto") => {}
                Some(other) => {
                    return Err(field(
                        &format!("{p}.vlanMode"),
                        other,
                        &format!("is invalid: invalid vlanMode {other}, supported values are manual and auto"),
                    ))
                }
            }
        } else if let Some(v) = &m.vlan_mode {
            return Err(field(
                &format!("{p}.vlanMode"),
                v,
                "is invalid: vlanMode is a setting of cniType vlan only",
            ));
        }
        vlan_id(&format!("{p}.vlanID"), m.vlan_id)?;
        not_negative(&format!("{p}.mtu"), m.mtu, "MTU")?;
        if m.ippools
            .as_ref()
            .is_some_and(|p| p.match_master_subnet == Some(true))
        {
            return Err(field(
                &format!("{p}.ippools.matchMasterSubnet"),
                "true",
                &format!("is invalid: MatchMasterSubnet feature is not supported for {kind}"),
            ));
        }
        if m.master.is_empty() || m.master.iter().any(String::is_empty) {
            return Err(field(
                &format!("{p}.master"),
                m.master.join(","),
                "is invalid: master can't be empty",
            ));
        }
        match &m.bond {
            None if m.master.len() > 1 => Err(field(
                &format!("{p}.master"),
                m.master.join(","),
                "is invalid: the bond property is nil with multiple Interfaces",
            )),
            Some(b) if b.name.is_empty() => Err(ValidationError::Invalid(format!(
                "{p}.bond.name is invalid: bond name can't be empty"
            ))),
            Some(b) if !(0..=6).contains(&b.mode) => Err(field(
                &format!("{p}.bond.mode"),
                b.mode,
                "is invalid: the bonding mode must be 0 to 6",
            )),
            _ => Ok(()),
        }
    }
}
