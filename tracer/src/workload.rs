//! What a cgroup path says about the workload in it: container, Kubernetes pod, systemd unit
//! ([`parse_path`]); pod names from the kubelet's log directories ([`PodNames`]); and the
//! cached cgroup id → workload resolution ([`Resolver`]).
//!
//! Owns: the cgroup naming conventions of the kubelet (systemd and cgroupfs drivers),
//! containerd, CRI-O, Docker, Podman and systemd. Does not own: ids to paths (`cgroups`), nor
//! any Kubernetes API call: what the paths and /var/log/pods do not say stays unknown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cgroups::{is_due, CgroupPaths, DEFAULT_MIN_WALK_INTERVAL};

/// Where the kubelet keeps one directory per pod, named `<namespace>_<name>_<uid>`.
pub const POD_LOG_DIR: &str = "/var/log/pods";

/// Most pods [`PodNames`] knows, and most workloads [`Resolver`] caches.
const MAX_ENTRIES: usize = 65_536;

/// Longest cgroup path shown in JSON (`cgroup`), in characters: longer ones keep their end,
/// the most specific part, after a leading `…`. The kernel bounds each name (255 bytes), not
/// the depth.
pub const MAX_PATH_CHARS: usize = 1024;

/// Widest WORKLOAD column of `watch` and `tracer sockets`, in characters, cut the same way.
pub const MAX_COLUMN_CHARS: usize = 64;

/// `text` if it has at most `max` characters, else `…` and its last `max - 1` characters.
pub fn cut_tail(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let n = text.chars().count();
    if n <= max {
        return text.into();
    }
    let start = text
        .char_indices()
        .nth(n - max + 1)
        .map_or(text.len(), |(i, _)| i);
    format!("…{}", &text[start..]).into()
}

/// What a cgroup path says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The cgroup path, relative to the cgroup2 root ("/" for the root).
    pub path: Arc<str>,
    /// The container whose cgroup this is, or is inside.
    pub container: Option<Container>,
    /// The Kubernetes pod whose cgroup this is, or is inside.
    pub pod: Option<Pod>,
    /// The systemd unit (`nginx.service`, `session-3.scope`, `user@1000.service`) when the
    /// cgroup is not a container's.
    pub unit: Option<String>,
}

/// A container, as its cgroup names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// "containerd", "crio", "docker", "podman", or "" when only the id is known.
    pub runtime: &'static str,
    /// The full id, as in the path.
    pub id: String,
}

/// A Kubernetes pod, as its cgroup (and log directory) names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// The pod uid, with dashes as Kubernetes prints it.
    pub uid: String,
    /// "guaranteed", "burstable" or "besteffort".
    pub qos: &'static str,
    /// The namespace, when known.
    pub namespace: Option<String>,
    /// The pod name, when known.
    pub name: Option<String>,
}

/// The cgroups the kubelet puts pods in by default: its systemd driver's and its cgroupfs
/// driver's, at the root of the hierarchy (a kubelet `--cgroup-root` moves them: give
/// theirs).
pub const DEFAULT_KUBEPODS: [&str; 2] = ["/kubepods.slice", "/kubepods"];

/// The workload a cgroup path names (pod names are left to [`PodNames`]). A pod is only
/// recognised right under one of `kubepods` (the cgroups the kubelet puts pods in, which only
/// root can write): a `kubepods` directory anywhere else is anyone's, since any user with a
/// delegated subtree (`user@UID.service`, rootless containers) can make one.
pub fn parse_path(path: &str, kubepods: &[impl AsRef<str>]) -> Workload {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // The kubelet puts a pod's containers right under the pod's cgroup.
    let found = kubepods
        .iter()
        .find_map(|root| pod_under(root.as_ref(), &parts));
    let (pod, container, unit) = match found {
        Some((pod, next)) => {
            let container = next.and_then(|n| container_of(n, Some("")));
            // Such as CRI-O's `crio-conmon-<id>.scope`, which holds its monitor process.
            let unit = next.filter(|n| container.is_none() && is_unit(n));
            (Some(pod), container, unit)
        }
        None => {
            // Cgroups made inside a container's belong to it: the one nearest to the root wins.
            let container = (0..parts.len()).find_map(|i| {
                let bare = (i > 0 && parts[i - 1] == "docker").then_some("docker");
                container_of(parts[i], bare)
            });
            let last_unit = parts.iter().rev().copied().find(|p| is_unit(p));
            let unit = last_unit.filter(|_| container.is_none());
            (None, container, unit)
        }
    };
    let unit = unit.map(|u| u.to_string());
    Workload {
        path: Arc::from(path),
        container,
        pod,
        unit,
    }
}

/// The pod whose cgroup `parts` is in, right under the kubepods cgroup `root`, and the part
/// after the pod's (its container's, if any).
fn pod_under<'p>(root: &str, parts: &[&'p str]) -> Option<(Pod, Option<&'p str>)> {
    let root_parts: Vec<&str> = root.split('/').filter(|p| !p.is_empty()).collect();
    let under =
        parts.len() > root_parts.len() && parts.iter().zip(&root_parts).all(|(a, b)| a == b);
    let rest = parts.get(root_parts.len()..).filter(|_| under)?;
    let last = root.rsplit('/').find(|p| !p.is_empty())?;
    let (qos, pod, next) = match last.strip_suffix(".slice") {
        // systemd driver: each slice's name repeats its parent's, e.g. under `kubepods.slice`
        // `kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`, with the uid's dashes
        // as underscores.
        Some(stem) => {
            let (qos, pod, at) = match *rest.first()? {
                p if p == format!("{stem}-burstable.slice") => ("burstable", *rest.get(1)?, 2),
                p if p == format!("{stem}-besteffort.slice") => ("besteffort", *rest.get(1)?, 2),
                p => ("guaranteed", p, 1),
            };
            let prefix = match qos {
                "guaranteed" => format!("{stem}-pod"),
                q => format!("{stem}-{q}-pod"),
            };
            let uid = pod.strip_prefix(&prefix)?.strip_suffix(".slice")?;
            (qos, uid.replace('_', "-"), rest.get(at).copied())
        }
        // cgroupfs driver: `kubepods/pod<uid>` or `kubepods/<qos>/pod<uid>`.
        None => {
            let (qos, pod, at) = match *rest.first()? {
                "burstable" => ("burstable", *rest.get(1)?, 2),
                "besteffort" => ("besteffort", *rest.get(1)?, 2),
                p => ("guaranteed", p, 1),
            };
            (
                qos,
                pod.strip_prefix("pod")?.to_owned(),
                rest.get(at).copied(),
            )
        }
    };
    let pod = Pod {
        uid: pod,
        qos,
        namespace: None,
        name: None,
    };
    is_pod_uid(&pod.uid).then_some((pod, next))
}

/// A UUID (8-4-4-4-12 hex digits), or the 32 hex digits of a static pod's uid.
fn is_pod_uid(uid: &str) -> bool {
    let hex = |s: &str, n| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    match uid.split('-').collect::<Vec<_>>()[..] {
        [a, b, c, d, e] => hex(a, 8) && hex(b, 4) && hex(c, 4) && hex(d, 4) && hex(e, 12),
        [all] => hex(all, 32),
        _ => false,
    }
}

/// The container whose cgroup is `part`; `bare`: the runtime of a bare id, if one may be.
fn container_of(part: &str, bare: Option<&'static str>) -> Option<Container> {
    let scopes = [
        ("cri-containerd-", "containerd"),
        ("crio-", "crio"),
        ("docker-", "docker"),
        ("libpod-", "podman"),
    ];
    let (runtime, id) = match part.strip_suffix(".scope") {
        None => (bare?, part),
        Some(stem) => scopes
            .iter()
            .find_map(|&(pre, rt)| Some((rt, stem.strip_prefix(pre)?)))?,
    };
    // Exactly 64 lowercase hex digits, as runtimes make them.
    let valid = id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    valid.then(|| Container {
        runtime,
        id: id.to_string(),
    })
}

/// A systemd unit name, of a kind that can have a cgroup.
fn is_unit(part: &str) -> bool {
    let kinds = ["service", "scope", "slice", "socket", "mount", "swap"];
    let unit = part.rsplit_once('.');
    unit.is_some_and(|(name, kind)| !name.is_empty() && kinds.contains(&kind))
}

impl Workload {
    /// One short human string for a table column, at most [`MAX_COLUMN_CHARS`].
    pub fn short(&self) -> String {
        cut_tail(&self.short_uncut(), MAX_COLUMN_CHARS).into_owned()
    }

    fn short_uncut(&self) -> String {
        let id12 = |c: &Container| c.id.chars().take(12).collect::<String>();
        let Some(pod) = &self.pod else {
            return match (&self.container, &self.unit) {
                (Some(c), _) if c.runtime.is_empty() => format!("container:{}", id12(c)),
                (Some(c), _) => format!("{}:{}", c.runtime, id12(c)),
                (None, Some(unit)) => unit.clone(),
                (None, None) => self.path.to_string(),
            };
        };
        let mut s = pod.text();
        if let Some(c) = &self.container {
            s = format!("{s}/{}", id12(c));
        }
        s
    }
}

impl Pod {
    /// `namespace/name`, or `pod:UID` while its name is not known.
    pub fn text(&self) -> String {
        match (&self.namespace, &self.name) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            _ => format!("pod:{}", self.uid),
        }
    }
}

/// Namespace, name and uid from a kubelet pod log directory name `<namespace>_<name>_<uid>`.
pub fn parse_pod_log_dir(name: &str) -> Option<(String, String, String)> {
    // Namespaces and pod names are DNS names: they never contain `_`.
    match name.split('_').collect::<Vec<_>>()[..] {
        [ns, pod, uid] if ![ns, pod, uid].contains(&"") => {
            Some((ns.to_string(), pod.to_string(), uid.to_string()))
        }
        _ => None,
    }
}

/// Pod namespace and name by pod uid, from the kubelet's pod log directories.
pub struct PodNames {
    dir: PathBuf,
    min_walk_interval: Duration,
    names: HashMap<String, (Arc<str>, Arc<str>)>,
    last_scan: Option<Instant>,
    dir_exists: bool,
}

impl PodNames {
    /// Names from the pod directories in `dir` (usually [`POD_LOG_DIR`]), read on demand.
    pub fn new(dir: PathBuf) -> PodNames {
        PodNames {
            dir,
            min_walk_interval: DEFAULT_MIN_WALK_INTERVAL,
            names: HashMap::new(),
            last_scan: None,
            dir_exists: false,
        }
    }

    /// Sets the shortest time between two scans of the directory.
    pub fn with_min_walk_interval(mut self, d: Duration) -> Self {
        self.min_walk_interval = d;
        self
    }

    /// Whether the directory could be read at the last scan.
    pub fn dir_exists(&self) -> bool {
        self.dir_exists
    }

    /// Namespace and name of pod `uid`, rescanning the directory on a miss.
    pub fn lookup(&mut self, uid: &str) -> Option<(Arc<str>, Arc<str>)> {
        if !self.names.contains_key(uid) && is_due(self.last_scan, self.min_walk_interval) {
            self.last_scan = Some(Instant::now());
            // A missing directory means no names, not an error: there may be no kubelet.
            let entries = std::fs::read_dir(&self.dir);
            self.dir_exists = entries.is_ok();
            let names = entries.into_iter().flatten().flatten();
            let names = names.filter_map(|e| parse_pod_log_dir(e.file_name().to_str()?));
            let names = names.map(|(ns, name, uid)| (uid, (Arc::from(ns), Arc::from(name))));
            self.names = names.take(MAX_ENTRIES).collect();
        }
        self.names.get(uid).cloned()
    }
}

/// Cgroup id → workload, cached.
pub struct Resolver {
    cgroups: CgroupPaths,
    pods: PodNames,
    /// The cgroups the kubelet puts pods in ([`parse_path`]).
    kubepods: Vec<String>,
    /// By cgroup id. foldhash: the keys are the kernel's, not an attacker's.
    cache: foldhash::HashMap<u64, Arc<Workload>>,
    cache_clears: u64,
}

impl Resolver {
    /// A resolver over `cgroups` (ids to paths) and `pods` (pod names), finding pods under
    /// the [`DEFAULT_KUBEPODS`] cgroups.
    pub fn new(cgroups: CgroupPaths, pods: PodNames) -> Resolver {
        Resolver {
            cgroups,
            pods,
            kubepods: DEFAULT_KUBEPODS.map(String::from).to_vec(),
            cache: foldhash::HashMap::default(),
            cache_clears: 0,
        }
    }

    /// Finds pods under these cgroups instead (paths from the cgroup2 root).
    pub fn with_kubepods(mut self, kubepods: Vec<String>) -> Self {
        self.kubepods = kubepods;
        self
    }

    /// The cgroup2 mount the paths are relative to.
    pub fn root(&self) -> &Path {
        self.cgroups.root()
    }

    /// The id-to-path map (its walks, for the agent's own metrics).
    pub fn paths(&self) -> &CgroupPaths {
        &self.cgroups
    }

    /// How many times the cache was full and emptied.
    pub fn cache_clears(&self) -> u64 {
        self.cache_clears
    }

    /// The workload of cgroup `id`; None for 0 (no cgroup) and for ids not found (yet).
    pub fn resolve(&mut self, id: u64) -> Option<Arc<Workload>> {
        if id == 0 {
            return None;
        }
        let cached = self.cache.get(&id).cloned();
        // A pod's log directory may appear after its first socket: its names are retried.
        let unnamed = |w: &Workload| w.pod.as_ref().is_some_and(|p| p.name.is_none());
        let mut workload = match &cached {
            Some(w) if !unnamed(w) => return cached,
            Some(w) => Workload::clone(w),
            // Unknown ids are not cached: a later walk may find them.
            None => parse_path(&self.cgroups.path(id)?, &self.kubepods),
        };
        if let Some(pod) = workload.pod.as_mut() {
            match self.pods.lookup(&pod.uid) {
                Some((ns, name)) => {
                    (pod.namespace, pod.name) = (Some(ns.to_string()), Some(name.to_string()))
                }
                None if cached.is_some() => return cached,
                None => {}
            }
        }
        if self.cache.len() >= MAX_ENTRIES {
            // Rare, and cheap to refill: simpler than tracking what was used last.
            self.cache.clear();
            self.cache_clears += 1;
        }
        let workload = Arc::new(workload);
        self.cache.insert(id, Arc::clone(&workload));
        Some(workload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const ID: &str = "3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
    const UID: &str = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b";
    const B: &str = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice";
    const E: &str = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice";

    /// `s` with `{ID}`, `{UID}`, `{U_}` (the uid with underscores) and the pod slices `{B}`
    /// (burstable) and `{E}` (besteffort) of the kubelet's systemd driver filled in.
    fn expand(s: &str) -> String {
        let s = s.replace("{B}", B).replace("{E}", E);
        let s = s.replace("{U_}", &UID.replace('-', "_"));
        s.replace("{UID}", UID).replace("{ID}", ID)
    }

    /// `path` parsed, as "<qos> <runtime> <unit>", with "-" for none and "?" for no runtime.
    fn parsed(path: &str) -> String {
        let kind = [
            "/kubelet.slice/kubelet-kubepods.slice",
            "/kubepods.slice",
            "/kubepods",
        ];
        let w = parse_path(path, &kind);
        let (pod, ctr) = (w.pod.as_ref(), w.container.as_ref());
        assert_eq!(&*w.path, path);
        assert!(pod.is_none_or(|p| (&*p.uid, &p.namespace, &p.name) == (UID, &None, &None)));
        assert!(ctr.is_none_or(|c| c.id == ID));
        let qos = pod.map_or("-", |p| p.qos);
        let rt = ctr.map_or("-", |c| if c.runtime.is_empty() { "?" } else { c.runtime });
        format!("{qos} {rt} {}", w.unit.as_deref().unwrap_or("-"))
    }

    #[test]
    fn parses_paths() {
        let cases = "
            {B}/cri-containerd-{ID}.scope => burstable containerd -
            {B}/cri-containerd-{ID}.scope/init => burstable containerd -
            {B} => burstable - -
            {E}/crio-{ID}.scope => besteffort crio -
            {E}/crio-conmon-{ID}.scope => besteffort - crio-conmon-{ID}.scope
            /kubepods.slice/kubepods-pod{U_}.slice/docker-{ID}.scope => guaranteed docker -
            /kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{U_}.slice => guaranteed - -
            /kubepods/burstable/pod{UID}/{ID} => burstable ? -
            /kubepods/besteffort/pod{UID}/{ID} => besteffort ? -
            /kubepods/pod{UID}/{ID}/sub => guaranteed ? -
            /kubepods/pod{UID}/{ID}0 => guaranteed - -
            /kubepods/burstable/podnot-a-uid/{ID} => - - -
            /kubepods.slice/kubepods-pod{U_}.slice/x/cri-containerd-{ID}.scope => guaranteed - -
            /kubepods.slice/kubepods-burstable.slice/kubepods-pod{U_}.slice => - - kubepods-pod{U_}.slice
            /kubepods.slice/kubepods-besteffort-pod{U_}.slice => - - kubepods-besteffort-pod{U_}.slice
            /kubepods/guaranteed/pod{UID} => - - -
            /user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/{ID} => - - user@1000.service
            /user.slice/user-1000.slice/user@1000.service{B} => - - kubepods-burstable-pod{U_}.slice
            /other.slice{B}/crio-{ID}.scope => - crio -
            /kubepodsx/pod{UID} => - - -
            /system.slice/docker-{ID}.scope => - docker -
            /docker/{ID} => - docker -
            /docker/3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c => - - -
            /somewhere/{ID} => - - -
            /system.slice/nginx.service => - - nginx.service
            /user.slice/user-1000.slice/session-3.scope => - - session-3.scope
            /user.slice/user-1000.slice/user@1000.service/app.slice/foo.service => - - foo.service
            /system.slice => - - system.slice
            / => - - -";
        for case in cases.lines().skip(1) {
            let (path, want) = case.trim().split_once(" => ").unwrap();
            assert_eq!(parsed(&expand(path)), expand(want), "{path}");
        }
    }

    #[test]
    fn short_names() {
        let mut w = parse_path(&expand("/kubepods/pod{UID}/{ID}"), &DEFAULT_KUBEPODS);
        assert_eq!(w.short(), format!("pod:{UID}/3f2a1b0c9d8e"));
        let pod = w.pod.as_mut().unwrap();
        (pod.namespace, pod.name) = (Some("shop".into()), Some("cart-7d9f".into()));
        assert_eq!(w.short(), "shop/cart-7d9f/3f2a1b0c9d8e");
        let short = |p: &str| parse_path(&expand(p), &DEFAULT_KUBEPODS).short();
        assert_eq!(short("/docker/{ID}"), "docker:3f2a1b0c9d8e");
        assert_eq!(short("/system.slice/nginx.service"), "nginx.service");
        assert_eq!(short("/machine"), "/machine");
        let deep = format!("/{}/x.service", "a".repeat(100));
        assert_eq!(short(&deep), "x.service");
        let deep = format!("/{}/x", "é".repeat(100));
        let cut = short(&deep);
        assert_eq!(cut.chars().count(), MAX_COLUMN_CHARS);
        assert!(cut.starts_with('…') && cut.ends_with("éé/x"), "{cut}");
    }

    #[test]
    fn cut_keeps_the_end_after_a_marker() {
        assert_eq!(cut_tail("abc", 3), "abc");
        assert_eq!(cut_tail("abcd", 3), "…cd");
        assert_eq!(cut_tail("ééééé", 4), "…ééé");
    }

    #[test]
    fn pod_log_dirs() {
        let want = ("shop".into(), "cart-7d9f".into(), UID.into());
        let dir = format!("shop_cart-7d9f_{UID}");
        assert_eq!(parse_pod_log_dir(&dir), Some(want));
        for bad in ["shop_cart", "a_b_c_d", "_b_c"] {
            assert_eq!(parse_pod_log_dir(bad), None);
        }
    }

    #[test]
    fn resolves_ids_to_named_pods() {
        let tmp = std::env::temp_dir().join(format!("tracer-{}-resolver", std::process::id()));
        let (cgroups, logs) = (tmp.join("cgroup"), tmp.join("pods"));
        let rel = expand("kubepods.slice/kubepods-pod{U_}.slice/cri-containerd-{ID}.scope");
        std::fs::create_dir_all(cgroups.join(&rel)).unwrap();
        let id = std::fs::metadata(cgroups.join(&rel)).unwrap().ino();
        let paths = CgroupPaths::new(cgroups.clone(), 100).with_min_walk_interval(Duration::ZERO);
        let names = PodNames::new(logs.clone()).with_min_walk_interval(Duration::ZERO);
        let mut resolver = Resolver::new(paths, names);
        assert_eq!(resolver.root(), cgroups.as_path());
        assert_eq!(resolver.resolve(0), None);
        assert_eq!(resolver.resolve(u64::MAX), None);
        // No log directory yet: the pod is known by its uid only, and its names are retried.
        let unnamed = resolver.resolve(id).unwrap();
        assert_eq!(unnamed.short(), format!("pod:{UID}/3f2a1b0c9d8e"));
        assert!(!resolver.pods.dir_exists());
        std::fs::create_dir_all(logs.join(format!("shop_cart-7d9f_{UID}"))).unwrap();
        let named = resolver.resolve(id).unwrap();
        let _ = std::fs::remove_dir_all(&tmp);
        assert_eq!(named.short(), "shop/cart-7d9f/3f2a1b0c9d8e");
        assert_eq!(*named.path, format!("/{rel}"));
        assert!(Arc::ptr_eq(&named, &resolver.resolve(id).unwrap()));
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config(3_000))]

        /// Any path: parsed without a panic; a pod only right under a kubepods cgroup, with a
        /// valid uid; a column of at most its width.
        #[test]
        fn any_cgroup_path_parses(
            parts in proptest::collection::vec(
                "kubepods(\\.slice)?|kubepods-(burstable|besteffort)(-pod[0-9a-f_-]{0,40})?\\.slice|pod[0-9a-f-]{0,40}|burstable|besteffort|(cri-containerd-|crio-|docker-|libpod-)?[0-9a-f]{60,68}(\\.scope)?|user@1000\\.service|\\PC{0,30}",
                0..8,
            ),
            uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            insert_at in 0usize..8,
        ) {
            let mut parts = parts;
            // Now and then a real pod cgroup, somewhere in the path.
            let at = insert_at.min(parts.len());
            parts.insert(at, format!("kubepods-pod{}.slice", uid.replace('-', "_")));
            let path = format!("/{}", parts.join("/"));
            let w = parse_path(&path, &DEFAULT_KUBEPODS);
            if let Some(pod) = &w.pod {
                // Empty components (`//`) are no level of the hierarchy.
                let first = parts.iter().find(|p| !p.is_empty()).map(String::as_str);
                proptest::prop_assert!(
                    matches!(first, Some("kubepods.slice" | "kubepods")),
                    "{path}"
                );
                proptest::prop_assert!(is_pod_uid(&pod.uid));
            }
            if at == 1 && parts[0] == "kubepods.slice" && !parts[1].is_empty() {
                proptest::prop_assert_eq!(w.pod.as_ref().map(|p| p.uid.clone()), Some(uid));
            }
            proptest::prop_assert!(w.short().chars().count() <= MAX_COLUMN_CHARS);
        }

        /// Any directory name: three non-empty parts without `_`, or nothing.
        #[test]
        fn any_pod_log_dir_parses(name in "\\PC{0,80}|[a-z_-]{0,40}") {
            if let Some((ns, pod, uid)) = parse_pod_log_dir(&name) {
                for part in [&ns, &pod, &uid] {
                    proptest::prop_assert!(!part.is_empty() && !part.contains('_'));
                }
                proptest::prop_assert_eq!(format!("{ns}_{pod}_{uid}"), name);
            }
        }
    }
}
