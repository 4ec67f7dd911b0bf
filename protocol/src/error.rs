//! Typed helper errors with stable numeric codes.
//!
//! The codes are part of the protocol: a client may match on [`ErrorCode`] across versions. New
//! codes are only ever appended.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why the helper refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HelperError {
    /// The policy does not allow it.
    #[error("denied by policy rule `{rule}`: {reason}")]
    Denied {
        /// The policy rule that decided, e.g. `users.allow`.
        rule: String,
        /// A sentence for the user.
        reason: String,
    },
    /// The object does not exist or is not the caller's.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The object exists in a state that forbids the request.
    #[error("conflict: {what}")]
    Conflict {
        /// What conflicts.
        what: String,
    },
    /// The caller reached a per-user limit.
    #[error("quota exceeded: at most {limit} {resource} per user (policy `quotas`)")]
    QuotaExceeded {
        /// Which resource, e.g. `taps`.
        resource: String,
        /// The limit.
        limit: u32,
    },
    /// The request is malformed or out of range.
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// The kernel (or a firewall tool) refused an operation.
    #[error("kernel error in {op}: {detail} (errno {errno})")]
    Kernel {
        /// The operation, e.g. `TUNSETIFF`.
        op: String,
        /// The errno, or 0 when there is none.
        errno: i32,
        /// Details.
        detail: String,
    },
    /// The helper's own state failed it (e.g. the ledger could not be saved) or one of its
    /// invariants broke; nothing the request would have made was left behind.
    #[error("internal error of banger-helper: {what}; see the helper's log")]
    Internal {
        /// What failed.
        what: String,
    },
    /// The client speaks another protocol version.
    #[error(
        "protocol version mismatch: client speaks {client}, helper speaks {helper}; install matching banger and banger-helper releases"
    )]
    VersionMismatch {
        /// The client's version.
        client: u32,
        /// The helper's version.
        helper: u32,
    },
}

/// The stable numeric code of a [`HelperError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// [`HelperError::Denied`].
    Denied = 1,
    /// [`HelperError::NotFound`].
    NotFound = 2,
    /// [`HelperError::Conflict`].
    Conflict = 3,
    /// [`HelperError::QuotaExceeded`].
    QuotaExceeded = 4,
    /// [`HelperError::InvalidRequest`].
    InvalidRequest = 5,
    /// [`HelperError::Kernel`].
    Kernel = 6,
    /// [`HelperError::VersionMismatch`].
    VersionMismatch = 7,
    /// [`HelperError::Internal`].
    Internal = 8,
}

impl ErrorCode {
    /// The number on the wire and in logs.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "E{:03}", self.as_u16())
    }
}

impl HelperError {
    /// This error's stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            HelperError::Denied { .. } => ErrorCode::Denied,
            HelperError::NotFound { .. } => ErrorCode::NotFound,
            HelperError::Conflict { .. } => ErrorCode::Conflict,
            HelperError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
            HelperError::InvalidRequest { .. } => ErrorCode::InvalidRequest,
            HelperError::Kernel { .. } => ErrorCode::Kernel,
            HelperError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            HelperError::Internal { .. } => ErrorCode::Internal,
        }
    }

    /// Shorthand for [`HelperError::InvalidRequest`].
    pub fn invalid(reason: impl Into<String>) -> Self {
        HelperError::InvalidRequest { reason: reason.into() }
    }

    /// Shorthand for [`HelperError::Internal`].
    pub fn internal(what: impl Into<String>) -> Self {
        HelperError::Internal { what: what.into() }
    }

    /// Shorthand for [`HelperError::Kernel`] from an errno.
    pub fn kernel(op: impl Into<String>, errno: nix::errno::Errno) -> Self {
        HelperError::Kernel { op: op.into(), errno: errno as i32, detail: errno.desc().to_owned() }
    }
}

/// The longest part of a client's text quoted back in an error or an audit record.
pub const QUOTE_MAX: usize = 64;

/// `text` quoted for an error message, cut after [`QUOTE_MAX`] characters (marked `…`), so a long
/// value from a client or a file is never echoed whole into answers, logs and the audit log.
pub fn quoted(text: &str) -> String {
    let short: String = text.chars().take(QUOTE_MAX).collect();
    if short.len() < text.len() { format!("{short:?}…") } else { format!("{short:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        let all = [
            (HelperError::Denied { rule: "r".into(), reason: "x".into() }, 1),
            (HelperError::NotFound { what: "x".into() }, 2),
            (HelperError::Conflict { what: "x".into() }, 3),
            (HelperError::QuotaExceeded { resource: "taps".into(), limit: 1 }, 4),
            (HelperError::invalid("x"), 5),
            (HelperError::kernel("TUNSETIFF", nix::errno::Errno::EPERM), 6),
            (HelperError::VersionMismatch { client: 2, helper: 1 }, 7),
            (HelperError::internal("x"), 8),
        ];
        for (e, code) in all {
            assert_eq!(e.code().as_u16(), code, "{e}");
        }
    }

    #[test]
    fn quoted_cuts_long_text() {
        assert_eq!(quoted("short"), "\"short\"");
        let long = quoted(&"x".repeat(60_000));
        assert!(long.len() < 80 && long.ends_with('…'), "{long}");
    }

    #[test]
    fn messages_name_the_cause() {
        let e = HelperError::Denied { rule: "users.allow".into(), reason: "uid 7 is not allowed".into() };
        assert_eq!(e.to_string(), "denied by policy rule `users.allow`: uid 7 is not allowed");
        let e = HelperError::kernel("TUNSETIFF", nix::errno::Errno::EBUSY);
        assert!(e.to_string().contains("TUNSETIFF") && e.to_string().contains("errno 16"));
    }
}
