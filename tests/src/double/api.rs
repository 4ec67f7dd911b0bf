//! Request routing: method, path and body to a [`VmmAction`], as Firecracker's
//! `parsed_request.rs` and `request/*.rs` do it, with the same fault messages.
//!
//! Only the first path segment selects the resource (`/machine-config/anything` is
//! `/machine-config`), resource ids may hold only alphanumerics and `_` and must equal the id in
//! the body, a `GET` may not have a body, and a `PUT`/`PATCH` must have one. Endpoints that
//! Firecracker has but the double does not emulate (balloon, MMDS, entropy, pmem,
//! cpu-config, memory hotplug, `GET /vm/config`) answer a 400 fault that says so.

use serde::de::DeserializeOwned;

use super::config::{
    ActionBody, ActionType, BlockDeviceConfig, BlockDeviceUpdateConfig, BootSourceConfig, LoggerConfig,
    MachineConfig, MachineConfigUpdate, MetricsConfig, NetworkInterfaceConfig, NetworkInterfaceUpdateConfig,
    SerialConfig, VmBody, VmStateRequest, VsockDeviceConfig,
};
use super::vm::VmmAction;

/// HTTP methods micro_http (Firecracker's HTTP server) accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl Method {
    /// Parses a request-line method; micro_http refuses every other one.
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "GET" => Some(Method::Get),
            "PUT" => Some(Method::Put),
            "PATCH" => Some(Method::Patch),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

/// Request-level errors, worded as Firecracker's `RequestError`.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Missing resource id.
    #[error("The ID cannot be empty.")]
    EmptyId,
    /// A fixed message.
    #[error("{0}")]
    Generic(String),
    /// Bad characters in a resource id.
    #[error("API Resource IDs can only contain alphanumeric characters and underscores.")]
    InvalidId,
    /// Unknown method/path combination.
    #[error("Invalid request method and/or path: {} {}.", .1.as_str(), .0)]
    InvalidPathMethod(String, Method),
    /// Bad JSON.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    SerdeJson(#[from] serde_json::Error),
}

/// A routed request: the action plus whether a deprecated field was used (Firecracker then adds
/// a `Deprecation: true` header and logs a warning).
#[derive(Debug)]
pub struct ParsedRequest {
    /// What to do.
    pub action: VmmAction,
    /// Deprecation warning, if any.
    pub deprecation: Option<&'static str>,
}

impl From<VmmAction> for ParsedRequest {
    fn from(action: VmmAction) -> Self {
        ParsedRequest { action, deprecation: None }
    }
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, RequestError> {
    Ok(serde_json::from_slice(body)?)
}

fn checked_id(id: Option<&str>) -> Result<&str, RequestError> {
    let id = id.ok_or(RequestError::EmptyId)?;
    if id.is_empty() {
        return Err(RequestError::EmptyId);
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(RequestError::InvalidId);
    }
    Ok(id)
}

fn method_to_error(method: Method) -> RequestError {
    RequestError::Generic(
        match method {
            Method::Get => "GET request cannot have a body.",
            Method::Put => "Empty PUT request.",
            Method::Patch => "Empty PATCH request.",
            Method::Delete => "Empty Delete request.",
        }
        .to_string(),
    )
}

fn not_emulated(method: Method, path: &str) -> Result<ParsedRequest, RequestError> {
    Ok(VmmAction::NotEmulated(format!("{} {path}", method.as_str())).into())
}

const ID_MISMATCH: &str = "The id from the path does not match the id from the body!";

/// Routes one request. `path` is the request URI's path; `body` is `None` when the request had no
/// body (micro_http treats `Content-Length: 0` the same).
pub fn parse_request(method: Method, path: &str, body: Option<&[u8]>) -> Result<ParsedRequest, RequestError> {
    let mut tokens = path.trim_start_matches('/').split_terminator('/');
    let first = tokens.next().unwrap_or("");
    let second = tokens.next();
    use Method::*;
    match (method, first, body) {
        (Get, "", None) => Ok(VmmAction::GetVmInstanceInfo.into()),
        (Get, "version", None) => Ok(VmmAction::GetVmmVersion.into()),
        (Get, "machine-config", None) => Ok(VmmAction::GetVmMachineConfig.into()),
        (Get, "balloon" | "mmds", None) => not_emulated(method, path),
        (Get, "vm", None) if second == Some("config") => not_emulated(method, path),
        (Get, "hotplug", None) if second == Some("memory") => not_emulated(method, path),
        (Get, _, Some(_)) => Err(method_to_error(Get)),
        (Put, "actions", Some(b)) => {
            let a: ActionBody = json(b)?;
            Ok(match a.action_type {
                ActionType::FlushMetrics => VmmAction::FlushMetrics,
                ActionType::InstanceStart => VmmAction::StartMicroVm,
                ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
            }
            .into())
        }
        (Put, "boot-source", Some(b)) => {
            Ok(VmmAction::ConfigureBootSource(json::<BootSourceConfig>(b)?).into())
        }
        (Put, "drives", Some(b)) => {
            let id = checked_id(second)?;
            let cfg: BlockDeviceConfig = json(b)?;
            if id != cfg.drive_id {
                return Err(RequestError::Generic(ID_MISMATCH.into()));
            }
            Ok(VmmAction::InsertBlockDevice(cfg).into())
        }
        (Put, "logger", Some(b)) => Ok(VmmAction::ConfigureLogger(json::<LoggerConfig>(b)?).into()),
        (Put, "machine-config", Some(b)) => {
            let cfg: MachineConfig = json(b)?;
            let deprecation =
                cfg.cpu_template.map(|_| "PUT /machine-config: cpu_template field is deprecated.");
            Ok(ParsedRequest {
                action: VmmAction::UpdateMachineConfiguration(MachineConfigUpdate::from(cfg)),
                deprecation,
            })
        }
        (Put, "serial", Some(b)) => Ok(VmmAction::ConfigureSerial(json::<SerialConfig>(b)?).into()),
        (Put, "metrics", Some(b)) => Ok(VmmAction::ConfigureMetrics(json::<MetricsConfig>(b)?).into()),
        (Put, "network-interfaces", Some(b)) => {
            let id = checked_id(second)?;
            let cfg: NetworkInterfaceConfig = json(b)?;
            if id != cfg.iface_id {
                return Err(RequestError::Generic(format!(
                    "The id from the path [{id}] does not match the id from the body [{}]!",
                    cfg.iface_id
                )));
            }
            Ok(VmmAction::InsertNetworkDevice(cfg).into())
        }
        (Put, "snapshot", Some(_)) => match second {
            Some("create") => Ok(VmmAction::CreateSnapshot.into()),
            Some("load") => Ok(VmmAction::LoadSnapshot.into()),
            Some(other) => Err(RequestError::InvalidPathMethod(format!("/snapshot/{other}"), Put)),
            None => Err(RequestError::Generic("Missing snapshot operation type.".into())),
        },
        (Put, "vsock", Some(b)) => {
            let cfg: VsockDeviceConfig = json(b)?;
            let deprecation = cfg.vsock_id.as_ref().map(|_| "PUT /vsock: vsock_id field is deprecated.");
            Ok(ParsedRequest { action: VmmAction::SetVsockDevice(cfg), deprecation })
        }
        (Put, "balloon" | "cpu-config" | "pmem" | "mmds" | "entropy", Some(_)) => not_emulated(method, path),
        (Put, "hotplug", Some(_)) if second == Some("memory") => not_emulated(method, path),
        (Put, _, None) => Err(method_to_error(Put)),
        (Patch, "balloon", _) => not_emulated(method, path),
        (Patch, "drives", Some(b)) => {
            let id = checked_id(second)?;
            let cfg: BlockDeviceUpdateConfig = json(b)?;
            if id != cfg.drive_id {
                return Err(RequestError::Generic(ID_MISMATCH.into()));
            }
            Ok(VmmAction::UpdateBlockDevice(cfg).into())
        }
        (Patch, "machine-config", Some(b)) => {
            let cfg: MachineConfigUpdate = json(b)?;
            if cfg == MachineConfigUpdate::default() {
                return Err(method_to_error(Patch));
            }
            let deprecation =
                cfg.cpu_template.map(|_| "PATCH /machine-config: cpu_template field is deprecated.");
            Ok(ParsedRequest { action: VmmAction::UpdateMachineConfiguration(cfg), deprecation })
        }
        (Patch, "network-interfaces", Some(b)) => {
            let id = checked_id(second)?;
            let cfg: NetworkInterfaceUpdateConfig = json(b)?;
            if id != cfg.iface_id {
                return Err(RequestError::Generic(format!(
                    "The id from the path [{id}] does not match the id from the body [{}]!",
                    cfg.iface_id
                )));
            }
            Ok(VmmAction::UpdateNetworkInterface(cfg).into())
        }
        (Patch, "vm", Some(b)) => {
            let vm: VmBody = json(b)?;
            Ok(match vm.state {
                VmStateRequest::Paused => VmmAction::Pause,
                VmStateRequest::Resumed => VmmAction::Resume,
            }
            .into())
        }
        (Patch, "mmds" | "pmem", Some(_)) => not_emulated(method, path),
        (Patch, "hotplug", Some(_)) if second == Some("memory") => not_emulated(method, path),
        (Patch, _, None) => Err(method_to_error(Patch)),
        (Delete, "drives" | "pmem" | "network-interfaces", None) => Ok(VmmAction::HotUnplugDevice.into()),
        (Delete, _, Some(_)) => Err(method_to_error(Delete)),
        (method, unknown, _) => Err(RequestError::InvalidPathMethod(unknown.to_string(), method)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(method: Method, path: &str, body: Option<&str>) -> String {
        parse_request(method, path, body.map(str::as_bytes)).unwrap_err().to_string()
    }

    #[test]
    fn routing_faults_read_like_firecracker() {
        assert_eq!(fault(Method::Get, "/foo", None), "Invalid request method and/or path: GET foo.");
        assert_eq!(fault(Method::Put, "/", Some("{}")), "Invalid request method and/or path: PUT .");
        assert_eq!(fault(Method::Get, "/", Some("{}")), "GET request cannot have a body.");
        assert_eq!(fault(Method::Put, "/boot-source", None), "Empty PUT request.");
        assert_eq!(fault(Method::Patch, "/vm", None), "Empty PATCH request.");
        assert_eq!(
            fault(Method::Put, "/drives/a-b", Some("{}")),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
        assert_eq!(fault(Method::Put, "/drives", Some("{}")), "The ID cannot be empty.");
        assert_eq!(
            fault(
                Method::Put,
                "/drives/a",
                Some(r#"{"drive_id":"b","is_root_device":false,"path_on_host":"/x"}"#)
            ),
            "The id from the path does not match the id from the body!"
        );
        assert_eq!(
            fault(Method::Put, "/network-interfaces/a", Some(r#"{"iface_id":"b","host_dev_name":"t"}"#)),
            "The id from the path [a] does not match the id from the body [b]!"
        );
        assert_eq!(
            fault(Method::Put, "/actions", Some(r#"{"action_type":"Reboot"}"#)),
            "An error occurred when deserializing the json body of a request: unknown variant `Reboot`, \
             expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel` at line 1 column 23."
        );
        assert_eq!(fault(Method::Patch, "/machine-config", Some("{}")), "Empty PATCH request.");
        assert_eq!(fault(Method::Put, "/snapshot", Some("{}")), "Missing snapshot operation type.");
        assert_eq!(
            fault(Method::Put, "/snapshot/x", Some("{}")),
            "Invalid request method and/or path: PUT /snapshot/x."
        );
    }

    #[test]
    fn routes_to_actions() {
        let p = parse_request(Method::Get, "/machine-config/extra", None).unwrap();
        assert!(matches!(p.action, VmmAction::GetVmMachineConfig));
        let p = parse_request(Method::Patch, "/vm", Some(br#"{"state":"Paused"}"#)).unwrap();
        assert!(matches!(p.action, VmmAction::Pause));
        let p =
            parse_request(Method::Put, "/vsock", Some(br#"{"vsock_id":"v","guest_cid":3,"uds_path":"/s"}"#))
                .unwrap();
        assert_eq!(p.deprecation, Some("PUT /vsock: vsock_id field is deprecated."));
        let p = parse_request(Method::Put, "/mmds", Some(b"{}")).unwrap();
        assert!(matches!(p.action, VmmAction::NotEmulated(ref s) if s == "PUT /mmds"));
        let p = parse_request(Method::Put, "/serial", Some(br#"{"serial_out_path":"/run/serial"}"#)).unwrap();
        assert!(
            matches!(p.action, VmmAction::ConfigureSerial(ref c) if c.serial_out_path.as_deref() == Some("/run/serial"))
        );
        assert!(
            fault(Method::Put, "/serial", Some(r#"{"serial_out_path":"/s","x":1}"#))
                .contains("unknown field `x`")
        );
    }
}
