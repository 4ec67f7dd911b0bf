//! `[access]`: who may connect.

use std::ops::Range;

use super::{Doc, PolicyError, Value, sorted};
use crate::{Access, Policy};

/// The longest user or group name accepted in the policy.
const MAX_NAME_LEN: usize = 256;

const ACCESS_KEYS: &[&str] = &["users", "groups", "socket_group"];

/// Checks a user or group name (or a decimal id) as written in the policy.
pub(super) fn check_account(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} names must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("{kind} name {name:?} is longer than {MAX_NAME_LEN} bytes"));
    }
    if name.bytes().all(|b| b.is_ascii_digit()) && name.parse::<u32>().map_or(true, |id| id == u32::MAX) {
        return Err(format!("{kind} id {name} is out of range (0 to 4294967294)"));
    }
    if name.starts_with('-') {
        return Err(format!("{kind} name {name:?} must not start with '-'"));
    }
    if name.contains(['*', '?', '[', ']']) {
        return Err(format!("{kind} name {name:?} has a wildcard; list each {kind} by name or id"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, ':' | ',' | '/' | '\\')) {
        return Err(format!(
            "{kind} name {name:?} may not contain whitespace, control characters, ':', ',', '/' or '\\'"
        ));
    }
    Ok(())
}

/// Reads a list of account names into strings, refusing bad and duplicate entries.
fn accounts(doc: &Doc<'_>, path: &str, kind: &str, value: &Value<'_>) -> Result<Vec<String>, PolicyError> {
    let items: Vec<(String, Range<usize>)> =
        doc.strings(path, value)?.into_iter().map(|(s, span)| (s.to_owned(), span)).collect();
    for (name, span) in &items {
        check_account(kind, name).map_err(|reason| doc.at(span, format!("{path}: {reason}")))?;
    }
    doc.no_duplicates(path, &items)?;
    Ok(items.into_iter().map(|(name, _)| name).collect())
}

pub(super) fn read_access(doc: &Doc<'_>, value: &Value<'_>) -> Result<Access, PolicyError> {
    let mut access = Policy::default_policy().access;
    for (name, key, value) in sorted(doc.table("access", value)?) {
        match name {
            "users" => access.users = accounts(doc, "access.users", "user", value)?,
            "groups" => access.groups = accounts(doc, "access.groups", "group", value)?,
            "socket_group" => {
                let group = doc.string("access.socket_group", value)?;
                check_account("group", group)
                    .map_err(|reason| doc.at(&value.span(), format!("access.socket_group: {reason}")))?;
                access.socket_group = group.to_owned();
            }
            _ => return Err(doc.unknown("access", key, ACCESS_KEYS)),
        }
    }
    Ok(access)
}
