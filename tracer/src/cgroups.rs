//! Cgroup v2 ids to cgroup paths: where the cgroup2 file system is mounted ([`cgroup2_root`])
//! and a bounded cache from the kernel's cgroup id (the inode number of the cgroup's directory)
//! to the path relative to that mount, as `ss --cgroup` prints it ([`CgroupPaths`]).
//!
//! Owns: finding the mount, walking the cgroup tree. Does not own: what a path means
//! (`workload`), nor cgroup v1 (the probe reports v2 ids only).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// `statfs` `f_type` of a cgroup2 file system (CGROUP2_SUPER_MAGIC).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Default shortest time between two walks of the tree (or scans of a directory).
pub const DEFAULT_MIN_WALK_INTERVAL: Duration = Duration::from_secs(1);

/// Whether `interval` has passed since `last` (None: never).
pub(crate) fn is_due(last: Option<Instant>, interval: Duration) -> bool {
    last.is_none_or(|t| t.elapsed() >= interval)
}

/// The mount point of the first cgroup2 mount in `mountinfo` (as in /proc/self/mountinfo).
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Optional fields come before " - ", so the file system type is found after it.
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        // The kernel escapes exactly these four in paths; `\134` last, so that an escaped
        // backslash followed by digits is not decoded twice.
        let point = mount.split(' ').nth(4)?;
        let point = point.replace("\\040", " ").replace("\\011", "\t");
        Some(point.replace("\\012", "\n").replace("\\134", "\\").into())
    })
}

/// Whether `path` is the root or any directory of a cgroup2 file system.
fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data, for which all zero bytes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `st` is a valid statfs for the kernel to fill.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    // The integer type of `f_type` differs between architectures and C libraries.
    rc == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// The cgroup2 mount to resolve ids under: `explicit` (`--cgroup-root`) or, without it, the
/// first cgroup2 mount of /proc/self/mountinfo.
pub fn cgroup2_root(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        // A hostPath of a hybrid host's /sys/fs/cgroup has the v2 tree at `unified`.
        let unified = p.join("unified");
        if is_cgroup2(p) {
            return Ok(p.to_path_buf());
        } else if is_cgroup2(&unified) {
            return Ok(unified);
        }
        let p = p.display();
        bail!(
            "--cgroup-root {p}: not a cgroup v2 file system (nor is {p}/unified): give the \
             cgroup2 mount, e.g. /sys/fs/cgroup"
        );
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    find_cgroup2_mount(&mountinfo).ok_or_else(|| {
        anyhow!(
            "no cgroup v2 file system is mounted: sockets are not attributed to cgroups (mount \
             one, or pass --cgroup-root)"
        )
    })
}

/// Bounded cache from cgroup id to cgroup path, refreshed by walking the tree on a miss.
pub struct CgroupPaths {
    root: PathBuf,
    capacity: usize,
    min_walk_interval: Duration,
    /// By cgroup id, as found by the last walk. foldhash: the keys are the kernel's.
    present: foldhash::HashMap<u64, Arc<str>>,
    /// Found by the walk before the last but not by the last one, kept until the next walk:
    /// the sockets of a short-lived container outlive its cgroup.
    gone: foldhash::HashMap<u64, Arc<str>>,
    last_walk: Option<Instant>,
    walks: u64,
    truncated_walks: u64,
}

impl CgroupPaths {
    /// An empty cache over the cgroup2 tree at `root`, of at most `capacity` entries.
    pub fn new(root: PathBuf, capacity: usize) -> CgroupPaths {
        CgroupPaths {
            root,
            capacity,
            min_walk_interval: DEFAULT_MIN_WALK_INTERVAL,
            present: foldhash::HashMap::default(),
            gone: foldhash::HashMap::default(),
            last_walk: None,
            walks: 0,
            truncated_walks: 0,
        }
    }

    /// Sets the shortest time between two walks (a miss inside it is just a miss).
    pub fn with_min_walk_interval(mut self, d: Duration) -> Self {
        self.min_walk_interval = d;
        self
    }

    /// The cgroup2 mount the paths are relative to.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of cgroup `id` relative to the root, starting with `/`; None when unknown.
    pub fn path(&mut self, id: u64) -> Option<Arc<str>> {
        if let Some(p) = self.get(id) {
            return Some(p);
        }
        // A new cgroup, or a bogus id: the rate limit keeps a stream of the latter cheap.
        if !is_due(self.last_walk, self.min_walk_interval) {
            return None;
        }
        self.walk();
        self.get(id)
    }

    fn get(&self, id: u64) -> Option<Arc<str>> {
        let path = self.present.get(&id).or_else(|| self.gone.get(&id));
        path.cloned()
    }

    /// How many walks of the tree were done.
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// How many walks found more cgroups than the capacity.
    pub fn truncated_walks(&self) -> u64 {
        self.truncated_walks
    }

    /// How many cgroups are known, including those gone since the walk before.
    pub fn len(&self) -> usize {
        self.present.len() + self.gone.len()
    }

    /// Whether no cgroup is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the entries with the tree as it is now, plus those of the previous walk
    /// that are gone now.
    fn walk(&mut self) {
        self.walks += 1;
        self.last_walk = Some(Instant::now());
        let mut found = foldhash::HashMap::default();
        if let Ok(meta) = std::fs::metadata(&self.root) {
            found.insert(meta.ino(), Arc::from("/"));
        }
        let mut pending = vec![(self.root.clone(), String::new())];
        'walk: while let Some((dir, rel)) = pending.pop() {
            // Cgroups come and go during the walk: whatever cannot be read is skipped.
            let Ok(children) = std::fs::read_dir(&dir) else {
                continue;
            };
            for child in children.flatten() {
                // The type and inode number come with the directory entry (getdents): no stat
                // per entry (a cgroup directory holds a few dozen files), and symlinks are
                // not followed.
                if !child.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if found.len() >= self.capacity {
                    self.truncated_walks += 1;
                    break 'walk;
                }
                let rel = format!("{rel}/{}", child.file_name().to_string_lossy());
                found.insert(child.ino(), Arc::from(rel.as_str()));
                pending.push((child.path(), rel));
            }
        }
        let mut gone = std::mem::replace(&mut self.present, found);
        gone.retain(|id, _| !self.present.contains_key(id));
        let room = self.capacity.saturating_sub(self.present.len());
        self.gone = gone.into_iter().take(room).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("tracer-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        /// Makes directory `rel` and returns its inode number.
        fn mkdir(&self, rel: &str) -> u64 {
            std::fs::create_dir_all(self.0.join(rel)).unwrap();
            std::fs::metadata(self.0.join(rel)).unwrap().ino()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "31 25 0:27 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      42 31 0:39 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            find_cgroup2_mount(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_mount(unified), Some("/sys/fs/cgroup".into()));
        let v1 = "31 25 0:27 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                  42 31 0:39 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu\n";
        assert_eq!(find_cgroup2_mount(v1), None);
        let escaped = r"50 24 0:44 / /mnt/my\040cg\134040 rw - cgroup2 none rw";
        assert_eq!(find_cgroup2_mount(escaped), Some(r"/mnt/my cg\040".into()));
    }

    #[test]
    fn a_root_that_is_not_cgroup2_is_refused() {
        let tmp = TempDir::new("not-cgroup2");
        let err = cgroup2_root(Some(&tmp.0)).unwrap_err().to_string();
        assert!(err.contains("not a cgroup v2 file system"), "{err}");
    }

    #[test]
    fn resolves_ids_to_paths() {
        let tmp = TempDir::new("paths");
        let (root, slice) = (tmp.mkdir(""), tmp.mkdir("system.slice"));
        let nginx = tmp.mkdir("system.slice/nginx.service");
        std::fs::write(tmp.0.join("system.slice/cgroup.procs"), "").unwrap();
        let mut paths = CgroupPaths::new(tmp.0.clone(), 100);
        assert_eq!(paths.path(root).as_deref(), Some("/"));
        assert_eq!(paths.path(slice).as_deref(), Some("/system.slice"));
        assert_eq!(
            paths.path(nginx).as_deref(),
            Some("/system.slice/nginx.service")
        );
        assert_eq!((paths.walks(), paths.len()), (1, 3));
        assert_eq!(paths.root(), tmp.0.as_path());
    }

    #[test]
    fn a_miss_walks_at_most_once_per_interval() {
        let tmp = TempDir::new("interval");
        let mut paths = CgroupPaths::new(tmp.0.clone(), 100);
        assert_eq!(paths.path(u64::MAX), None);
        let late = tmp.mkdir("late");
        assert_eq!((paths.path(late), paths.walks()), (None, 1));
        let mut paths = paths.with_min_walk_interval(Duration::ZERO);
        assert_eq!(paths.path(late).as_deref(), Some("/late"));
        assert_eq!(paths.walks(), 2);
    }

    #[test]
    fn a_removed_cgroup_stays_until_the_second_walk() {
        let tmp = TempDir::new("gone");
        let short = tmp.mkdir("short-lived");
        let mut paths = CgroupPaths::new(tmp.0.clone(), 100).with_min_walk_interval(Duration::ZERO);
        assert_eq!(paths.path(short).as_deref(), Some("/short-lived"));
        std::fs::remove_dir(tmp.0.join("short-lived")).unwrap();
        assert_eq!(paths.path(u64::MAX), None);
        assert_eq!(paths.path(short).as_deref(), Some("/short-lived"));
        assert_eq!((paths.path(u64::MAX), paths.walks()), (None, 3));
        assert_eq!(paths.path(short), None);
    }

    #[test]
    fn a_walk_stops_at_capacity() {
        let tmp = TempDir::new("capacity");
        for d in ["a", "b", "c"] {
            tmp.mkdir(d);
        }
        let mut paths = CgroupPaths::new(tmp.0.clone(), 2);
        paths.path(u64::MAX);
        assert_eq!((paths.len(), paths.truncated_walks()), (2, 1));
    }
}
