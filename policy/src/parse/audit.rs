//! `[audit]`: where records go.

use std::path::{Path, PathBuf};

use super::{Doc, PolicyError, Value, sorted};
use crate::{Audit, AuditTarget, Policy};

const AUDIT_KEYS: &[&str] = &["log"];

/// Checks an audit log path: absolute, normal (no `.`/`..` parts, no trailing '/'), printable.
fn check_audit_path(text: &str) -> Result<PathBuf, String> {
    let path = Path::new(text);
    let bad = |why: &str| {
        Err(format!("audit.log must be \"stderr\" or an absolute file path, got {text:?}: {why}"))
    };
    if !path.is_absolute() {
        return bad("the path is not absolute");
    }
    if text.ends_with('/') {
        return bad("the path names a directory");
    }
    if text.chars().any(char::is_control) {
        return bad("the path has control characters");
    }
    if text.len() > 4095 {
        return bad("the path is too long");
    }
    if text.split('/').skip(1).any(|part| matches!(part, "" | "." | "..")) {
        return bad("write the path without '.', '..' or '//'");
    }
    Ok(path.to_path_buf())
}

pub(super) fn read_audit(doc: &Doc<'_>, value: &Value<'_>) -> Result<Audit, PolicyError> {
    let mut audit = Policy::default_policy().audit;
    for (name, key, value) in sorted(doc.table("audit", value)?) {
        match name {
            "log" => {
                let text = doc.string("audit.log", value)?;
                audit.target = if text == "stderr" {
                    AuditTarget::Stderr
                } else {
                    AuditTarget::File(check_audit_path(text).map_err(|reason| doc.at(&value.span(), reason))?)
                };
            }
            _ => return Err(doc.unknown("audit", key, AUDIT_KEYS)),
        }
    }
    Ok(audit)
}
