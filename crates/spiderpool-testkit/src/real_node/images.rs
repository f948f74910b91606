//! The images real nodes run, built with `scripts/image.sh` into OCI archives (once per test
//! process) and imported into each node's containerd: the project's own, the sandbox (pause)
//! image, and busybox images standing in for an application.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The sandbox image every node's containerd is configured with.
pub const PAUSE_IMAGE: &str = "spiderpool.test/pause:1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn images_dir() -> PathBuf {
    let d = crate::bin_dir().join("test-images");
    std::fs::create_dir_all(&d).expect("test images dir");
    d
}

fn image_sh(args: &[&str]) {
    let out = Command::new(repo().join("scripts/image.sh"))
        .args(args)
        .output()
        .expect("running scripts/image.sh");
    assert!(
        out.status.success(),
        "scripts/image.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds (once per process and `name`) a busybox image running `cmd` (a JSON array).
pub fn busybox_image(name: &str, cmd: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built.lock().expect("images lock");
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let root = tempfile::tempdir().expect("image root");
    std::fs::create_dir_all(root.path().join("tmp")).expect("image root");
    let out = images_dir().join(format!(
        "{}-{}.tar",
        name.replace(['/', ':'], "_"),
        std::process::id()
    ));
    image_sh(&[
        "--root",
        &root.path().display().to_string(),
        "--busybox",
        "--name",
        name,
        "--cmd",
        cmd,
        "--out",
        &out.display().to_string(),
    ]);
    built.push((name.to_string(), out.clone()));
    out
}

/// The sandbox image: a shell that waits until it is told to stop.
pub(crate) fn pause_image() -> PathBuf {
    busybox_image(
        PAUSE_IMAGE,
        r#"["/bin/sh","-c","trap 'exit 0' TERM INT; while true; do sleep 3600 & wait $!; done"]"#,
    )
}

/// The project's image from the workspace's built binaries (the plugins built static), under
/// `ghcr.io/spiderpool-rs/spiderpool:TAG`; once per process and tag.
pub fn project_image(tag: &str) -> (String, PathBuf) {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let name = format!("ghcr.io/spiderpool-rs/spiderpool:{tag}");
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built.lock().expect("images lock");
    if let Some((_, p)) = built.iter().find(|(n, _)| *n == name) {
        return (name, p.clone());
    }
    let out = images_dir().join(format!("spiderpool-{tag}-{}.tar", std::process::id()));
    let profile = if crate::bin_dir().ends_with("release") {
        "release"
    } else {
        "dev"
    };
    image_sh(&[
        "--bin-dir",
        &crate::bin_dir().display().to_string(),
        "--profile",
        profile,
        "--name",
        &name,
        "--out",
        &out.display().to_string(),
    ]);
    built.push((name.clone(), out.clone()));
    (name, out)
}
