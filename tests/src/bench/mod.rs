//! What the benchmarks measure and how they report it: each figure is a [`Metric`], printed as one
//! JSON line (`{"metric","value","unit","baseline","ratio","n"}`) for machines and in `bench`'s table
//! for people. [`storage`] measures how long a VM's root takes to make, for each storage kind.

pub mod figure;
pub mod fleet;
pub mod storage;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use banger_helper::audit::AuditLog;
use banger_helper::kernel::linux::{LinuxDm, LinuxFirewall, LinuxJails, LinuxKernel};
use banger_helper::ledger_store::LedgerStore;
use banger_helper::ops::Helper;
use banger_policy::{AuditTarget, Peer, Policy};
use banger_protocol::InstallId;

use serde::Serialize;

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    /// Dotted name, e.g. `storage.root_create.copy.8GiB`.
    pub metric: String,
    /// The median of the samples.
    pub value: f64,
    /// The unit of `value` and `baseline`.
    pub unit: &'static str,
    /// What the figure is compared with (the same work done the older or simpler way), if any.
    pub baseline: Option<f64>,
    /// `value / baseline`.
    pub ratio: Option<f64>,
    /// How many samples `value` is the median of.
    pub n: usize,
}

impl Metric {
    /// A figure in milliseconds from timed samples (their median), without a baseline.
    pub fn millis(metric: impl Into<String>, samples: &[Duration]) -> Metric {
        Metric {
            metric: metric.into(),
            value: median(samples).as_secs_f64() * 1e3,
            unit: "ms",
            baseline: None,
            ratio: None,
            n: samples.len(),
        }
    }

    /// The same figure compared with `baseline` (in the same unit).
    pub fn against(mut self, baseline: f64) -> Metric {
        self.baseline = Some(baseline);
        self.ratio = (baseline > 0.0).then(|| self.value / baseline);
        self
    }
}

/// The median of `samples` (the upper one of an even count); zero for none.
pub fn median(samples: &[Duration]) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A helper served in-process (no socket: the floor the benchmarks measure against) over this
/// machine's kernel, made inside `rt`: `policy`, its ledger in `state`, its audit log at
/// `audit`, device-mapper as `dm` gives it, the firewall the policy's `network.firewall` chooses.
pub fn in_process_helper(
    rt: &tokio::runtime::Runtime,
    policy: Policy,
    state: &Path,
    audit: &Path,
    dm: impl FnOnce() -> anyhow::Result<LinuxDm>,
) -> anyhow::Result<Arc<Helper<LinuxKernel>>> {
    let (store, ledger) = LedgerStore::open(state)?;
    let _guard = rt.enter();
    let kernel = Arc::new(LinuxKernel::new(
        LinuxFirewall::choose(&policy.network, false)?,
        dm()?,
        LinuxJails::unavailable(),
    )?);
    let audit = AuditLog::open(&AuditTarget::File(audit.to_owned()))?;
    Ok(Arc::new(Helper::new(policy, kernel, ledger, Some(store), audit)))
}

/// Root as the peer of a helper served in-process (the floor the benchmarks measure against),
/// of install `install`.
pub fn root_peer(install: &str) -> anyhow::Result<Peer> {
    Ok(Peer {
        uid: 0,
        gid: 0,
        pid: std::process::id() as i32,
        user: Some("root".into()),
        groups: vec![0],
        group_names: vec!["root".into()],
        install: Some(InstallId::new(install)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_one_json_line_with_every_field() {
        let ms = |n| Duration::from_millis(n);
        let m = Metric::millis("storage.root_create.copy.1GiB", &[ms(30), ms(10), ms(20)]);
        assert_eq!(m.value, 20.0);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"metric":"storage.root_create.copy.1GiB","value":20.0,"unit":"ms","baseline":null,"ratio":null,"n":3}"#
        );
        let m = m.against(80.0);
        assert_eq!((m.baseline, m.ratio), (Some(80.0), Some(0.25)));
        assert_eq!(median(&[]), Duration::ZERO);
        assert_eq!(median(&[ms(1), ms(4)]), ms(4));
    }
}
