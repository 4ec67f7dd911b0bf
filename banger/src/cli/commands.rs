//! What each `banger` command does: talk to the daemon (starting it when needed), print human
//! tables or JSON, and for `ssh`/`run` hand the terminal to OpenSSH.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use hyper::Method;

use crate::api_types::{CreateVm, ImageView, ImportImage, Status, VmView};
use crate::cli::args::{Cli, Command, DaemonCommand, ImageCommand, VmCommand, VmShape};
use crate::cli::client::{ClientError, DaemonClient, connect_or_start};
use crate::config::Config;
use crate::paths::Paths;
use crate::ssh;

/// Runs one CLI invocation.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    crate::daemon::startup::refuse_root("banger")?;
    let paths = Paths::from_env()?;
    paths.ensure_dirs()?;
    let config = Config::load(paths.config_file())?;
    let ctx = Ctx { paths, config };
    match cli.command {
        Command::Daemon(DaemonCommand::Status { json }) => daemon_status(&ctx, json).await,
        Command::Daemon(DaemonCommand::Stop) => daemon_stop(&ctx).await,
        Command::Vm(cmd) => vm(&ctx, cmd).await,
        Command::Image(cmd) => image(&ctx, cmd).await,
        Command::Doctor { json } => doctor(&ctx, json).await,
    }
}

/// `banger doctor`: every check, one line each (or JSON); exit 1 when a required one fails.
async fn doctor(ctx: &Ctx, json: bool) -> anyhow::Result<ExitCode> {
    use crate::doctor::{self, Setup, host::SystemHost};
    let setup = Setup {
        kvm: "/dev/kvm".into(),
        tun: "/dev/net/tun".into(),
        helper_socket: ctx.config.helper_socket.clone(),
        firecracker: ctx.config.resolve_firecracker().map_err(|e| e.to_string()),
        state_dir: ctx.paths.state_dir().to_owned(),
        images_dir: ctx.paths.images_dir(),
        root: "/".into(),
    };
    let checks = doctor::run(&SystemHost::default(), &setup).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for check in &checks {
            println!("{}", check.line());
        }
    }
    Ok(if doctor::passed(&checks) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

struct Ctx {
    paths: Paths,
    config: Config,
}

impl Ctx {
    /// A client for a daemon that answers, started if needed, with a warning when the running
    /// daemon uses other settings than this command would give it.
    async fn daemon(&self) -> anyhow::Result<DaemonClient> {
        let env: Vec<(&str, OsString)> = self.config.daemon_env();
        let (client, status) =
            connect_or_start(&self.paths.daemon_socket(), &self.paths.daemon_log(), &env).await?;
        self.warn_if_different(&status);
        Ok(client)
    }

    fn warn_if_different(&self, status: &Status) {
        if status.helper_socket != self.config.helper_socket {
            eprintln!(
                "warning: the running bangerd uses helper socket {} but this command would use {}; run `banger daemon stop` to restart it with the new setting",
                status.helper_socket.display(),
                self.config.helper_socket.display()
            );
        }
        if status.storage != self.config.storage.as_str() {
            eprintln!(
                "warning: the running bangerd makes new vm roots with storage = {:?} but this command would use {:?}; run `banger daemon stop` to restart it with the new setting",
                status.storage,
                self.config.storage.as_str()
            );
        }
        let wanted = self.config.resolve_firecracker().unwrap_or_else(|_| self.config.firecracker.clone());
        if status.firecracker != wanted {
            eprintln!(
                "warning: the running bangerd starts {} but this command would use {}; run `banger daemon stop` to restart it with the new setting",
                status.firecracker.display(),
                wanted.display()
            );
        }
    }
}

async fn daemon_status(ctx: &Ctx, json: bool) -> anyhow::Result<ExitCode> {
    let client = DaemonClient::new(ctx.paths.daemon_socket()).with_log(ctx.paths.daemon_log());
    match client.status().await {
        Ok(s) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("bangerd {} running (pid {}), install {}", s.version, s.pid, s.install_id);
                println!("  socket:      {}", ctx.paths.daemon_socket().display());
                match (&s.helper_problem, s.helper_reachable) {
                    (_, true) => println!("  helper:      {} (reachable)", s.helper_socket.display()),
                    (Some(why), false) => {
                        println!("  helper:      {} (NOT reachable: {why})", s.helper_socket.display())
                    }
                    (None, false) => println!("  helper:      {} (NOT reachable)", s.helper_socket.display()),
                }
                println!("  firecracker: {}", s.firecracker.display());
                println!("  storage:     {}", s.storage);
                println!("  running vms: {}", s.running_vms);
                println!("  log:         {}", ctx.paths.daemon_log().display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Unreachable { .. }) => {
            if json {
                println!("{}", serde_json::json!({ "running": false }));
            } else {
                println!("bangerd is not running (it starts with the next banger command)");
            }
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(e.into()),
    }
}

async fn daemon_stop(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let client = DaemonClient::new(ctx.paths.daemon_socket()).with_log(ctx.paths.daemon_log());
    let status = match client.status().await {
        Ok(s) => s,
        Err(ClientError::Unreachable { .. }) => {
            println!("bangerd is not running");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    let _: serde_json::Value = client.call::<(), _>(Method::POST, "/v1/daemon/stop", None).await?;
    // Wait until it is gone, so the next command starts a fresh one.
    let pid = nix::unistd::Pid::from_raw(status.pid);
    for _ in 0..500 {
        if nix::sys::signal::kill(pid, None).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("bangerd stopped (vms keep running)");
    Ok(ExitCode::SUCCESS)
}

/// `name` escaped for one path segment. Names are validated by the daemon; this only keeps
/// anything else from changing the path.
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}

fn vm_path(name: &str, verb: &str) -> String {
    let safe = path_segment(name);
    if verb.is_empty() { format!("/v1/vms/{safe}") } else { format!("/v1/vms/{safe}/{verb}") }
}

fn create_body(name: &str, shape: &VmShape) -> CreateVm {
    CreateVm {
        name: name.to_owned(),
        image: shape.image.clone(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        work_disk_bytes: shape.disk_bytes,
    }
}

fn print_vm(vm: &VmView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(vm)?);
        return Ok(());
    }
    let ip = vm.guest_ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
    println!("name:      {}", vm.name);
    println!("id:        {}", vm.id);
    println!("state:     {}", vm.state);
    println!("guest ip:  {ip}");
    println!("image:     {} ({} vcpu, {} MiB)", vm.image, vm.vcpus, vm.memory_mib);
    if let Some(pid) = vm.pid {
        println!("vmm pid:   {pid}");
    }
    if let Some(tap) = &vm.tap {
        println!("tap:       {tap}");
    }
    if let Some(s) = &vm.storage {
        println!("storage:   {s}");
    }
    if let Some(disk) = &vm.work_disk {
        let size = vm.work_disk_bytes.map(crate::size::format_size).unwrap_or_else(|| "?".into());
        println!(
            "work disk: {} ({size}, mounted at {} in the guest)",
            disk.display(),
            crate::daemon::personalize::WORK_DISK_MOUNT
        );
    }
    println!("serial:    {}", vm.log_path.display());
    if let Some(e) = &vm.last_error {
        println!("last error: {e}");
    }
    if let Some(p) = &vm.cleanup_pending {
        println!("cleanup pending: {p}");
        println!(
            "  (its network and disk devices are still there; bangerd retries removing them in the background)"
        );
    }
    Ok(())
}

fn print_table(vms: &[VmView]) {
    println!("{:<20} {:<9} {:<15} {:<12} {:<16} LAST ERROR", "NAME", "STATE", "GUEST IP", "IMAGE", "ID");
    for vm in vms {
        let ip = vm.guest_ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
        let err = match (&vm.last_error, &vm.cleanup_pending) {
            (Some(e), _) => e.lines().next().unwrap_or(""),
            (None, Some(p)) => p.lines().next().unwrap_or(""),
            (None, None) => "",
        };
        let pending = if vm.cleanup_pending.is_some() { "[cleanup pending] " } else { "" };
        println!("{:<20} {:<9} {:<15} {:<12} {:<16} {pending}{err}", vm.name, vm.state, ip, vm.image, vm.id);
    }
}

async fn vm(ctx: &Ctx, cmd: VmCommand) -> anyhow::Result<ExitCode> {
    let d = ctx.daemon().await?;
    match cmd {
        VmCommand::Create { name, shape, json } => {
            let vm: VmView = d.call(Method::POST, "/v1/vms", Some(&create_body(&name, &shape))).await?;
            if json { print_vm(&vm, true)? } else { println!("created vm {} ({})", vm.name, vm.id) }
        }
        VmCommand::Start { name, json } => {
            let vm: VmView = d.call::<(), _>(Method::POST, &vm_path(&name, "start"), None).await?;
            if json { print_vm(&vm, true)? } else { println!("vm {} running at {}", vm.name, ip_of(&vm)) }
        }
        VmCommand::Stop { name, json } => {
            let vm: VmView = d.call::<(), _>(Method::POST, &vm_path(&name, "stop"), None).await?;
            if json { print_vm(&vm, true)? } else { println!("vm {} stopped", vm.name) }
        }
        VmCommand::Restart { name, json } => {
            let vm: VmView = d.call::<(), _>(Method::POST, &vm_path(&name, "restart"), None).await?;
            if json { print_vm(&vm, true)? } else { println!("vm {} running at {}", vm.name, ip_of(&vm)) }
        }
        VmCommand::Delete { name } => {
            delete_vm(&d, &name).await?;
            println!("vm {name} deleted");
        }
        VmCommand::List { json } => {
            let vms: Vec<VmView> = d.call::<(), _>(Method::GET, "/v1/vms", None).await?;
            if json { println!("{}", serde_json::to_string_pretty(&vms)?) } else { print_table(&vms) }
        }
        VmCommand::Show { name, json } => {
            let vm: VmView = d.call::<(), _>(Method::GET, &vm_path(&name, ""), None).await?;
            print_vm(&vm, json)?;
        }
        VmCommand::Logs { name, bytes } => {
            let (status, body) =
                d.raw(Method::GET, &format!("{}?bytes={bytes}", vm_path(&name, "logs")), None).await?;
            if !status.is_success() {
                let msg = serde_json::from_slice::<crate::api_types::ErrorBody>(&body)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
                bail!("{msg}");
            }
            use std::io::Write;
            std::io::stdout().write_all(&body)?;
        }
        VmCommand::Ssh { name, command } => {
            let vm: VmView = d.call::<(), _>(Method::GET, &vm_path(&name, ""), None).await?;
            let ip = running_ip(&vm)?;
            return run_ssh(ctx, &vm, ip, &command);
        }
        VmCommand::Run { name, shape, rm, timeout, command } => {
            return vm_run(ctx, &d, &name, &shape, rm, Duration::from_secs(timeout), &command).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete_vm(d: &DaemonClient, name: &str) -> anyhow::Result<()> {
    let answer: serde_json::Value = d.call::<(), _>(Method::DELETE, &vm_path(name, ""), None).await?;
    if let Some(w) = answer.get("warning").and_then(|w| w.as_str()) {
        eprintln!("warning: {w}");
    }
    Ok(())
}

fn ip_of(vm: &VmView) -> String {
    vm.guest_ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
}

fn running_ip(vm: &VmView) -> anyhow::Result<Ipv4Addr> {
    match (vm.state.as_str(), vm.guest_ip) {
        ("running", Some(ip)) => Ok(ip),
        (state, _) => {
            bail!("vm {} is {state}, not running: start it with `banger vm start {}`", vm.name, vm.name)
        }
    }
}

fn run_ssh(ctx: &Ctx, vm: &VmView, ip: Ipv4Addr, command: &[String]) -> anyhow::Result<ExitCode> {
    let id: banger_protocol::VmId =
        vm.id.parse().map_err(|e| anyhow!("the daemon returned a bad vm id {:?}: {e}", vm.id))?;
    let mut cmd = ssh::ssh_command(&ctx.paths, &id, ip, command, ssh::Tty::Auto);
    let status = cmd.status().context("cannot run ssh (install openssh-client)")?;
    Ok(exit_code(status))
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c.clamp(0, 255) as u8),
        (None, Some(sig)) => ExitCode::from((128 + sig).clamp(0, 255) as u8),
        _ => ExitCode::FAILURE,
    }
}

async fn vm_run(
    ctx: &Ctx,
    d: &DaemonClient,
    name: &str,
    shape: &VmShape,
    rm: bool,
    timeout: Duration,
    command: &[String],
) -> anyhow::Result<ExitCode> {
    let existing: Result<VmView, ClientError> = d.call::<(), _>(Method::GET, &vm_path(name, ""), None).await;
    let vm = match existing {
        Ok(vm) => vm,
        Err(ClientError::Api { status: 404, .. }) => {
            d.call(Method::POST, "/v1/vms", Some(&create_body(name, shape))).await?
        }
        Err(e) => return Err(e.into()),
    };
    let vm = if vm.state == "running" {
        vm
    } else {
        d.call::<(), _>(Method::POST, &vm_path(name, "start"), None).await?
    };
    let result = async {
        let ip = running_ip(&vm)?;
        if let Err(e) = ssh::wait_for_ssh(std::net::SocketAddr::from((ip, 22)), timeout).await {
            let (_, tail) =
                d.raw(Method::GET, &format!("{}?bytes=4096", vm_path(name, "logs")), None).await?;
            return Err(anyhow!(
                "vm {name} did not accept ssh on {ip}:22 within {} s: {e}\nserial log tail:\n{}",
                timeout.as_secs(),
                String::from_utf8_lossy(&tail)
            ));
        }
        run_ssh(ctx, &vm, ip, command)
    }
    .await;
    if rm {
        delete_vm(d, name).await?;
    }
    result
}

async fn image(ctx: &Ctx, cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    let d = ctx.daemon().await?;
    match cmd {
        ImageCommand::Import { name, kernel, rootfs } => {
            let abs = |p: std::path::PathBuf| {
                std::path::absolute(&p).with_context(|| format!("bad path {}", p.display()))
            };
            let body = ImportImage { name, kernel: abs(kernel)?, rootfs: abs(rootfs)? };
            let img: ImageView = d.call(Method::POST, "/v1/images", Some(&body)).await?;
            println!("imported image {} ({} bytes)", img.name, img.size_bytes);
        }
        ImageCommand::List { json } => {
            let imgs: Vec<ImageView> = d.call::<(), _>(Method::GET, "/v1/images", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&imgs)?);
            } else {
                println!("{:<20} {:>12} ROOTFS SHA256", "NAME", "BYTES");
                for i in imgs {
                    println!(
                        "{:<20} {:>12} {}",
                        i.name,
                        i.size_bytes,
                        &i.rootfs_sha256[..i.rootfs_sha256.len().min(16)]
                    );
                }
            }
        }
        ImageCommand::Rm { name } => {
            let _: serde_json::Value =
                d.call::<(), _>(Method::DELETE, &format!("/v1/images/{}", path_segment(&name)), None).await?;
            println!("image {name} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}
