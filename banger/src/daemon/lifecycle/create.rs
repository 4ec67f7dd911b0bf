//! `create`: a new row in state `created`, the VM's private directory, the keys its starts use
//! (the user's key, made on first use, and the VM's SSH host key, kept in its directory, so that
//! a start runs no `ssh-keygen`) and, when asked for, its work disk (made as the user, see
//! [`crate::daemon::work_disk`]); nothing else. Anything made goes again when a later part
//! fails.

use super::create_private_dir;
use crate::api_types::{CreateVm, VmView};
use crate::daemon::error::{MAX_VCPUS, MIN_VM_MEMORY_MIB};
use crate::daemon::store::unix_now;
use crate::daemon::{Daemon, DaemonError, images, work_disk};
use crate::ids::{new_vm_id, validate_name};
use crate::model::VmRuntime;
use crate::paths::check_socket_path_len;

impl Daemon {
    /// `POST /v1/vms`.
    pub async fn create(&self, req: CreateVm) -> Result<VmView, DaemonError> {
        validate_name(&req.name)?;
        let lock = self.vm_lock(&req.name);
        let _guard = lock.lock().await;
        if self.with_store(|s| s.get_vm_by_name(&req.name))?.is_some() {
            return Err(DaemonError::VmExists(req.name));
        }
        let image = {
            let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            images::select(&store, req.image.as_deref(), self.config.default_image.as_deref())?
        }
        .name;
        let vcpus = req.vcpus.unwrap_or(self.config.default_vcpus);
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(DaemonError::Vcpus(vcpus));
        }
        let memory_mib = req.memory_mib.unwrap_or(self.config.default_memory_mib);
        if memory_mib < MIN_VM_MEMORY_MIB {
            return Err(DaemonError::Memory(memory_mib));
        }
        if let Some(bytes) = req.work_disk_bytes {
            work_disk::check_size(bytes)?;
        }
        let mut vm = VmRuntime::new_created(
            &self.paths,
            new_vm_id(),
            &req.name,
            &image,
            vcpus,
            memory_mib,
            unix_now(),
        );
        check_socket_path_len(&vm.api_socket, 0)?;
        check_socket_path_len(&vm.vsock_path, 6)?;
        create_private_dir(&vm.vm_dir).map_err(|source| DaemonError::Io {
            action: "create",
            path: vm.vm_dir.clone(),
            source,
        })?;
        let made = match self.make_keys(&vm).await {
            Ok(()) => self.make_work_disk(&mut vm, req.work_disk_bytes).await,
            Err(e) => Err(e),
        };
        if let Err(e) = made.and_then(|()| self.with_store(|s| s.insert_vm(&vm))) {
            if let Err(rm) = std::fs::remove_dir_all(&vm.vm_dir) {
                tracing::warn!(dir = %vm.vm_dir.display(), error = %rm, "cannot remove the directory of a vm not created");
            }
            return Err(e);
        }
        tracing::info!(vm = %vm.name, id = %vm.id, "created");
        Ok(self.view(&vm))
    }
}

impl Daemon {
    /// Makes the user's key if it is not there yet, and the VM's host key.
    async fn make_keys(&self, vm: &VmRuntime) -> Result<(), DaemonError> {
        let (prep, user_key) = (self.prep.clone(), self.paths.ssh_key());
        let (host_key, comment) = (vm.host_key_path(), format!("root@{}", vm.name));
        tokio::task::spawn_blocking(move || {
            prep.user_key(&user_key)?;
            prep.host_key(&host_key, &comment).map(drop)
        })
        .await
        .map_err(DaemonError::Task)??;
        Ok(())
    }

    /// Makes the work disk of a VM being created, when one is asked for, and records it in `vm`.
    async fn make_work_disk(&self, vm: &mut VmRuntime, bytes: Option<u64>) -> Result<(), DaemonError> {
        let Some(bytes) = bytes else { return Ok(()) };
        let path = self.paths.vm_work_disk(&vm.id);
        let (prep, dest) = (self.prep.clone(), path.clone());
        tokio::task::spawn_blocking(move || prep.make_work_disk(&dest, bytes))
            .await
            .map_err(DaemonError::Task)??;
        vm.work_disk_path = Some(path);
        vm.work_disk_bytes = Some(bytes);
        Ok(())
    }
}
