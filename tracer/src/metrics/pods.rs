//! Who owns a socket, in Kubernetes terms, for the metrics: the `namespace` and `pod` label
//! values, within a budget.
//!
//! Owns: which pods get a label value (the first `--max-pods` distinct pods seen, kept for the
//! agent's life; later ones are `other`), and opening the cgroup resolver from the flags.
//! Does not own: turning a cgroup into a pod (`workload`, `cgroups`).
//!
//! A socket outside any pod (a host process, a systemd service, a plain container) and one
//! whose cgroup is not known have empty values: those labels are absent in Prometheus terms,
//! and nothing is invented. So has a pod that the node does not name (no `/var/log/pods`
//! directory): only the kubelet makes those, so no other process can spend the budget.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cgroups::{cgroup2_root, CgroupPaths};
use crate::cli::AttributionArgs;
use crate::workload::{PodNames, Resolver, Workload};

/// The label value of pods past the budget.
pub const OTHER: &str = "other";

/// Most cgroups whose path is kept (a node's cgroup tree has a few thousand at most).
const CGROUP_CAPACITY: usize = 65_536;

/// The `namespace` and `pod` label values of one socket.
pub type PodLabel = (Arc<str>, Arc<str>);

/// Gives pods label values, at most `budget` of them.
pub struct PodLabels {
    budget: usize,
    given: HashMap<PodLabel, ()>,
    none: PodLabel,
    other: PodLabel,
    /// Pods counted under `other` (past the budget), up to [`CGROUP_CAPACITY`] of them.
    refused: std::collections::HashSet<PodLabel>,
}

impl Default for PodLabels {
    /// The default budget of `--max-pods`.
    fn default() -> Self {
        PodLabels::new(128)
    }
}

impl PodLabels {
    pub fn new(budget: usize) -> PodLabels {
        PodLabels {
            budget,
            given: HashMap::new(),
            none: (Arc::from(""), Arc::from("")),
            other: (Arc::from(OTHER), Arc::from(OTHER)),
            refused: Default::default(),
        }
    }

    /// The label values of a socket in `workload` (None: its cgroup is not known).
    pub fn label(&mut self, workload: Option<&Workload>) -> PodLabel {
        let Some(pod) = workload.and_then(|w| w.pod.as_ref()) else {
            return self.none.clone();
        };
        // Only a pod the node itself names (its /var/log/pods entry, which only the kubelet
        // writes) gets a value: a cgroup alone could be anyone's to make.
        let key: PodLabel = match (&pod.namespace, &pod.name) {
            (Some(ns), Some(name)) => (Arc::from(ns.as_str()), Arc::from(name.as_str())),
            _ => return self.none.clone(),
        };
        if self.given.contains_key(&key) {
            return key;
        }
        if self.given.len() >= self.budget {
            if self.refused.len() < CGROUP_CAPACITY {
                self.refused.insert(key);
            }
            return self.other.clone();
        }
        self.given.insert(key.clone(), ());
        key
    }

    /// Pods with a label value.
    pub fn len(&self) -> usize {
        self.given.len()
    }

    /// Distinct pods counted under `other`.
    pub fn refused(&self) -> usize {
        self.refused.len()
    }

    pub fn is_empty(&self) -> bool {
        self.given.is_empty()
    }
}

/// What the event path needs to label by pod: its own resolver (None: not on this host), the
/// label budget it shares with the census metrics, and the pod of each cgroup it has seen, as
/// a small number (a slot) that label handles are indexed by.
pub struct PodAttribution {
    resolver: Option<Resolver>,
    labels: Arc<parking_lot::Mutex<PodLabels>>,
    /// Label values by slot; slot 0 is no pod (empty values).
    slots: Vec<PodLabel>,
    slot_of_label: HashMap<PodLabel, usize>,
    slot_of_cgroup: HashMap<u64, usize>,
}

impl PodAttribution {
    pub fn new(resolver: Option<Resolver>, labels: Arc<parking_lot::Mutex<PodLabels>>) -> Self {
        let none: PodLabel = (Arc::from(""), Arc::from(""));
        PodAttribution {
            resolver,
            labels,
            slots: vec![none.clone()],
            slot_of_label: HashMap::from([(none, 0)]),
            slot_of_cgroup: HashMap::new(),
        }
    }

    /// The slot of the pod of cgroup `id` (0: no pod, or not known). A cgroup is remembered
    /// once its pod is known by name; one not resolved yet, or a pod whose name the node does
    /// not show yet, is looked up again next time (the resolver limits its own walks).
    pub fn slot(&mut self, id: u64) -> usize {
        if id == 0 {
            return 0;
        }
        if let Some(&slot) = self.slot_of_cgroup.get(&id) {
            return slot;
        }
        let Some(workload) = self.resolver.as_mut().and_then(|r| r.resolve(id)) else {
            return 0;
        };
        let label = self.labels.lock().label(Some(&workload));
        let slot = match self.slot_of_label.get(&label) {
            Some(&slot) => slot,
            None => {
                self.slots.push(label.clone());
                self.slot_of_label.insert(label, self.slots.len() - 1);
                self.slots.len() - 1
            }
        };
        let named = workload.pod.as_ref().is_none_or(|p| p.name.is_some());
        if named {
            if self.slot_of_cgroup.len() >= CGROUP_CAPACITY {
                self.slot_of_cgroup.clear();
            }
            self.slot_of_cgroup.insert(id, slot);
        }
        slot
    }

    /// The `namespace` and `pod` label values of a slot.
    pub fn label(&self, slot: usize) -> &PodLabel {
        &self.slots[slot]
    }
}

/// Checks an explicit `--cgroup-root` before anything is loaded: one that is not a cgroup v2
/// file system is an error (without the flag, a host with none only loses attribution).
pub fn check_flags(args: &AttributionArgs) -> anyhow::Result<()> {
    if let Some(root) = &args.cgroup_root {
        cgroup2_root(Some(root))?;
    }
    Ok(())
}

/// The cgroup resolver the flags ask for, or None (said once, in one line) when this host has
/// no cgroup v2 file system to resolve ids in or the kernel does not report them.
pub fn resolver(args: &AttributionArgs, kernel_reports_cgroups: bool) -> Option<Resolver> {
    if !kernel_reports_cgroups {
        return None;
    }
    match cgroup2_root(args.cgroup_root.as_deref()) {
        Ok(root) => Some(
            Resolver::new(
                CgroupPaths::new(root, CGROUP_CAPACITY),
                PodNames::new(args.pod_logs_dir.clone()),
            )
            .with_kubepods(args.kubepods()),
        ),
        Err(e) => {
            eprintln!("tracer: {e:#}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{parse_path, DEFAULT_KUBEPODS};

    fn pod(ns: &str, name: &str, uid: &str) -> Workload {
        let mut w = parse_path(
            &format!(
                "/kubepods.slice/kubepods-pod{}.slice",
                uid.replace('-', "_")
            ),
            &DEFAULT_KUBEPODS,
        );
        let p = w.pod.as_mut().expect("a pod path");
        (p.namespace, p.name) = (Some(ns.into()), Some(name.into()));
        w
    }

    #[test]
    fn pods_get_values_up_to_the_budget_then_other_and_keep_them() {
        let mut labels = PodLabels::new(2);
        let a = pod("shop", "cart-1", "11111111-2222-3333-4444-555555555555");
        let b = pod("shop", "web-1", "21111111-2222-3333-4444-555555555555");
        let c = pod("db", "pg-0", "31111111-2222-3333-4444-555555555555");
        assert_eq!(&*labels.label(Some(&a)).1, "cart-1");
        assert_eq!(&*labels.label(Some(&b)).0, "shop");
        assert_eq!(&*labels.label(Some(&c)).1, OTHER);
        assert_eq!(&*labels.label(Some(&a)).1, "cart-1", "kept once given");
        assert_eq!(&*labels.label(Some(&c)).0, OTHER);
        assert_eq!((labels.len(), labels.refused()), (2, 1));
    }

    #[test]
    fn no_pod_or_unknown_cgroup_has_empty_values_and_a_nameless_pod_its_uid() {
        let mut labels = PodLabels::new(10);
        assert_eq!(&*labels.label(None).1, "");
        let unit = parse_path("/system.slice/nginx.service", &DEFAULT_KUBEPODS);
        assert_eq!(&*labels.label(Some(&unit)).0, "");
        let uid = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b";
        let nameless = parse_path(
            &format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ),
            &DEFAULT_KUBEPODS,
        );
        // A pod the node does not name (no /var/log/pods entry) spends no label value.
        let (ns, pod) = labels.label(Some(&nameless));
        assert_eq!((&*ns, &*pod), ("", ""));
        assert_eq!((labels.len(), labels.refused()), (0, 0));
    }
}
