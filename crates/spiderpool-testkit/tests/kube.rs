//! The local control plane the Kubernetes-mode tests stand on: real etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler, driven by the real kubectl.

use spiderpool_testkit::{kube_bin, ControlPlane};

#[test]
fn the_control_plane_serves_kubectl_with_rbac_and_places_workloads() {
    let Some(bin) = kube_bin() else { return };
    let cp = ControlPlane::start(&bin, true);
    let version = cp.kubectl_ok(&["version", "-o", "json"], "");
    assert!(version.contains("\"gitVersion\": \"v1.36"), "{version}");
    // RBAC is on: the admin may, an unknown user may not.
    assert_eq!(
        cp.kubectl_ok(&["auth", "can-i", "create", "pods"], "")
            .trim(),
        "yes"
    );
    let out = cp.kubectl(&["auth", "can-i", "create", "pods", "--as", "nobody"], "");
    assert_eq!(out.stdout.trim(), "no", "{}", out.stderr);
    // The controller-manager turns a Deployment into pods, which wait for a node.
    cp.kubectl_ok(
        &[
            "create",
            "deployment",
            "web",
            "--image=registry.invalid/web",
            "--replicas=2",
        ],
        "",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let pods = cp.kubectl_ok(&["get", "pods", "-l", "app=web", "-o", "name"], "");
        if pods.lines().count() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pods from the Deployment: {pods}\n{}",
            cp.log("kube-controller-manager")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The workspace's root.
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn crds_in_deploy_are_what_the_rust_types_generate() {
    let dir = root().join("deploy/crds");
    let update = std::env::var("SPIDERPOOL_UPDATE_CRDS").as_deref() == Ok("1");
    for (name, yaml) in spiderpool_api::kube::crd_files() {
        let path = dir.join(&name);
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &yaml).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == yaml,
            "deploy/crds/{name} differs from what the types generate; regenerate with \
             SPIDERPOOL_UPDATE_CRDS=1 cargo test -p spiderpool-testkit --test kube crds"
        );
    }
}

#[test]
fn the_seed_pools_apply_through_kubectl_and_print_the_seed_columns() {
    let Some(bin) = kube_bin() else { return };
    let cp = ControlPlane::start(&bin, false);
    let crds = root().join("deploy/crds");
    cp.kubectl_ok(&["apply", "-f", crds.to_str().unwrap()], "");
    for crd in [
        "spiderippools.spiderpool.spidernet.io",
        "spidersubnets.spiderpool.spidernet.io",
        "spiderreservedips.spiderpool.spidernet.io",
    ] {
        cp.kubectl_ok(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{crd}"),
            ],
            "",
        );
    }
    // The seed's manifests, unchanged.
    let seed = root().join("examples/seed-zones/manifests");
    for f in ["02-subnets.yaml", "03-ippools.yaml"] {
        cp.kubectl_ok(&["apply", "-f", seed.join(f).to_str().unwrap()], "");
    }
    let table = cp.kubectl_ok(&["get", "spiderippool"], "");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "VERSION",
            "SUBNET",
            "ALLOCATED-IP-COUNT",
            "TOTAL-IP-COUNT",
            "DEFAULT",
            "DISABLE",
        ],
        "{table}"
    );
    assert!(
        table.contains("test-ippool-6") && table.contains("10.6.0.0/16"),
        "{table}"
    );
    let wide = cp.kubectl_ok(&["get", "sp", "-o", "wide"], "");
    assert!(
        wide.lines().next().unwrap().contains("APP-NAMESPACE"),
        "{wide}"
    );
    let subnets = cp.kubectl_ok(&["get", "ss"], "");
    assert!(
        subnets.contains("subnet-6") && subnets.contains("10.6.0.0/16"),
        "{subnets}"
    );
    // The category lists them all.
    let all = cp.kubectl_ok(&["get", "spiderpool", "-o", "name"], "");
    assert!(
        all.contains("spiderippool.spiderpool.spidernet.io/test-ippool-7"),
        "{all}"
    );
    // The status subresource is there: a status written through it shows in the columns.
    cp.kubectl_ok(
        &[
            "patch",
            "spiderippool",
            "test-ippool-6",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"allocatedIPCount":1,"totalIPCount":10}}"#,
        ],
        "",
    );
    let row = cp.kubectl_ok(&["get", "sp", "test-ippool-6", "--no-headers"], "");
    // (VERSION stays empty until the controller's mutating webhook derives it from the subnet.)
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols,
        ["test-ippool-6", "10.6.0.0/16", "1", "10", "false", "false"],
        "{row}"
    );
}
