//! The agent's unix socket and whom it trusts. The socket's directory is created 0750 and the
//! socket 0660 (owner root, group `--socket-group` when given) whatever the umask; a path that
//! is not a socket, or a socket another agent still answers on, is refused rather than
//! unlinked; and every connection's peer credentials (SO_PEERCRED) are checked: root, the
//! agent's own user, or a member of the socket group.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nix::unistd::{Gid, Group, Uid};
use tokio::net::{UnixListener, UnixStream};

/// Mode of the directories the agent creates for its socket.
pub const DIR_MODE: u32 = 0o750;
/// Mode of the socket.
pub const SOCKET_MODE: u32 = 0o660;

/// A group named by `--socket-group`: a name from the group database or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketGroup(pub u32);

impl std::str::FromStr for SocketGroup {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(gid) = s.parse::<u32>() {
            return Ok(SocketGroup(gid));
        }
        match Group::from_name(s) {
            Ok(Some(g)) => Ok(SocketGroup(g.gid.as_raw())),
            Ok(None) => Err(format!("group {s:?} does not exist")),
            Err(e) => Err(format!("looking up group {s:?}: {e}")),
        }
    }
}

/// Who may talk to the agent.
#[derive(Debug, Clone, Copy)]
pub struct Trust {
    /// The agent's own effective user.
    pub own_uid: u32,
    /// `--socket-group`.
    pub group: Option<u32>,
}

impl Trust {
    /// Root, the agent's own user, and the socket group.
    pub fn new(group: Option<SocketGroup>) -> Self {
        Trust {
            own_uid: Uid::effective().as_raw(),
            group: group.map(|g| g.0),
        }
    }

    /// `Ok` when the peer of `stream` is trusted; otherwise why not, naming the peer.
    pub fn check(&self, stream: &UnixStream) -> Result<(), String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("reading the peer's credentials: {e}"))?;
        let (uid, gid) = (cred.uid(), cred.gid());
        if uid == 0 || uid == self.own_uid {
            return Ok(());
        }
        if let Some(g) = self.group {
            // SO_PEERCRED carries the primary group; supplementary groups are read from the
            // peer process, which is still connected and so still alive.
            let supplementary = || {
                cred.pid()
                    .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
                    .is_some_and(|status| in_groups(&status, g))
            };
            if gid == g || supplementary() {
                return Ok(());
            }
        }
        Err(format!(
            "peer uid {uid} gid {gid} is not trusted by this agent (it trusts root, uid {}{})",
            self.own_uid,
            self.group
                .map(|g| format!(" and group {g}"))
                .unwrap_or_default()
        ))
    }
}

/// Whether the `Groups:` line of a `/proc/<pid>/status` lists `gid`.
fn in_groups(status: &str, gid: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

/// The bound socket; removes its file when dropped, if the file is still this socket.
pub struct SocketGuard {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        // Another agent may have been started on the path since (after this one was asked to
        // stop): its socket is not ours to remove.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.dev_ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the unix socket at `path`: creates missing directories 0750, removes a stale socket
/// (one nobody answers on), refuses anything else, and leaves the socket 0660 with `group`.
pub fn bind(
    path: &Path,
    group: Option<SocketGroup>,
) -> anyhow::Result<(UnixListener, SocketGuard)> {
    let gid = group.map(|g| Gid::from_raw(g.0));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dirs(dir, gid)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => bail!(
            "{} exists and is not a socket; refusing to replace it (remove it or choose another --socket)",
            path.display()
        ),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!(
                "another agent is serving on {}; refusing to take its socket over",
                path.display()
            ),
            Err(_) => std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("binding socket {}", path.display()))?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("giving socket {} to group {gid}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .with_context(|| format!("setting the mode of socket {}", path.display()))?;
    let m = std::fs::symlink_metadata(path)
        .with_context(|| format!("inspecting socket {}", path.display()))?;
    Ok((
        l,
        SocketGuard {
            path: path.to_path_buf(),
            dev_ino: (m.dev(), m.ino()),
        },
    ))
}

/// Creates `dir` and its missing ancestors with [`DIR_MODE`] (not the umask's), in `gid`.
/// Directories that exist already are left as they are.
fn create_dirs(dir: &Path, gid: Option<Gid>) -> anyhow::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("creating socket directory {}", d.display()))
            }
        }
        if let Some(gid) = gid {
            nix::unistd::chown(d, None, Some(gid))
                .with_context(|| format!("giving {} to group {gid}", d.display()))?;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(DIR_MODE))
            .with_context(|| format!("setting the mode of {}", d.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supplementary_groups_from_proc_status() {
        let status = "Name:\tx\nUid:\t1\t1\t1\t1\nGroups:\t4 24 1001 \n";
        assert!(in_groups(status, 1001));
        assert!(!in_groups(status, 100));
        assert!(!in_groups("Groups:\n", 0));
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!("1234".parse::<SocketGroup>(), Ok(SocketGroup(1234)));
        assert_eq!("root".parse::<SocketGroup>(), Ok(SocketGroup(0)));
        let e = "no-such-group-here".parse::<SocketGroup>().unwrap_err();
        assert!(e.contains("\"no-such-group-here\""), "{e}");
    }
}
