//! Starting a process in a session of its own (`setsid` between fork and exec), so it outlives
//! whoever started it and never gets the signals of its starter's terminal or process group: the
//! CLI starting `bangerd`, and `bangerd` starting a VMM and its serial relay.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

/// A command for `program` that runs in a new session, with standard input from `/dev/null`.
pub fn detached_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec; setsid is async-signal-safe
    // and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_child_leads_its_own_session() {
        let out = detached_command(Path::new("/bin/sh"))
            .args(["-c", "cut -d' ' -f6 /proc/self/stat; echo $$"])
            .output()
            .await
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let (sid, pid) = (lines.next().unwrap(), lines.next().unwrap());
        assert_eq!(sid, pid, "the shell is not its session's leader: {text}");
    }
}
