//! cgroup v2 paths: where the hierarchy is mounted (from /proc/mounts: on
//! a hybrid layout it is /sys/fs/cgroup/unified, not /sys/fs/cgroup), a
//! group's id (the inode of its directory, as the kernel's
//! `bpf_get_current_cgroup_id` reports it) and this process's own group.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::InterceptError;

/// One cgroup v2 group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Absolute path of its directory.
    pub path: PathBuf,
    pub id: u64,
}

impl Cgroup {
    /// The group at `rel` (relative to the cgroup2 mount; a leading `/` is
    /// allowed), which must exist.
    pub fn resolve(rel: &str) -> Result<Cgroup, InterceptError> {
        let root = mount()?;
        let path = root.join(rel.trim_start_matches('/'));
        let meta = std::fs::metadata(&path).map_err(|e| InterceptError::Cgroup {
            path: path.display().to_string(),
            reason: format!("{e} (cgroup2 is mounted at {})", root.display()),
        })?;
        if !meta.is_dir() {
            return Err(InterceptError::Cgroup {
                path: path.display().to_string(),
                reason: "not a directory".into(),
            });
        }
        Ok(Cgroup {
            path,
            id: meta.ino(),
        })
    }

    pub fn display(&self) -> String {
        self.path.display().to_string()
    }
}

/// Where the cgroup2 hierarchy is mounted.
pub fn mount() -> Result<PathBuf, InterceptError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| InterceptError::Cgroup {
        path: "/proc/mounts".into(),
        reason: e.to_string(),
    })?;
    mount_in(&mounts).ok_or_else(|| InterceptError::Cgroup {
        path: "/proc/mounts".into(),
        reason: "no cgroup2 file system is mounted".into(),
    })
}

fn mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// This process's own cgroup v2 group (the `0::` line of /proc/self/cgroup).
pub fn own() -> Result<Cgroup, InterceptError> {
    let text =
        std::fs::read_to_string("/proc/self/cgroup").map_err(|e| InterceptError::Cgroup {
            path: "/proc/self/cgroup".into(),
            reason: e.to_string(),
        })?;
    let rel = own_in(&text).ok_or_else(|| InterceptError::Cgroup {
        path: "/proc/self/cgroup".into(),
        reason: "no cgroup v2 line".into(),
    })?;
    Cgroup::resolve(rel)
}

fn own_in(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// A path relative to the mount, for messages and configs.
pub fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .map(|p| format!("/{}", p.display()))
        .unwrap_or_else(|_| path.display().to_string())
}

/// Whether this process runs as root (interception needs it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A group of its own for a test or a benchmark, right below the cgroup2
/// root (`dmsc-<pid>-<name>`), removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    pub group: Cgroup,
    /// Its path relative to the mount (what `[intercept]` takes).
    pub rel: String,
}

impl Scratch {
    pub fn new(name: &str) -> Result<Scratch, InterceptError> {
        let root = mount()?;
        let rel = format!("dmsc-{}-{name}", std::process::id());
        std::fs::create_dir_all(root.join(&rel)).map_err(|e| InterceptError::Cgroup {
            path: root.join(&rel).display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Scratch {
            group: Cgroup::resolve(&rel)?,
            rel,
        })
    }

    /// Runs a shell command inside the group (the shell moves itself in,
    /// then execs the command; no code runs between fork and exec) and
    /// returns its output.
    pub fn run(&self, cmd: &str) -> std::io::Result<std::process::Output> {
        let procs = self.group.path.join("cgroup.procs");
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {} && exec {cmd}", procs.display()))
            .output()
    }

    /// [`run`](Self::run)'s standard output, as text.
    pub fn stdout(&self, cmd: &str) -> String {
        self.run(cmd)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // (Fails while a process still lives in it; the test's processes
        // have exited by now.)
        let _ = std::fs::remove_dir(&self.group.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_and_own_group_are_read_from_proc() {
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_in("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            own_in("12:cpu:/x\n0::/system.slice/dmsc.service\n"),
            Some("/system.slice/dmsc.service")
        );
        assert_eq!(
            relative(Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/cgroup/a/b")),
            "/a/b"
        );
    }
}
