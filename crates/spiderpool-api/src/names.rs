//! The rules names must follow before they become keys: Kubernetes object names (DNS-1123
//! labels and subdomains), and the container IDs and interface names a runtime passes, checked
//! as libcni and the kernel check them. A name that breaks one is refused with the value named,
//! so no two different inputs can end up as one key and no name can split a log line or a row.

use crate::ValidationError;

/// Longest container ID accepted (runtimes use 64 hex digits; this leaves room for others).
pub const MAX_CONTAINER_ID: usize = 256;

/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME: usize = 15;

/// A DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters): Namespace
/// names, and each part of a subdomain.
pub fn dns1123_label(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::field(field, value, "must not be empty"));
    }
    if value.len() > 63 {
        return Err(ValidationError::field(
            field,
            value,
            "must be no more than 63 characters",
        ));
    }
    if !label_ok(value) {
        return Err(ValidationError::field(
            field,
            value,
            "must consist of lower case alphanumeric characters or '-', and must start and end \
             with an alphanumeric character (a DNS-1123 label, e.g. 'my-name')",
        ));
    }
    Ok(())
}

/// A DNS-1123 subdomain (labels joined by `.`, at most 253 characters): the names of most
/// Kubernetes objects, Pods and SpiderIPPools among them.
pub fn dns1123_subdomain(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::field(field, value, "must not be empty"));
    }
    if value.len() > 253 {
        return Err(ValidationError::field(
            field,
            value,
            "must be no more than 253 characters",
        ));
    }
    if !value.split('.').all(label_ok) {
        return Err(ValidationError::field(
            field,
            value,
            "must consist of lower case alphanumeric characters, '-' or '.', and must start and \
             end with an alphanumeric character (a DNS-1123 subdomain, e.g. 'example.com')",
        ));
    }
    Ok(())
}

fn label_ok(l: &str) -> bool {
    let b = l.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A container ID as libcni accepts it: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, here also at most
/// [`MAX_CONTAINER_ID`] characters.
pub fn container_id(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::field("containerID", value, "is required"));
    }
    if value.len() > MAX_CONTAINER_ID {
        return Err(ValidationError::Invalid(format!(
            "containerID {:?}… is {} characters long, more than {MAX_CONTAINER_ID}",
            truncated(value),
            value.len()
        )));
    }
    let b = value.as_bytes();
    if !b[0].is_ascii_alphanumeric()
        || !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    {
        return Err(ValidationError::field(
            "containerID",
            value,
            "has invalid characters: it must start with a letter or digit and hold only \
             letters, digits, '_', '.' and '-' (invalid characters in containerID)",
        ));
    }
    Ok(())
}

/// An interface name as the kernel and libcni accept it: 1 to [`MAX_IFNAME`] bytes, not `.` or
/// `..`, no `/`, `:` or whitespace.
pub fn interface_name(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::field("ifName", value, "is required"));
    }
    if value.len() > MAX_IFNAME {
        return Err(ValidationError::field(
            "ifName",
            value,
            &format!(
                "is {} bytes long; an interface name is at most {MAX_IFNAME}",
                value.len()
            ),
        ));
    }
    if value == "." || value == ".." {
        return Err(ValidationError::field(
            "ifName",
            value,
            "is not a valid interface name",
        ));
    }
    if value
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(ValidationError::field(
            "ifName",
            value,
            "must not contain '/', ':', whitespace or control characters",
        ));
    }
    Ok(())
}

/// The first characters of a long value, for a message that should not repeat all of it.
fn truncated(value: &str) -> String {
    value.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        for ok in ["a", "default", "kube-system", "a1", "0"] {
            assert!(dns1123_label("ns", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "A",
            "-a",
            "a-",
            "a.b",
            "a b",
            "a\nb",
            &"x".repeat(64),
        ] {
            let e = dns1123_label("ns", bad).unwrap_err().to_string();
            assert!(e.starts_with("ns "), "{e}");
        }
        for ok in ["test-app-j9ftl", "a.b.c", "web-0"] {
            assert!(dns1123_subdomain("name", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "b/c",
            "a..b",
            ".a",
            "Web",
            "x y\"'é😀;",
            &"x".repeat(254),
        ] {
            assert!(dns1123_subdomain("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn container_ids_as_libcni() {
        for ok in ["web", "0123abcdef", "a_b.c-d"] {
            assert!(container_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "a\nb",
            "x y\"'é😀;",
            "-a",
            "_a",
            &"a".repeat(4096),
        ] {
            assert!(container_id(bad).is_err(), "{bad:?}");
        }
        let e = container_id("a/b").unwrap_err().to_string();
        assert!(e.contains("invalid characters in containerID"), "{e}");
    }

    #[test]
    fn interface_names_as_the_kernel() {
        for ok in ["eth0", "net1", "a-very-long-nm"] {
            assert!(interface_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            "a:b",
            "a\nb",
            "twenty-characters-xx",
        ] {
            assert!(interface_name(bad).is_err(), "{bad:?}");
        }
    }
}
