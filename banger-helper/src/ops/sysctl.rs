//! Setting a sysctl: only a key the policy allowlists, only to a value it lists for that key. The
//! path is formed from the validated key ([`SysctlKey`]), never taken from the client.

use banger_protocol::HelperError;

use super::Helper;
use crate::kernel::{Kernel, Sysctl as _};
use crate::sysctl_key::{SysctlKey, quoted};

impl<K: Kernel> Helper<K> {
    pub(crate) fn sysctl_set(
        &self,
        key: &str,
        value: &str,
        names: &mut Vec<String>,
    ) -> Result<(), HelperError> {
        let key = SysctlKey::new(key).map_err(|e| HelperError::invalid(e.to_string()))?;
        names.push(key.to_string());
        let Some(rule) = self.policy.sysctls.iter().find(|r| r.key == key.as_str()) else {
            return Err(HelperError::Denied {
                rule: "sysctls".into(),
                reason: format!("{key} is not in the policy's sysctl allowlist"),
            });
        };
        if !rule.values.iter().any(|v| v == value) {
            return Err(HelperError::Denied {
                rule: format!("sysctls.{key}"),
                reason: format!(
                    "{} is not an allowed value for {key}; allowed: {}",
                    quoted(value),
                    rule.values.join(", ")
                ),
            });
        }
        self.kernel.sysctl().write(&key, value)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use banger_protocol::{HelperError, Request, Response};

    use crate::ops::testing::*;

    #[tokio::test]
    async fn only_allowlisted_keys_and_values() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let set = |key: &str, value: &str| Request::SysctlSet { key: key.into(), value: value.into() };
        assert_eq!(t.req(&p, set("net.ipv4.ip_forward", "1")).await, Response::Done);
        assert_eq!(t.kernel.world().sysctls["net.ipv4.ip_forward"], "1");
        for (k, v) in
            [("net.ipv4.ip_forward", "0"), ("kernel.panic", "1"), ("net/ipv4/ip_forward", "1"), ("../x", "1")]
        {
            let r = t.req(&p, set(k, v)).await;
            assert!(
                matches!(r, Response::Error(HelperError::Denied { .. } | HelperError::InvalidRequest { .. })),
                "{k}={v}: {r:?}"
            );
        }
        assert_eq!(t.kernel.calls().iter().filter(|c| c.starts_with("sysctl_write")).count(), 1);
    }

    /// The helper's own check (behind the policy's) never echoes a long client value whole.
    #[tokio::test]
    async fn a_long_value_is_quoted_short_in_the_error_and_the_audit() {
        let t = TestHelper::new();
        let mut names = Vec::new();
        let long = "9".repeat(60_000);
        let e = t.helper.sysctl_set("net.ipv4.ip_forward", &long, &mut names).unwrap_err();
        assert!(e.to_string().len() < 400, "{} bytes", e.to_string().len());
        let long_key = format!("net.{}", "x".repeat(60_000));
        let r = t.req(&t.peer(1000, "home"), Request::SysctlSet { key: long_key, value: long }).await;
        let Response::Error(e) = r else { panic!() };
        assert!(e.to_string().len() < 400, "{} bytes", e.to_string().len());
        let audit = t.audit_lines();
        let line = serde_json::to_string(audit.last().unwrap()).unwrap();
        assert!(line.len() < 1000, "audit line of {} bytes", line.len());
    }
}
