//! `firecracker-double`: a Firecracker test double for machines that cannot boot guests.
//!
//! It serves Firecracker 1.16's HTTP API on the same Unix socket with the same status codes and
//! fault messages, opens kernels, drives, TAPs and vsock sockets when they are configured, as
//! Firecracker does, and at `InstanceStart` boots an emulated guest: processes in their own
//! namespaces, bridged to the TAP, with the host name and SSH keys of the root drive and an SSH
//! server. It is a test tool, never a product default. See `tests/README.md` for what it emulates
//! and what it does not.
//!
//! Modules, from the outside in:
//! - [`cli`]: command-line flags.
//! - [`server`]: the HTTP server (hyper) with micro_http's framing quirks.
//! - [`api`]: routing of method + path + body to a [`vm::VmmAction`].
//! - [`vm`]: the VMM state machine and Firecracker's error texts.
//! - [`config`]: request bodies; [`cmdline`]: boot arguments and `ip=`; [`elf`]: the kernel check.
//! - [`tap`]: TAP ioctls; [`guest`]: the emulated guest; [`logger`]: log and metrics output.
//! - [`harness`]: starting the double and talking to it from tests.
//!
//! Other tests use [`write_test_kernel`] to make a kernel the double (and Firecracker) accepts.

pub mod api;
pub mod cli;
pub mod cmdline;
pub mod config;
pub mod elf;
pub mod guest;
pub mod harness;
pub mod logger;
pub mod server;
pub mod tap;
pub mod vm;

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

pub use elf::write_test_kernel;
use logger::{Level, Logger, Metrics};
use tokio::sync::mpsc;
use vm::{FIRECRACKER_VERSION, Vmm, VmmAction};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ends the process the way Firecracker's `main` does on an error.
fn exit_with_error(logger: &Arc<Mutex<Logger>>, display: &str, debug: &str, code: u8) -> ExitCode {
    lock(logger).log(Level::Error, "main", display);
    eprintln!("Error: {debug}");
    lock(logger).log(Level::Error, "main", &format!("Firecracker exiting with error. exit_code={code}"));
    ExitCode::from(code)
}

/// Applies a `--config-file` document in Firecracker's order, then boots.
fn boot_from_config_file(vmm: &mut Vmm, path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("Unable to open or read from the configuration file: {e}"))?;
    let cfg: config::VmmConfig = serde_json::from_str(&text)
        .map_err(|e| format!("Configuration for VMM from one single json failed: Invalid JSON: {e}"))?;
    let mut actions = Vec::new();
    if let Some(l) = cfg.logger {
        actions.push(VmmAction::ConfigureLogger(l));
    }
    if let Some(m) = cfg.metrics {
        actions.push(VmmAction::ConfigureMetrics(m));
    }
    if let Some(mc) = cfg.machine_config {
        actions.push(VmmAction::UpdateMachineConfiguration(mc.into()));
    }
    actions.push(VmmAction::ConfigureBootSource(cfg.boot_source));
    actions.extend(cfg.drives.into_iter().map(VmmAction::InsertBlockDevice));
    actions.extend(cfg.network_interfaces.into_iter().map(VmmAction::InsertNetworkDevice));
    if let Some(v) = cfg.vsock {
        actions.push(VmmAction::SetVsockDevice(v));
    }
    for a in actions {
        vmm.handle(a).map_err(|e| format!("Configuration for VMM from one single json failed: {e}"))?;
    }
    vmm.handle(VmmAction::StartMicroVm)
        .map_err(|e| format!("Could not Start MicroVM from one single json: {e}"))?;
    Ok(())
}

/// The double's `main`.
pub fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().collect();
    if args.iter().any(|a| a == guest::GUEST_MODE_FLAG) {
        return guest::init::main();
    }
    let args = match cli::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("Error: ParseArguments({e:?})");
            eprintln!("Arguments parsing error: {e} \n\nFor more information try --help.");
            return ExitCode::from(153);
        }
    };
    if args.help || args.version {
        println!("Firecracker v{FIRECRACKER_VERSION}\n");
        if args.help {
            println!("firecracker-double: a Firecracker test double (see tests/README.md)");
        }
        return ExitCode::SUCCESS;
    }
    if !cli::valid_instance_id(&args.id) {
        eprintln!("Invalid instance ID: InvalidChar or InvalidLen for {:?}", args.id);
        std::process::abort();
    }
    let logger = Arc::new(Mutex::new(Logger::new(&args.id)));
    let level = match args.level.as_deref().map(str::parse::<config::LevelFilter>).transpose() {
        Ok(l) => l,
        Err(bad) => {
            let msg = format!(
                "Invalid value for logger level: Failed to parse string to level filter: {bad}.Possible values: [Error, Warning, Info, Debug]"
            );
            return exit_with_error(&logger, &msg, &format!("InvalidLogLevel({bad:?})"), 152);
        }
    };
    if let Err(e) = lock(&logger).update(args.log_path.as_deref(), level, Some(args.show_level)) {
        let msg = format!("Could not initialize logger: Failed to open target file: {e}");
        return exit_with_error(&logger, &msg, &format!("LoggerInitialization({e:?})"), 1);
    }
    lock(&logger).log(Level::Info, "main", &format!("Running Firecracker v{FIRECRACKER_VERSION}"));
    for flag in &args.ignored {
        lock(&logger).log(Level::Debug, "main", &format!("firecracker-double ignores {flag}"));
    }
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    if let Some(p) = &args.metrics_path
        && let Err(e) = lock(&metrics).init(p)
    {
        let msg = format!("Could not initialize metrics: {e}");
        return exit_with_error(&logger, &msg, &format!("MetricsInitialization({e:?})"), 1);
    }

    let listener = if args.no_api {
        None
    } else {
        match std::os::unix::net::UnixListener::bind(&args.api_sock) {
            Ok(l) => Some(l),
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                let path = args.api_sock.display().to_string();
                let msg = format!(
                    "RunWithApiError error: Failed to open the API socket at: {path}. Check that it is not already used."
                );
                return exit_with_error(
                    &logger,
                    &msg,
                    &format!("RunWithApi(FailedToBindSocket({path:?}))"),
                    1,
                );
            }
            Err(e) => {
                let msg =
                    format!("RunWithApiError error: Failed to bind and run the HTTP server: IO error: {e}");
                return exit_with_error(
                    &logger,
                    &msg,
                    &format!("RunWithApi(FailedToBindAndRunHttpServer(IOError({e:?})))"),
                    1,
                );
            }
        }
    };
    if listener.is_some() {
        lock(&logger).log(Level::Info, "main", &format!("Listening on API socket ({:?}).", args.api_sock));
    }

    // A current-thread runtime on the main thread: the guest is spawned from this thread, and
    // PR_SET_PDEATHSIG fires when the spawning thread ends, so it must live as long as the VMM.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            return exit_with_error(&logger, &format!("Cannot start the runtime: {e}"), &format!("{e:?}"), 1);
        }
    };
    runtime.block_on(async move {
        let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
        let launcher = guest::LinuxLauncher::new(exit_tx, logger.clone());
        let vmm =
            Vmm::new(&args.id, Box::new(tap::LinuxTaps), Box::new(launcher), logger.clone(), metrics.clone());
        let ctx = Arc::new(server::ApiContext {
            vmm: Mutex::new(vmm),
            logger: logger.clone(),
            metrics: metrics.clone(),
        });
        if let Some(listener) = listener {
            let listener = match listener
                .set_nonblocking(true)
                .and_then(|_| tokio::net::UnixListener::from_std(listener))
            {
                Ok(l) => l,
                Err(e) => {
                    return exit_with_error(
                        &logger,
                        &format!("Failed to bind and run the HTTP server: IO error: {e}"),
                        &format!("{e:?}"),
                        1,
                    );
                }
            };
            tokio::spawn(server::serve(listener, ctx.clone()));
            lock(&logger).log(Level::Info, "fc_api", "API server started.");
        }
        if let Some(path) = &args.config_file {
            let booted = boot_from_config_file(&mut lock(&ctx.vmm), path);
            match booted {
                Ok(()) => lock(&logger).log(
                    Level::Info,
                    "main",
                    "Successfully started microvm that was configured from one single json",
                ),
                Err(e) => {
                    let msg = format!("RunWithApiError error: Failed to build MicroVM from Json: {e}");
                    return exit_with_error(&logger, &msg, "RunWithApi(BuildFromJson(..))", 1);
                }
            }
        }
        let _ = exit_rx.recv().await;
        let _ = lock(&metrics).write();
        lock(&logger).log(Level::Info, "main", "Firecracker exiting successfully. exit_code=0");
        ExitCode::SUCCESS
    })
}
