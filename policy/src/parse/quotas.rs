//! `[quotas]` and its per-user overrides.

use std::collections::BTreeMap;

use toml::de::DeValue;

use super::{Doc, PolicyError, Value, join, sorted};
use super::{MAX_MEMORY_MIB, MAX_QUOTA, QUOTA_KEYS, QUOTAS_KEYS, access::check_account};
use crate::{Policy, Quotas};

/// Quotas as written in one table, before missing ones fall back to the defaults.
#[derive(Default)]
struct QuotaFields {
    max_vms: Option<u32>,
    max_taps: Option<u32>,
    max_loops: Option<u32>,
    max_vcpus: Option<u32>,
    max_memory_mib: Option<u32>,
}

impl QuotaFields {
    fn or(&self, base: Quotas) -> Quotas {
        Quotas {
            max_vms: self.max_vms.unwrap_or(base.max_vms),
            max_taps: self.max_taps.unwrap_or(base.max_taps),
            max_loops: self.max_loops.unwrap_or(base.max_loops),
            max_vcpus: self.max_vcpus.unwrap_or(base.max_vcpus),
            max_memory_mib: self.max_memory_mib.unwrap_or(base.max_memory_mib),
        }
    }

    /// Reads one quota key into `self`; `false` if `name` is not a quota key.
    fn read(
        &mut self,
        doc: &Doc<'_>,
        section: &str,
        name: &str,
        value: &Value<'_>,
    ) -> Result<bool, PolicyError> {
        let (slot, max) = match name {
            "max_vms" => (&mut self.max_vms, MAX_QUOTA),
            "max_taps" => (&mut self.max_taps, MAX_QUOTA),
            "max_loops" => (&mut self.max_loops, MAX_QUOTA),
            "max_vcpus" => (&mut self.max_vcpus, MAX_QUOTA),
            "max_memory_mib" => (&mut self.max_memory_mib, MAX_MEMORY_MIB),
            _ => return Ok(false),
        };
        let what = format!("a positive integer no larger than {max}");
        *slot = Some(doc.integer(&join(section, name), value, 1, max, &what)?);
        Ok(true)
    }
}

pub(super) fn read_quotas(
    doc: &Doc<'_>,
    value: &Value<'_>,
) -> Result<(Quotas, BTreeMap<String, Quotas>), PolicyError> {
    let mut defaults = QuotaFields::default();
    let mut users = Vec::new();
    for (name, key, value) in sorted(doc.table("quotas", value)?) {
        if name == "users" {
            for (user, user_key, table) in sorted(doc.table("quotas.users", value)?) {
                let section = format!("quotas.users.{user}");
                check_account("user", user)
                    .map_err(|reason| doc.at(&user_key.span(), format!("{section}: {reason}")))?;
                let mut fields = QuotaFields::default();
                let DeValue::Table(entries) = table.get_ref() else {
                    return Err(doc.wrong_type(
                        &section,
                        &format!("a table ([{section}]) of {}", QUOTA_KEYS.join(", ")),
                        table,
                    ));
                };
                for (q, q_key, q_value) in sorted(entries) {
                    if !fields.read(doc, &section, q, q_value)? {
                        return Err(doc.unknown(&section, q_key, QUOTA_KEYS));
                    }
                }
                users.push((user.to_owned(), fields));
            }
        } else if !defaults.read(doc, "quotas", name, value)? {
            return Err(doc.unknown("quotas", key, QUOTAS_KEYS));
        }
    }
    let quotas = defaults.or(Policy::default_policy().quotas);
    let users = users.into_iter().map(|(user, fields)| (user, fields.or(quotas))).collect();
    Ok((quotas, users))
}
