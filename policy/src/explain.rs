//! The policy in plain sentences, for `banger-helper policy explain`.

use crate::Policy;

/// Describes what the policy lets each user (or only `user`) do, one sentence per line.
pub fn explain(policy: &Policy, user: Option<&str>) -> String {
    let _ = (policy, user);
    todo!()
}
