//! KubeVirt VMs keep their addresses, on a real control plane: KubeVirt's CRDs (written here
//! from its documented kinds: VirtualMachine, VirtualMachineInstance,
//! VirtualMachineInstanceMigration), the test playing KubeVirt's part (a VM, its VMI, the
//! launcher pods KubeVirt makes with their owner references), two simulated nodes running the
//! pods' CNI (Debian's macvlan and `spiderpool`, agents on `--datastore kubernetes`) and the
//! spiderpool-controller reclaiming what dead pods leave; the last launcher pod's DEL frees
//! the address once the VM is gone.

use serde_json::{json, Value};
use spiderpool_testkit::scale::world;
use spiderpool_testkit::{json_of, running, until, ControlPlane};

fn crd(kind: &str, plural: &str) -> String {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.kubevirt.io")},
        "spec": {"group": "kubevirt.io", "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase()},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object",
                    "x-kubernetes-preserve-unknown-fields": true}}}]}})
    .to_string()
}

fn uid(cp: &ControlPlane, what: &str, name: &str) -> String {
    json_of(cp, &["get", what, name])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The VMI `vm1`, owned by the VirtualMachine `vm1` (as KubeVirt makes it); its UID.
fn start_vmi(cp: &ControlPlane, vm_uid: &str) -> String {
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm1", "namespace": "default",
                "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                    "name": "vm1", "uid": vm_uid, "controller": true, "blockOwnerDeletion": true}]},
            "spec": {"domain": {"devices": {}}}})
        .to_string(),
    );
    uid(cp, "virtualmachineinstances.kubevirt.io", "vm1")
}

/// A launcher pod of the VMI `vm1` (UID `vmi_uid`) on the node of `zone`, as KubeVirt makes it.
fn launcher(cp: &ControlPlane, name: &str, vmi_uid: &str, zone: &str, migration: Option<&str>) {
    let mut annotations = json!({
        "v1.multus-cni.io/default-network": "kube-system/macvlan-conf",
        "ipam.spidernet.io/ippool": json!({"ipv4": ["vm"]}).to_string()});
    if let Some(m) = migration {
        annotations["kubevirt.io/migrationJobName"] = m.into();
    }
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "annotations": annotations,
                "labels": {"kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": "vm1"},
                "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                    "name": "vm1", "uid": vmi_uid, "controller": true, "blockOwnerDeletion": true}]},
            // KubeVirt gives launcher pods a grace period (30 s and more): the Pod object is
            // there while the runtime tears the sandbox down (DEL). One second here.
            "spec": {"terminationGracePeriodSeconds": 1, "nodeSelector": {"zone": zone},
                "containers": [{"name": "compute", "image": "registry.invalid/virt-launcher"}]}})
        .to_string(),
    );
}

fn address(cp: &ControlPlane, pod: &str) -> String {
    until(&format!("pod {pod} running with an address"), || {
        let p = json_of(cp, &["get", "pod", pod]);
        (running(&p) && p["status"]["podIP"].is_string())
            .then(|| p["status"]["podIP"].as_str().unwrap().to_string())
    })
}

/// Deletes `what/name` and waits until it is gone; the garbage collector may have deleted it
/// first (a VMI owned by its deleted VM, a launcher pod owned by its VMI).
fn gone(cp: &ControlPlane, what: &str, name: &str) {
    cp.kubectl_ok(
        &["delete", what, name, "--wait=false", "--ignore-not-found"],
        "",
    );
    until(&format!("{what} {name} gone"), || {
        (!cp.kubectl(&["get", what, name], "").success).then_some(())
    });
}

fn allocated(cp: &ControlPlane) -> u64 {
    json_of(cp, &["get", "spiderippool", "vm"])["status"]["allocatedIPCount"]
        .as_u64()
        .unwrap_or(0)
}

fn record(cp: &ControlPlane) -> Value {
    json_of(cp, &["get", "spiderendpoint", "vm1"])
}

#[test]
fn a_vm_keeps_its_address_across_restarts_and_a_live_migration_until_it_is_deleted() {
    let Some(w) = world("kv", &[]) else {
        return;
    };
    let cp = &w.cp;
    for (kind, plural) in [
        ("VirtualMachine", "virtualmachines"),
        ("VirtualMachineInstance", "virtualmachineinstances"),
        (
            "VirtualMachineInstanceMigration",
            "virtualmachineinstancemigrations",
        ),
    ] {
        cp.kubectl_ok(&["apply", "-f", "-"], &crd(kind, plural));
        until(&format!("{plural} served"), || {
            cp.kubectl(&["get", &format!("{plural}.kubevirt.io")], "")
                .success
                .then_some(())
        });
    }
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
            "metadata": {"name": "vm"},
            "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.200.10-10.6.200.20"], "gateway": "10.6.0.1"}})
        .to_string(),
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "vm1", "namespace": "default"},
            "spec": {"running": true, "template": {"spec": {"domain": {"devices": {}}}}}})
        .to_string(),
    );
    let vm_uid = uid(cp, "virtualmachines.kubevirt.io", "vm1");
    let mut vmi_uid = start_vmi(cp, &vm_uid);
    launcher(cp, "virt-launcher-vm1-0", &vmi_uid, "a", None);
    let first = address(cp, "virt-launcher-vm1-0");
    // The addresses are held under the VMI's name, by a record no pod owns (it outlives them).
    let r = record(cp);
    assert_eq!(r["status"]["ownerControllerType"], "VirtualMachineInstance");
    assert_eq!(r["status"]["ownerControllerName"], "vm1");
    assert!(r["metadata"]["ownerReferences"].is_null(), "{r}");
    let holders = json_of(cp, &["get", "spiderippool", "vm"])["status"]["allocatedIPs"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(holders.contains("default/vm1"), "{holders}");

    // F00001: restarted three times (the launcher pod and the VMI go, a new VMI and a new
    // launcher pod with other UIDs come): the same address each time. The first time the VM
    // stays without a VMI long enough for the reclaim to look (pod deleted, 5 s grace): the
    // VirtualMachine lives, so nothing is taken.
    for n in 1..=3 {
        gone(cp, "pod", &format!("virt-launcher-vm1-{}", n - 1));
        gone(cp, "virtualmachineinstances.kubevirt.io", "vm1");
        if n == 1 {
            std::thread::sleep(std::time::Duration::from_secs(9));
            assert_eq!(allocated(cp), 1, "the reclaim took a living VM's address");
        }
        vmi_uid = start_vmi(cp, &vm_uid);
        let pod = format!("virt-launcher-vm1-{n}");
        launcher(cp, &pod, &vmi_uid, "a", None);
        assert_eq!(address(cp, &pod), first, "restart {n}");
        assert_eq!(allocated(cp), 1);
        let r = record(cp);
        assert_eq!(r["status"]["current"]["uid"], uid(cp, "pod", &pod).as_str());
    }

    // F00002: a live migration to the other node: the target pod runs with the address while
    // the source still does, and keeps it when the source goes.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "mig1", "namespace": "default"}, "spec": {"vmiName": "vm1"}})
        .to_string(),
    );
    launcher(cp, "virt-launcher-vm1-target", &vmi_uid, "b", Some("mig1"));
    assert_eq!(address(cp, "virt-launcher-vm1-target"), first);
    assert_eq!(
        address(cp, "virt-launcher-vm1-3"),
        first,
        "the source still runs"
    );
    let r = record(cp);
    assert_eq!(r["status"]["current"]["node"], "node-b");
    gone(cp, "pod", "virt-launcher-vm1-3");
    std::thread::sleep(std::time::Duration::from_secs(9));
    assert_eq!(
        allocated(cp),
        1,
        "the source's DEL or the reclaim took the address"
    );
    assert_eq!(address(cp, "virt-launcher-vm1-target"), first);
    let target = uid(cp, "pod", "virt-launcher-vm1-target");
    assert_eq!(record(cp)["status"]["current"]["uid"], target.as_str());

    // The VM is deleted (KubeVirt deletes its VMI, the garbage collector the launcher pod):
    // the launcher pod's DEL frees the address and the record, the reclaim has nothing to do.
    let reclaimed = w.controller.metric("spiderpool_ip_gc_counts_total");
    gone(cp, "virtualmachines.kubevirt.io", "vm1");
    gone(cp, "virtualmachineinstances.kubevirt.io", "vm1");
    gone(cp, "pod", "virt-launcher-vm1-target");
    until("the VM's address released and its record gone", || {
        (allocated(cp) == 0 && !cp.kubectl(&["get", "spiderendpoint", "vm1"], "").success)
            .then_some(())
    });
    assert_eq!(
        w.controller.metric("spiderpool_ip_gc_counts_total"),
        reclaimed,
        "released by the DEL, not by the reclaim"
    );
}
