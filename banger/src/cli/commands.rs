//! What each `banger` command does: talk to the daemon (starting it when needed), print human
//! tables or JSON, and for `ssh`/`run` hand the terminal to OpenSSH.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use hyper::Method;

use crate::api_types::{CreateVm, ImageView, ImportImage, ProgressEvent, Status, VmView};
use crate::cli::args::{Cli, Command, DaemonCommand, ImageCommand, ShutdownArgs, VmCommand, VmShape};
use crate::cli::client::{ClientError, DaemonClient, ProgressEvents, connect_or_start};
use crate::cli::progress::{Mode, Reporter, TICK};
use crate::config::Config;
use crate::image_build;
use crate::paths::Paths;
use crate::ssh;

/// Runs one CLI invocation.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // These need no state. The first two only print what the command line is, and root may run
    // them (to package); `ssh-dial` serves the ssh a `vm ssh` or `vm run` started.
    match &cli.command {
        Command::Completions { shell } => {
            // Generated whole first: the generator panics on a write error (`| head`).
            let mut script = Vec::new();
            completions(*shell, &mut script);
            use std::io::Write;
            match std::io::stdout().write_all(&script) {
                // The reader stopped reading (`| head`): nothing more to say.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                written => written.context("cannot write the completion script")?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man { dir } => {
            man_pages(dir)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::SshDial { addr } => {
            use std::os::fd::AsFd;
            ssh::dial_for_ssh(*addr, std::io::stdout().as_fd())?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
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
        Command::Completions { .. } | Command::Man { .. } | Command::SshDial { .. } => {
            unreachable!("handled above")
        }
    }
}

/// `banger completions SHELL`: the completion script, generated from the clap definitions
/// without the hidden commands (the generators would offer them).
fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    let full = Cli::command();
    let mut shown = clap::Command::new("banger")
        .version(env!("CARGO_PKG_VERSION"))
        .propagate_version(true)
        .about(full.get_about().cloned().unwrap_or_default())
        .long_about(full.get_long_about().cloned().unwrap_or_default())
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    clap_complete::generate(shell, &mut shown, "banger", out);
}

/// `banger man --dir DIR`: one manual page per command, generated from the clap definitions.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write the manual pages into {}", dir.display()))
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
        if !status.launch.is_empty() && status.launch != self.config.launch.as_str() {
            eprintln!(
                "warning: the running bangerd starts new vms with launch = {:?} but this command would use {:?}; run `banger daemon stop` to restart it with the new setting",
                status.launch,
                self.config.launch.as_str()
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
                match (&s.helper_problem, s.helper_reachable.unwrap_or(false)) {
                    (_, true) => println!("  helper:      {} (reachable)", s.helper_socket.display()),
                    (Some(why), false) => {
                        println!("  helper:      {} (NOT reachable: {why})", s.helper_socket.display())
                    }
                    (None, false) => println!("  helper:      {} (NOT reachable)", s.helper_socket.display()),
                }
                println!("  firecracker: {}", s.firecracker.display());
                println!("  storage:     {}", s.storage);
                println!("  launch:      {}", s.launch);
                println!("  running vms: {}", s.running_vms.unwrap_or(0));
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
    if let Some(launch) = &vm.launch {
        match vm.jail_uid {
            Some(uid) => println!("launch:    {launch} (vmm runs as uid {uid})"),
            None => println!("launch:    {launch}"),
        }
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
    println!("vmm log:   {}", vm.vmm_log_path.display());
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

/// The widest a `vm list` error column gets; `vm show` has the whole text.
const TABLE_ERROR_WIDTH: usize = 60;

/// `vm list`: one line per VM, whatever its errors hold (their first line, shortened).
fn table(vms: &[VmView]) -> String {
    let mut out =
        format!("{:<20} {:<9} {:<15} {:<12} {:<16} LAST ERROR\n", "NAME", "STATE", "GUEST IP", "IMAGE", "ID");
    for vm in vms {
        let ip = vm.guest_ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
        let err = match (&vm.last_error, &vm.cleanup_pending) {
            (Some(e), _) => e.as_str(),
            (None, Some(p)) => p.as_str(),
            (None, None) => "",
        };
        let pending = if vm.cleanup_pending.is_some() { "[cleanup pending] " } else { "" };
        let err = shorten(err.lines().next().unwrap_or(""), TABLE_ERROR_WIDTH);
        out.push_str(&format!(
            "{:<20} {:<9} {:<15} {:<12} {:<16} {pending}{err}\n",
            vm.name, vm.state, ip, vm.image, vm.id
        ));
    }
    out
}

/// `text` cut to at most `width` characters, an ellipsis marking a cut.
fn shorten(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

async fn vm(ctx: &Ctx, cmd: VmCommand) -> anyhow::Result<ExitCode> {
    let d = ctx.daemon().await?;
    match cmd {
        VmCommand::Create { name, name_flag, shape, json } => {
            let name = VmCommand::create_name(name, name_flag);
            ensure_an_image(ctx, &d, &shape, Mode::detect(json)).await?;
            let vm: VmView = d.call(Method::POST, "/v1/vms", Some(&create_body(&name, &shape))).await?;
            if json { print_vm(&vm, true)? } else { println!("created vm {} ({})", vm.name, vm.id) }
        }
        VmCommand::Start { name, json } => {
            let mut shown = Reporter::new(Mode::detect(json), std::io::stderr(), format!("vm {name}"));
            let vm = start_vm(&d, &name, &mut shown).await?;
            if json { print_vm(&vm, true)? } else { println!("vm {} running at {}", vm.name, ip_of(&vm)) }
        }
        VmCommand::Stop { name, shutdown, json } => {
            let path = format!("{}{}", vm_path(&name, "stop"), shutdown_query(shutdown));
            let vm: VmView = d.call::<(), _>(Method::POST, &path, None).await?;
            if json { print_vm(&vm, true)? } else { println!("vm {} stopped", vm.name) }
        }
        VmCommand::Restart { name, json } => {
            let vm: VmView = d.call::<(), _>(Method::POST, &vm_path(&name, "restart"), None).await?;
            if json { print_vm(&vm, true)? } else { println!("vm {} running at {}", vm.name, ip_of(&vm)) }
        }
        VmCommand::Delete { name, shutdown } => {
            delete_vm(&d, &name, shutdown).await?;
            println!("vm {name} deleted");
        }
        VmCommand::List { json } => {
            let vms: Vec<VmView> = d.call::<(), _>(Method::GET, "/v1/vms", None).await?;
            if json { println!("{}", serde_json::to_string_pretty(&vms)?) } else { print!("{}", table(&vms)) }
        }
        VmCommand::Show { name, json } => {
            let vm: VmView = d.call::<(), _>(Method::GET, &vm_path(&name, ""), None).await?;
            print_vm(&vm, json)?;
        }
        VmCommand::Logs { name, bytes, follow, vmm } => {
            if follow {
                let vm: VmView = d.call::<(), _>(Method::GET, &vm_path(&name, ""), None).await?;
                let path = if vmm { vm.vmm_log_path } else { vm.log_path };
                follow_log(path, bytes).await?;
            } else {
                let query = format!("?bytes={bytes}{}", if vmm { "&vmm=true" } else { "" });
                let (status, body) =
                    d.raw(Method::GET, &format!("{}{query}", vm_path(&name, "logs")), None).await?;
                if !status.is_success() {
                    let msg = serde_json::from_slice::<crate::api_types::ErrorBody>(&body)
                        .map(|e| e.error)
                        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
                    bail!("{msg}");
                }
                use std::io::Write;
                std::io::stdout().write_all(&body)?;
            }
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

/// The query saying how a stop or delete ends a running guest (empty: the daemon's default).
fn shutdown_query(how: ShutdownArgs) -> String {
    match how {
        ShutdownArgs { force: true, .. } => "?force=true".into(),
        ShutdownArgs { timeout: Some(secs), .. } => format!("?timeout={secs}"),
        ShutdownArgs { timeout: None, force: false } => String::new(),
    }
}

async fn delete_vm(d: &DaemonClient, name: &str, how: ShutdownArgs) -> anyhow::Result<()> {
    let path = format!("{}{}", vm_path(name, ""), shutdown_query(how));
    let answer: serde_json::Value = d.call::<(), _>(Method::DELETE, &path, None).await?;
    if let Some(w) = answer.get("warning").and_then(|w| w.as_str()) {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// `vm logs --follow`: the last `bytes` of the log at `path` (the file of the current run),
/// then what is written to it, read from the file itself (the user's own), until interrupted.
async fn follow_log(path: std::path::PathBuf, bytes: u64) -> anyhow::Result<()> {
    let from = std::fs::metadata(&path).map(|m| m.len().saturating_sub(bytes)).unwrap_or(0);
    let shown = path.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = std::io::stdout();
        crate::daemon::logs::follow(&path, from, &mut out, Duration::from_millis(200), &mut || true)
    })
    .await?
    .with_context(|| format!("cannot follow {}", shown.display()))
}

/// Starts the VM `name`, showing its steps on `shown` as the daemon reports them (or, when
/// `shown` is quiet, with a plain request).
async fn start_vm<W: std::io::Write>(
    d: &DaemonClient,
    name: &str,
    shown: &mut Reporter<W>,
) -> anyhow::Result<VmView> {
    let path = vm_path(name, "start");
    if shown.quiet() {
        return Ok(d.call::<(), _>(Method::POST, &path, None).await?);
    }
    let events = d.with_progress::<(), _>(Method::POST, &path, None).await?;
    follow_progress(shown, events, &format!("the start of vm {name}")).await
}

/// Imports an image, showing its steps and bytes on `shown` as the daemon reports them (or,
/// when `shown` is quiet, with a plain request).
async fn import_image<W: std::io::Write>(
    d: &DaemonClient,
    body: &ImportImage,
    shown: &mut Reporter<W>,
) -> anyhow::Result<ImageView> {
    if shown.quiet() {
        return Ok(d.call(Method::POST, "/v1/images", Some(body)).await?);
    }
    let events = d.with_progress(Method::POST, "/v1/images", Some(body)).await?;
    follow_progress(shown, events, &format!("the import of image {}", body.name)).await
}

/// Shows a progress stream's steps and bytes on `shown` until its outcome (`what` names the
/// work in the error when the stream ends without one).
async fn follow_progress<W: std::io::Write, T: serde::de::DeserializeOwned>(
    shown: &mut Reporter<W>,
    mut events: ProgressEvents<T>,
    what: &str,
) -> anyhow::Result<T> {
    let outcome = loop {
        let event = match ticking(shown, events.next()).await {
            Ok(event) => event,
            Err(e) => break Err(e.into()),
        };
        match event {
            Some(ProgressEvent::Step(step)) => shown.step(&step),
            Some(ProgressEvent::Bytes { done, total }) => shown.bytes(done, total),
            Some(ProgressEvent::Done(done)) => break Ok(*done),
            Some(ProgressEvent::Failed { status, error }) => {
                break Err(ClientError::Api { status, message: error }.into());
            }
            None => break Err(anyhow!("bangerd ended the answer to {what} without its outcome")),
        }
    };
    shown.finish();
    outcome
}

/// Awaits `work`, redrawing `shown`'s line meanwhile.
async fn ticking<W: std::io::Write, T>(
    shown: &mut Reporter<W>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let mut tick = tokio::time::interval(TICK);
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tick.tick() => shown.tick(),
        }
    }
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
    let dialer = own_executable();
    let mut cmd = ssh::ssh_command(&ctx.paths, &id, ip, command, ssh::Tty::Auto, dialer.as_deref());
    let status = cmd.status().context("cannot run ssh (install openssh-client)")?;
    Ok(exit_code(status))
}

/// This process's executable as a path another process can run while this one lives:
/// `/proc/PID/exe`, which still opens this binary after an upgrade replaced its file. `None`
/// without `/proc`.
fn own_executable() -> Option<std::path::PathBuf> {
    let exe = std::path::PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    exe.exists().then_some(exe)
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
    let result = create_start_and_run(ctx, d, name, shape, timeout, command).await;
    if !rm {
        return result;
    }
    // `--rm` removes the VM whatever happened, a failed create or start included.
    match (delete_vm(d, name, ShutdownArgs::default()).await, result) {
        (Ok(()), result) => result,
        // The create failed before the VM existed: nothing to remove.
        (Err(e), Err(first)) if is_not_found(&e) => Err(first),
        (Err(e), Ok(_)) => Err(e),
        (Err(e), Err(first)) => {
            let first_text = format!("{first:#}");
            eprintln!("warning: {}", without_repeated_cause(&format!("{e:#}"), &first_text));
            Err(first)
        }
    }
}

/// Whether `e` is the daemon saying the VM does not exist.
fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<ClientError>(), Some(ClientError::Api { status: 404, .. }))
}

/// `later` without the causes at its end that `earlier` already ended with (the daemon renders
/// an error and its causes as `error: cause: cause`): a second failure for the same reason
/// names that reason once.
fn without_repeated_cause(later: &str, earlier: &str) -> String {
    let cut = later
        .match_indices(": ")
        .map(|(i, _)| i)
        .find(|&i| earlier.ends_with(&later[i + 2..]) && !later[i + 2..].is_empty());
    match cut {
        Some(i) => format!("{} (for the same reason)", &later[..i]),
        None => later.to_owned(),
    }
}

/// `vm run` without `--rm`: the VM created and started if needed, SSH waited for, the command run.
async fn create_start_and_run(
    ctx: &Ctx,
    d: &DaemonClient,
    name: &str,
    shape: &VmShape,
    timeout: Duration,
    command: &[String],
) -> anyhow::Result<ExitCode> {
    let progress = Mode::detect(false);
    let existing: Result<VmView, ClientError> = d.call::<(), _>(Method::GET, &vm_path(name, ""), None).await;
    let vm = match existing {
        Ok(vm) => vm,
        Err(ClientError::Api { status: 404, .. }) => {
            ensure_an_image(ctx, d, shape, progress).await?;
            d.call(Method::POST, "/v1/vms", Some(&create_body(name, shape))).await?
        }
        Err(e) => return Err(e.into()),
    };
    let mut shown = Reporter::new(progress, std::io::stderr(), format!("vm {name}"));
    let vm = if vm.state == "running" { vm } else { start_vm(d, name, &mut shown).await? };
    let ip = running_ip(&vm)?;
    shown.step("waiting for ssh");
    let waited = ticking(&mut shown, ssh::wait_for_ssh(std::net::SocketAddr::from((ip, 22)), timeout)).await;
    shown.finish();
    if let Err(e) = waited {
        let query = "?bytes=4096&run=current";
        let (_, tail) = d.raw(Method::GET, &format!("{}{query}", vm_path(name, "logs")), None).await?;
        return Err(anyhow!(
            "vm {name} is not reachable: {e}\nserial log tail:\n{}",
            String::from_utf8_lossy(&tail)
        ));
    }
    run_ssh(ctx, &vm, ip, command)
}

/// The file mmdebstrap's output of the last image build goes to, in the state directory.
const BUILD_LOG: &str = "image-build.log";

/// Builds an image as this user ([`image_build`]) in a private directory of the state
/// directory, and imports it with its initrd, showing the steps of both on `shown`.
async fn build_image<W: std::io::Write>(
    ctx: &Ctx,
    d: &DaemonClient,
    name: &str,
    shown: &mut Reporter<W>,
) -> anyhow::Result<ImageView> {
    crate::ids::validate_name(name).map_err(|e| anyhow!("invalid image name {name:?}: {e}"))?;
    let imgs: Vec<ImageView> = d.call::<(), _>(Method::GET, "/v1/images", None).await?;
    if imgs.iter().any(|i| i.name == name) {
        bail!(
            "image {name:?} already exists: remove it first with `banger image rm {name}`, or choose another name"
        );
    }
    let uid = nix::unistd::getuid();
    let user =
        nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name).unwrap_or_else(|| uid.to_string());
    image_build::check_subids(&user, uid.as_raw(), Path::new("/etc/subuid"), Path::new("/etc/subgid"))?;
    let apt = image_build::HostApt::read()?;
    let dir = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(ctx.paths.state_dir())
        .with_context(|| format!("cannot make a build directory in {}", ctx.paths.state_dir().display()))?;
    let log = ctx.paths.state_dir().join(BUILD_LOG);
    if !shown.quiet() {
        eprintln!(
            "building image {name}: Debian {} from this host's apt sources, with mmdebstrap as {user} (a few minutes; its output goes to {})",
            apt.suite,
            log.display()
        );
    }
    let out = dir.path().to_owned();
    let (steps, mut told) = futures::channel::mpsc::unbounded::<String>();
    let build = tokio::task::spawn_blocking(move || {
        image_build::build(&apt, &out, &log, &mut |step| {
            let _ = steps.unbounded_send(step.to_string());
        })
    });
    // The sender goes with the build: the steps end when it does.
    while let Some(step) = ticking(shown, futures::StreamExt::next(&mut told)).await {
        shown.step(&step);
    }
    let built = match build.await.context("the image build task failed").and_then(|b| Ok(b?)) {
        Ok(built) => built,
        Err(e) => {
            shown.finish();
            return Err(e);
        }
    };
    let body = ImportImage {
        name: name.to_owned(),
        kernel: built.vmlinux,
        rootfs: built.rootfs,
        initrd: Some(built.initrd),
    };
    import_image(d, &body, shown).await
}

/// With no image named and no default configured, and no image at all, builds the default one.
async fn ensure_an_image(ctx: &Ctx, d: &DaemonClient, shape: &VmShape, progress: Mode) -> anyhow::Result<()> {
    if shape.image.is_some() || ctx.config.default_image.is_some() {
        return Ok(());
    }
    let imgs: Vec<ImageView> = d.call::<(), _>(Method::GET, "/v1/images", None).await?;
    if imgs.is_empty() {
        let name = image_build::DEFAULT_IMAGE;
        let mut shown = Reporter::new(progress, std::io::stderr(), format!("image {name}"));
        if !shown.quiet() {
            eprintln!("no image yet: building the default one ({name})");
        }
        build_image(ctx, d, name, &mut shown).await?;
    }
    Ok(())
}

async fn image(ctx: &Ctx, cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    let d = ctx.daemon().await?;
    match cmd {
        ImageCommand::Import { name, kernel, rootfs, initrd, json } => {
            let abs = |p: std::path::PathBuf| {
                std::path::absolute(&p).with_context(|| format!("bad path {}", p.display()))
            };
            let initrd = initrd.map(abs).transpose()?;
            let mut shown = Reporter::new(Mode::detect(json), std::io::stderr(), format!("image {name}"));
            let body = ImportImage { name, kernel: abs(kernel)?, rootfs: abs(rootfs)?, initrd };
            let img = import_image(&d, &body, &mut shown).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&img)?);
            } else {
                println!("imported image {} ({} bytes)", img.name, img.size_bytes);
            }
        }
        ImageCommand::Build { name, json } => {
            let name = name.unwrap_or_else(|| image_build::DEFAULT_IMAGE.to_owned());
            let mut shown = Reporter::new(Mode::detect(json), std::io::stderr(), format!("image {name}"));
            let img = build_image(ctx, &d, &name, &mut shown).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&img)?);
            } else {
                println!("built and imported image {} ({} bytes)", img.name, img.size_bytes);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::api::tests::{serve_fakes, small_image};
    use crate::daemon::vmm::fake::VmmOp;

    fn ctx(dir: &std::path::Path) -> Ctx {
        let paths = Paths::under(&dir.join("cli"), nix::unistd::getuid().as_raw()).unwrap();
        Ctx { paths, config: Config::default() }
    }

    fn shape() -> VmShape {
        VmShape { image: Some("base".into()), vcpus: None, memory_mib: None, disk_bytes: None }
    }

    #[test]
    fn ssh_dials_through_this_very_executable() {
        let exe = own_executable().expect("/proc/PID/exe");
        assert_eq!(exe, std::path::PathBuf::from(format!("/proc/{}/exe", std::process::id())));
        assert_eq!(std::fs::canonicalize(&exe).unwrap(), std::env::current_exe().unwrap());
    }

    #[tokio::test]
    async fn run_rm_removes_a_vm_whose_start_failed_and_says_why_once() {
        let s = serve_fakes(true).await;
        s.vmm.fail(VmmOp::Spawn);
        let err = vm_run(&ctx(s.dir.path()), &s.client, "dev", &shape(), true, Duration::from_secs(1), &[])
            .await
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.starts_with("cannot start vm dev: spawning the vmm failed"), "{text}");
        assert_eq!(text.matches("the fake vmm exits at once").count(), 1, "{text}");
        assert!(s.daemon.list().await.unwrap().is_empty(), "--rm removed the vm");

        // Without --rm the failed vm stays, to be inspected.
        let err = vm_run(&ctx(s.dir.path()), &s.client, "dev", &shape(), false, Duration::from_secs(1), &[])
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("spawning the vmm failed"));
        assert_eq!(s.daemon.show("dev").await.unwrap().state, "failed");
    }

    #[tokio::test]
    async fn run_rm_of_a_vm_that_could_not_be_created_reports_the_create() {
        let s = serve_fakes(true).await;
        let bad = VmShape { vcpus: Some(99), ..shape() };
        let err = vm_run(&ctx(s.dir.path()), &s.client, "dev", &bad, true, Duration::from_secs(1), &[])
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("--vcpus 99"), "{err:#}");
    }

    fn view(name: &str, last_error: Option<&str>) -> VmView {
        VmView {
            name: name.into(),
            id: "0123456789abcdef".into(),
            state: "failed".into(),
            guest_ip: None,
            last_error: last_error.map(Into::into),
            cleanup_pending: None,
            image: "base".into(),
            vcpus: 1,
            memory_mib: 128,
            pid: None,
            tap: None,
            storage: None,
            launch: None,
            jail_uid: None,
            work_disk: None,
            work_disk_bytes: None,
            vm_dir: "/x".into(),
            log_path: "/x/serial.log".into(),
            vmm_log_path: "/x/vmm.log".into(),
            api_socket: "/x/api.sock".into(),
            created_at: 0,
        }
    }

    #[test]
    fn the_table_has_one_line_per_vm_whatever_the_errors_hold() {
        let long = format!("spawning the vmm failed: {}\nserial log tail:\nline 1\nline 2", "x".repeat(200));
        let out = table(&[view("a", Some(&long)), view("b", None)]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[1].starts_with("a ") && lines[1].contains("spawning the vmm failed"), "{out}");
        assert!(lines[1].ends_with('…') && !lines[1].contains("serial log"), "{out}");
        assert_eq!(lines[1].split("spawning").nth(1).unwrap().chars().count() + "spawning".len(), 60);
        assert!(lines[2].starts_with("b "), "{out}");
    }

    #[test]
    fn completions_and_man_pages_come_from_the_command_line() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut out = Vec::new();
            completions(shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("banger") && text.contains("force") && text.contains("completions"),
                "{shell}: {text}"
            );
            assert!(!text.contains("ssh-dial"), "{shell} offers a hidden command: {text}");
            // Every command's own options, and `--version` on the subcommands too.
            assert!(text.contains("doctor") && text.contains("vcpus"), "{shell}: {text}");
            assert!(text.matches("version").count() > 10, "{shell}: {text}");
        }
        let dir = tempfile::tempdir().unwrap();
        let man = dir.path().join("man1");
        man_pages(&man).unwrap();
        let page = std::fs::read_to_string(man.join("banger-vm-stop.1")).unwrap();
        assert!(page.contains("Ctrl\\-Alt\\-Del") || page.contains("Ctrl-Alt-Del"), "{page}");
        assert!(page.contains("timeout"), "{page}");
        assert!(
            man.join("banger.1").exists() && !man.join("banger-man.1").exists(),
            "the hidden command has none"
        );
    }

    #[tokio::test]
    async fn start_shows_each_step_as_the_daemon_reports_it() {
        let s = serve_fakes(true).await;
        let _: VmView =
            s.client.call(Method::POST, "/v1/vms", Some(&create_body("dev", &shape()))).await.unwrap();
        let mut shown = Reporter::new(Mode::Plain, Vec::new(), "vm dev");
        let vm = start_vm(&s.client, "dev", &mut shown).await.unwrap();
        assert_eq!(vm.state, "running");
        let text = String::from_utf8(shown.into_inner()).unwrap();
        let steps: Vec<&str> =
            text.lines().map(|l| l.strip_prefix("vm dev: ").unwrap().split(" (").next().unwrap()).collect();
        assert_eq!(steps.first(), Some(&"checking the image"), "{text}");
        assert_eq!(steps.last(), Some(&"booting the guest"), "{text}");
        assert!(steps.contains(&"setting up the network") && steps.contains(&"spawning the vmm"), "{text}");

        // Quiet (--json): a plain request, nothing shown.
        let _: VmView = s.client.call::<(), _>(Method::POST, "/v1/vms/dev/stop", None).await.unwrap();
        let mut quiet = Reporter::new(Mode::Quiet, Vec::new(), "vm dev");
        assert_eq!(start_vm(&s.client, "dev", &mut quiet).await.unwrap().state, "running");
        assert!(quiet.into_inner().is_empty());
    }

    #[tokio::test]
    async fn import_shows_one_plain_line_per_step_and_nothing_when_quiet() {
        let s = serve_fakes(false).await;
        let (kernel, rootfs) = small_image(s.dir.path(), 4 << 20);
        let body = |name: &str| ImportImage {
            name: name.into(),
            kernel: kernel.clone(),
            rootfs: rootfs.clone(),
            initrd: None,
        };

        let mut shown = Reporter::new(Mode::Plain, Vec::new(), "image small");
        let img = import_image(&s.client, &body("small"), &mut shown).await.unwrap();
        assert_eq!(img.name, "small");
        let text = String::from_utf8(shown.into_inner()).unwrap();
        let steps: Vec<&str> = text
            .lines()
            .map(|l| l.strip_prefix("image small: ").unwrap().rsplit_once(" (").unwrap().0)
            .collect();
        assert_eq!(
            steps,
            [
                "checking the kernel",
                "checking the root filesystem",
                "copying the kernel (4 KiB)",
                "hashing the kernel (4 KiB)",
                "copying the root filesystem (4 MiB)",
                "hashing the root filesystem (4 MiB)",
            ],
            "{text}"
        );
        assert!(!text.contains('\r') && !text.contains(" of "), "no redraws, no bytes: {text:?}");

        // Quiet (--json): nothing shown.
        let mut quiet = Reporter::new(Mode::Quiet, Vec::new(), "image other");
        assert_eq!(import_image(&s.client, &body("other"), &mut quiet).await.unwrap().name, "other");
        assert!(quiet.into_inner().is_empty());

        // A failure is the daemon's error, once; the line is left clean.
        let mut shown = Reporter::new(Mode::Terminal, Vec::new(), "image small");
        let err = import_image(&s.client, &body("small"), &mut shown).await.unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    }

    #[test]
    fn a_second_failure_for_the_same_reason_names_it_once() {
        let first =
            "cannot start vm dev: network failed: cannot reach banger-helper at /s: connection refused";
        let later =
            "vm dev is not deleted: run it again: cannot reach banger-helper at /s: connection refused";
        assert_eq!(
            without_repeated_cause(later, first),
            "vm dev is not deleted: run it again (for the same reason)"
        );
        assert_eq!(without_repeated_cause("other: cause", first), "other: cause");
    }
}
