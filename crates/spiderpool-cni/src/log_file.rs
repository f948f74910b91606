//! The plugin's own log file, kept as upstream's lumberjack keeps it: before the plugin appends,
//! a file grown past `log_file_max_size` MB becomes `<path>.1` (older ones move to `.2`, `.3`,
//! …), at most `log_file_max_count` rotated files are kept and those untouched for more than
//! `log_file_max_age` days are removed. The file, and any directory made for it, get fixed modes
//! whatever the runtime's umask.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use spiderpool_api::cni::{code, IpamConf};

use crate::{excerpt, CniError};

/// `log_file_max_size` when unset or 0, in MB (upstream's default).
pub const DEFAULT_MAX_SIZE_MB: u64 = 100;
/// `log_file_max_age` when unset, in days (upstream's default).
pub const DEFAULT_MAX_AGE_DAYS: u64 = 30;
/// `log_file_max_count` when unset (upstream's default).
pub const DEFAULT_MAX_COUNT: u64 = 10;
/// Mode of a log file the plugin creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of a directory the plugin creates for its log file.
pub const DIR_MODE: u32 = 0o750;
/// A rotation lock older than this was left by a plugin that died while rotating.
const STALE_LOCK: Duration = Duration::from_secs(30);

/// Where the plugin logs, and when the file is rotated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// `log_file_path`.
    pub path: PathBuf,
    /// Rotate once the file is larger than this many bytes (`log_file_max_size` MB; 0 means
    /// the default, as in upstream).
    pub max_size: u64,
    /// Remove rotated files not written for more than this many days; 0 keeps them whatever
    /// their age (as lumberjack does).
    pub max_age_days: u64,
    /// Keep at most this many rotated files; 0 keeps them all (as lumberjack does).
    pub max_count: u64,
}

/// A whole number of `unit`, 0 or more, from `ipam.<key>`; `default` when the key is unset.
fn whole_number(key: &str, v: Option<&Value>, default: u64, unit: &str) -> Result<u64, CniError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().ok_or_else(|| {
            CniError::new(
                code::INVALID_NETWORK_CONFIG,
                format!(
                    "ipam {key} {} is not valid: it must be a whole number of {unit}, 0 or more",
                    excerpt(v)
                ),
            )
        }),
    }
}

impl LogFile {
    /// The log file the `ipam` section asks for, `None` when `log_file_path` is unset or
    /// empty. The rotation keys are checked either way: a bad one is code 7 naming the key and
    /// its value. Pure: no I/O.
    pub fn from_ipam(ipam: &IpamConf) -> Result<Option<LogFile>, CniError> {
        let size_mb = whole_number(
            "log_file_max_size",
            ipam.log_file_max_size.as_ref(),
            DEFAULT_MAX_SIZE_MB,
            "megabytes",
        )?;
        let max_age_days = whole_number(
            "log_file_max_age",
            ipam.log_file_max_age.as_ref(),
            DEFAULT_MAX_AGE_DAYS,
            "days",
        )?;
        let max_count = whole_number(
            "log_file_max_count",
            ipam.log_file_max_count.as_ref(),
            DEFAULT_MAX_COUNT,
            "files",
        )?;
        let Some(path) = ipam.log_file_path.as_deref().filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let size_mb = if size_mb == 0 {
            DEFAULT_MAX_SIZE_MB
        } else {
            size_mb
        };
        Ok(Some(LogFile {
            path: PathBuf::from(path),
            max_size: size_mb.saturating_mul(1024 * 1024),
            max_age_days,
            max_count,
        }))
    }

    /// Rotates the file if it is due, then opens it for appending. The file and its missing
    /// directories are created with [`FILE_MODE`] and [`DIR_MODE`]; a rotation that fails
    /// leaves the file where it is, to be appended to.
    pub fn open(&self) -> io::Result<File> {
        if let Some(dir) = self.dir() {
            create_dirs(dir)?;
        }
        let _ = self.rotate();
        open_append(&self.path)
    }

    fn dir(&self) -> Option<&Path> {
        self.path.parent().filter(|d| !d.as_os_str().is_empty())
    }

    fn with_suffix(&self, suffix: &str) -> PathBuf {
        let mut s = OsString::from(self.path.as_os_str());
        s.push(".");
        s.push(suffix);
        PathBuf::from(s)
    }

    fn due(&self) -> bool {
        fs::metadata(&self.path).is_ok_and(|m| m.is_file() && m.len() > self.max_size)
    }

    fn rotate(&self) -> io::Result<()> {
        if self.due() {
            // Concurrent calls for other containers may find the file due at once: one rotates,
            // the others append (to the old file or the new one).
            if let Some(_lock) = Lock::take(self.with_suffix("lock"))? {
                if self.due() {
                    self.shift()?;
                }
            }
        }
        self.prune()
    }

    /// `<path>.N` → `<path>.N+1` from the oldest down (past `max_count` removed), then
    /// `<path>` → `<path>.1`. Stops at the first failed rename so nothing is overwritten.
    fn shift(&self) -> io::Result<()> {
        let mut old = self.rotated()?;
        old.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        for (n, p) in old {
            match n
                .checked_add(1)
                .filter(|&m| self.max_count == 0 || m <= self.max_count)
            {
                Some(m) => fs::rename(&p, self.with_suffix(&m.to_string()))?,
                None => remove_quietly(&p),
            }
        }
        fs::rename(&self.path, self.with_suffix("1"))
    }

    /// Removes rotated files past `max_count` or older than `max_age_days`.
    fn prune(&self) -> io::Result<()> {
        let cutoff = Some(self.max_age_days).filter(|&d| d > 0).and_then(|d| {
            SystemTime::now().checked_sub(Duration::from_secs(d.saturating_mul(86_400)))
        });
        for (n, p) in self.rotated()? {
            let too_many = self.max_count > 0 && n > self.max_count;
            let too_old = cutoff.is_some_and(|c| {
                fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < c)
            });
            if too_many || too_old {
                remove_quietly(&p);
            }
        }
        Ok(())
    }

    /// The rotated files `<path>.N` (N ≥ 1, written without leading zeros) that exist.
    fn rotated(&self) -> io::Result<Vec<(u64, PathBuf)>> {
        let Some(name) = self.path.file_name() else {
            return Ok(Vec::new());
        };
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(b'.');
        let mut out = Vec::new();
        for entry in fs::read_dir(self.dir().unwrap_or(Path::new(".")))? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(digits) = file_name.as_bytes().strip_prefix(prefix.as_slice()) else {
                continue;
            };
            if digits.first().is_none_or(|d| *d == b'0') || !digits.iter().all(u8::is_ascii_digit) {
                continue;
            }
            if let Some(n) = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
            {
                out.push((n, entry.path()));
            }
        }
        Ok(out)
    }
}

/// Creates `dir` and its missing parents with [`DIR_MODE`] exactly; existing ones are left as
/// they are.
fn create_dirs(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent)?;
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        // The umask has had its say on the mode given to mkdir; set it exactly.
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens `path` for appending; a file this call creates gets [`FILE_MODE`] exactly.
fn open_append(path: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(f) => {
            f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
            Ok(f)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().append(true).open(path)
        }
        Err(e) => Err(e),
    }
}

fn remove_quietly(p: &Path) {
    let _ = fs::remove_file(p);
}

/// `<path>.lock`, held by the one plugin that rotates; removed when dropped.
struct Lock(PathBuf);

impl Lock {
    /// Takes the lock, or `None` while another plugin holds it. A lock older than
    /// [`STALE_LOCK`] is taken over.
    fn take(path: PathBuf) -> io::Result<Option<Lock>> {
        for _ in 0..2 {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&path)
            {
                Ok(_) => return Ok(Some(Lock(path))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let stale = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > STALE_LOCK);
                    if !stale {
                        return Ok(None);
                    }
                    remove_quietly(&path);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        remove_quietly(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ipam(keys: Value) -> IpamConf {
        serde_json::from_value(keys).unwrap()
    }

    #[test]
    fn defaults_zeroes_and_bad_values() {
        let l = LogFile::from_ipam(&ipam(json!({"log_file_path": "/l"})))
            .unwrap()
            .unwrap();
        assert_eq!(
            (l.max_size, l.max_age_days, l.max_count),
            (100 << 20, 30, 10)
        );
        let l = LogFile::from_ipam(&ipam(json!({"log_file_path": "/l", "log_file_max_size": 0, "log_file_max_age": 0, "log_file_max_count": 0})))
            .unwrap()
            .unwrap();
        assert_eq!((l.max_size, l.max_age_days, l.max_count), (100 << 20, 0, 0));
        assert_eq!(LogFile::from_ipam(&ipam(json!({}))).unwrap(), None);
        for (key, v, shown) in [
            ("log_file_max_size", json!(-1), "-1"),
            ("log_file_max_size", json!("100"), "\"100\""),
            ("log_file_max_age", json!(1.5), "1.5"),
            ("log_file_max_count", json!(true), "true"),
            ("log_file_max_count", json!({"a": 1}), "{\"a\":1}"),
        ] {
            // Checked even without a log file, as upstream decodes them either way.
            let e = LogFile::from_ipam(&ipam(json!({ key: v }))).unwrap_err();
            assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
            assert!(e.msg.contains(key) && e.msg.contains(shown), "{}", e.msg);
        }
        let huge = LogFile::from_ipam(&ipam(
            json!({"log_file_path": "/l", "log_file_max_size": u64::MAX, "log_file_max_age": u64::MAX}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(huge.max_size, u64::MAX);
    }

    #[test]
    fn rotated_names_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        for n in [
            "p.log.1",
            "p.log.12",
            "p.log.01",
            "p.log.x",
            "p.log.",
            "p.log.lock",
            "q.log.2",
        ] {
            fs::write(dir.path().join(n), "").unwrap();
        }
        let l = LogFile {
            path,
            max_size: 1,
            max_age_days: 0,
            max_count: 0,
        };
        let mut got: Vec<u64> = l.rotated().unwrap().into_iter().map(|(n, _)| n).collect();
        got.sort();
        assert_eq!(got, [1, 12]);
    }
}
