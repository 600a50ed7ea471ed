//! Cgroup v2 hierarchies and `/var/log/pods`-style directories made by a test, laid out as a
//! kubelet and its container runtimes lay them out.

use std::path::{Path, PathBuf};

use super::run_ok;

/// A cgroup v2 subtree made for one test, removed on drop (after the test moved itself back
/// where it was).
pub struct Cgroups {
    /// The cgroup2 mount, and whether this test mounted it (a kernel-matrix guest may have
    /// none).
    pub root: PathBuf,
    pub mounted: bool,
    /// This test's subtree, and the test process's own cgroup (to go back to).
    top: PathBuf,
    home: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroups {
    pub fn new() -> Cgroups {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let found = mountinfo.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(point))
        });
        let (root, mounted) = match found {
            Some(r) => (r, false),
            None => {
                let dir =
                    std::env::temp_dir().join(format!("tracer-cgroup2-{}", std::process::id()));
                std::fs::create_dir_all(&dir).expect("mount point");
                run_ok("mount", &["-t", "cgroup2", "none", dir.to_str().unwrap()]);
                (dir, true)
            }
        };
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line in /proc/self/cgroup");
        let home = root.join(own.trim_start_matches('/'));
        let top = root.join(format!("tracer-test-{}", std::process::id()));
        std::fs::create_dir_all(&top).expect("the test's cgroup");
        Cgroups {
            root,
            mounted,
            top,
            home,
            made: Vec::new(),
        }
    }

    /// Makes `rel` (and its parents) under this test's subtree.
    pub fn make(&mut self, rel: &str) -> PathBuf {
        let mut dir = self.top.clone();
        for part in rel.split('/') {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {dir:?}: {e}"));
                self.made.push(dir.clone());
            }
        }
        dir
    }

    /// Moves this process (every thread) into `dir`: sockets made now belong to it.
    pub fn enter(&self, dir: &Path) {
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("moving into {dir:?}: {e}"));
    }

    pub fn leave(&self) {
        self.enter(&self.home);
    }

    /// `--kubepods-cgroup` flags for this test's `kubepods.slice` and `kubepods` (the agent
    /// finds pods only under the kubelet's cgroups; these stand for them).
    pub fn kubepods_args(&self) -> Vec<String> {
        let top = self.path(&self.top);
        ["kubepods.slice", "kubepods"]
            .iter()
            .flat_map(|k| ["--kubepods-cgroup".to_owned(), format!("{top}/{k}")])
            .collect()
    }

    /// The path as `ss --cgroup` and the agent show it.
    pub fn path(&self, dir: &Path) -> String {
        format!("/{}", dir.strip_prefix(&self.root).unwrap().display())
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        for dir in self.made.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(&self.top);
        if self.mounted {
            let _ = std::process::Command::new("umount")
                .arg(&self.root)
                .status();
            let _ = std::fs::remove_dir(&self.root);
        }
    }
}

/// A `/var/log/pods`-style directory: `<namespace>_<name>_<uid>` per pod.
pub struct PodLogs(pub PathBuf);

impl PodLogs {
    /// One directory per (namespace, name, uid).
    pub fn new(pods: &[(&str, &str, &str)]) -> PodLogs {
        let dir = std::env::temp_dir().join(format!("tracer-pod-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (namespace, name, uid) in pods {
            std::fs::create_dir_all(dir.join(format!("{namespace}_{name}_{uid}")))
                .expect("pod log dir");
        }
        PodLogs(dir)
    }

    pub fn dir(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temporary directory")
    }
}

impl Drop for PodLogs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
