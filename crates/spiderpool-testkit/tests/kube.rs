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
