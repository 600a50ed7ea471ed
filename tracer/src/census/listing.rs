//! The `/sockets` listing: its query, its JSON schema (one typed struct, used by the agent to
//! write it and by `tracer sockets` to read it), and choosing what to list from a census.
//!
//! Owns: filters, ordering (oldest first), the limit, and the age of each socket at the moment
//! of the request (from when it entered its state, so that a report a few seconds old still
//! shows current ages). Does not own: the census or the join.

use std::cmp::Reverse;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::census::join::{Destination, SocketView};
use crate::census::scrape::Report;
use crate::census::stuck::reason;
use crate::stream::event::comm_text;
use crate::stream::event::{parse_state, state_name};
use crate::workload::{cut_tail, Workload, MAX_PATH_CHARS};

/// Default and largest `limit`.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// Largest `/sockets` answer: sockets past it are left out (and `cut_at_bytes` set), so that
/// `limit=10000` always gives an answer that `tracer sockets` reads (it reads up to a MiB
/// more), however long the sockets' cgroup paths are. About 600 bytes a socket on a usual
/// host: 10,000 sockets fit.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// Memory a rendering takes besides its answer, per socket of the census: one (age,
/// reference) pair per matching socket, to sort them.
pub const RENDER_BYTES_PER_SOCKET: usize = std::mem::size_of::<(Option<Duration>, &SocketView)>();

/// The answer of `GET /sockets`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Listing {
    /// Seconds since the census behind this listing began (see `--census-interval`).
    pub census_age_seconds: f64,
    /// When it began, Unix time in seconds (as `tracer_census_timestamp_seconds`).
    pub census_timestamp_seconds: f64,
    /// Sockets that match the filters (more than listed when `limit` cut them).
    pub total: usize,
    pub sockets: Vec<ListedSocket>,
    /// True when sockets that the limit allowed were left out to keep the answer within
    /// [`MAX_BODY_BYTES`].
    #[serde(default)]
    pub cut_at_bytes: bool,
    /// Destinations whose ephemeral ports are fullest, busiest first.
    pub busiest_destinations: Vec<ListedDestination>,
}

/// One socket of the listing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ListedSocket {
    pub state: String,
    /// Time in its state; null when nothing tells it.
    pub age_seconds: Option<f64>,
    /// True when the age is at least this (the agent did not see the socket enter its state).
    pub age_is_lower_bound: bool,
    /// `transition`, `agent_start`, `census`, `synack_timer` or `unknown`.
    pub age_source: String,
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    pub service_port: u16,
    /// The owner (0 and "" when unknown).
    pub pid: u32,
    pub comm: String,
    /// Network namespace inode, as in `/proc/PID/ns/net -> net:[INODE]`.
    pub netns: u64,
    /// Its cgroup and what that is: container, pod, unit.
    #[serde(flatten)]
    pub workload: WorkloadFields,
    pub stuck: bool,
    /// Why being stuck in this state matters; null when not stuck.
    pub reason: Option<String>,
}

/// Which cgroup, container and pod a socket belongs to; null where not known (the same keys
/// as `tracer watch --json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct WorkloadFields {
    /// The kernel's id of the socket's cgroup v2 cgroup (0: not known).
    pub cgroup_id: u64,
    /// Its path in the cgroup v2 hierarchy, as `ss --cgroup` shows it.
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    /// `containerd`, `crio` or `docker`, where the path names the runtime.
    pub container_runtime: Option<String>,
    pub pod_uid: Option<String>,
    /// From the kubelet's pod log directory; null when the node does not keep it.
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort`.
    pub pod_qos: Option<String>,
    /// The systemd unit, for a cgroup that is not a container's.
    pub unit: Option<String>,
}

impl WorkloadFields {
    /// The fields of a socket in cgroup `id`, which is `w` (None: not resolved).
    pub fn new(id: u64, w: Option<&Workload>) -> WorkloadFields {
        let Some(w) = w else {
            return WorkloadFields {
                cgroup_id: id,
                ..Default::default()
            };
        };
        let container = w.container.as_ref();
        let pod = w.pod.as_ref();
        WorkloadFields {
            cgroup_id: id,
            cgroup: Some(cut_tail(&w.path, MAX_PATH_CHARS).into_owned()),
            container_id: container.map(|c| c.id.clone()),
            container_runtime: container
                .map(|c| c.runtime.to_owned())
                .filter(|r| !r.is_empty()),
            pod_uid: pod.map(|p| p.uid.clone()),
            pod_namespace: pod.and_then(|p| p.namespace.clone()),
            pod_name: pod.and_then(|p| p.name.clone()),
            pod_qos: pod.map(|p| p.qos.to_owned()),
            unit: w.unit.clone(),
        }
    }
}

/// A destination of the listing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ListedDestination {
    pub netns: u64,
    pub local_addr: String,
    pub remote_addr: String,
    pub remote_port: u16,
    pub ephemeral_ports_used: u64,
    pub ephemeral_port_range: u64,
    pub utilization: f64,
}

/// The query of `/sockets`.
#[derive(Debug, PartialEq)]
pub struct SocketFilter {
    pub states: Vec<u8>,
    pub port: Option<u16>,
    pub older_than: Option<Duration>,
    /// Only sockets of this pod (its name or UID), of pods in this Kubernetes namespace, of
    /// this container (its id or a prefix of it).
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub container: Option<String>,
    pub limit: usize,
}

impl Default for SocketFilter {
    fn default() -> Self {
        SocketFilter {
            states: Vec::new(),
            port: None,
            older_than: None,
            pod: None,
            namespace: None,
            container: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl SocketFilter {
    /// Reads the query parameters (repeated `state` add up); an error names the bad one.
    pub fn from_query(pairs: &[(String, String)]) -> Result<SocketFilter, String> {
        let mut f = SocketFilter::default();
        for (i, (key, value)) in pairs.iter().enumerate() {
            // A second port, age or limit would silently replace the first: refused. Repeated
            // states add up (state=a&state=b is state=a,b).
            if key != "state" && pairs[..i].iter().any(|(k, _)| k == key) {
                return Err(format!("parameter {key:?} given twice; give it once"));
            }
            match key.as_str() {
                "state" => {
                    for name in value.split(',').filter(|s| !s.is_empty()) {
                        f.states.push(
                            parse_state(name).ok_or_else(|| format!("unknown state {name:?}"))?,
                        );
                    }
                }
                "port" => {
                    f.port = Some(
                        value
                            .parse()
                            .map_err(|_| format!("port {value:?} is not a port number"))?,
                    )
                }
                "older_than" => f.older_than = Some(crate::cli::parse_duration(value)?),
                "limit" => {
                    f.limit = match value.parse() {
                        Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                        _ => {
                            return Err(format!(
                                "limit {value:?} is not a number from 1 to {MAX_LIMIT}"
                            ))
                        }
                    }
                }
                "pod" => f.pod = Some(value.clone()),
                "namespace" => f.namespace = Some(value.clone()),
                "container" if value.is_empty() => return Err("container is empty".into()),
                "container" => f.container = Some(value.clone()),
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}; use state, port, older_than, pod, \
                         namespace, container, limit"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// The listing of `report` at `now_ns` (CLOCK_MONOTONIC): matching sockets oldest first
    /// (unknown ages last), at most `limit`.
    pub fn render(&self, report: &Report, now_ns: u64) -> Listing {
        let (total, matched) = self.select(report, now_ns);
        let sockets = matched
            .into_iter()
            .map(|(age, s)| listed(report, age, s))
            .collect();
        head(report, now_ns, total, sockets)
    }

    /// [`SocketFilter::render`] as JSON, at most `max_bytes` of it: sockets are written one
    /// by one until the next would pass the bound. Memory: the answer (its buffer never grows
    /// past `max_bytes`) and one (age, reference) pair per matching socket.
    pub fn render_json(&self, report: &Report, now_ns: u64, max_bytes: usize) -> Vec<u8> {
        let (total, matched) = self.select(report, now_ns);
        let mut listing = head(report, now_ns, total, Vec::new());
        // The schema's own serialization around an empty `sockets`, which the sockets are
        // written into: the fields before it are numbers, so its first match is the field.
        let framing = |l: &Listing| serde_json::to_vec(l).unwrap_or_default();
        let empty = framing(&listing);
        let at = find(&empty, b"\"sockets\":[]").map_or(empty.len(), |i| i + 11);
        listing.cut_at_bytes = true;
        let room = max_bytes.saturating_sub(framing(&listing).len());
        let mut body = Vec::with_capacity(max_bytes.min(64 << 10));
        body.extend_from_slice(&empty[..at]);
        let mut one = Vec::new();
        let mut written = 0;
        for (i, (age, s)) in matched.into_iter().enumerate() {
            one.clear();
            if i > 0 {
                one.push(b',');
            }
            let _ = serde_json::to_writer(&mut one, &listed(report, age, s));
            if body.len() + one.len() > room {
                break;
            }
            if body.capacity() < body.len() + one.len() {
                // Doubling, but never past the bound: the budget reserved for this answer.
                let want = (body.capacity() * 2).clamp(body.len() + one.len(), max_bytes);
                body.reserve_exact(want - body.len());
            }
            body.extend_from_slice(&one);
            written += 1;
        }
        listing.cut_at_bytes = written < total.min(self.limit);
        let tail = framing(&listing);
        body.reserve_exact(tail.len() - at);
        body.extend_from_slice(&tail[at..]);
        body
    }

    /// How many sockets match, and the oldest `limit` of them, oldest first.
    fn select<'r>(
        &self,
        report: &'r Report,
        now_ns: u64,
    ) -> (usize, Vec<(Option<Duration>, &'r SocketView)>) {
        let mut matched: Vec<(Option<Duration>, &SocketView)> = report
            .joined
            .sockets
            .iter()
            .filter(|s| self.states.is_empty() || self.states.contains(&s.state))
            .filter(|s| {
                self.port
                    .is_none_or(|p| s.local.port() == p || s.remote.port() == p)
            })
            .filter(|s| self.matches_workload(report.workload(s.cgroup)))
            .map(|s| (s.age(now_ns), s))
            .filter(|(age, _)| self.older_than.is_none_or(|d| age.is_some_and(|a| a >= d)))
            .collect();
        let total = matched.len();
        let by_age = |a: &(Option<Duration>, &SocketView)| Reverse(a.0);
        if matched.len() > self.limit {
            matched.select_nth_unstable_by_key(self.limit, by_age);
            matched.truncate(self.limit);
        }
        matched.sort_by_key(by_age);
        (total, matched)
    }
}

/// One socket of the listing, `age` in its state.
fn listed(report: &Report, age: Option<Duration>, s: &SocketView) -> ListedSocket {
    let stuck = age.is_some_and(|a| report.thresholds.is_stuck(s.state, a));
    ListedSocket {
        state: state_name(s.state).to_owned(),
        age_seconds: age.map(|a| a.as_secs_f64()),
        age_is_lower_bound: s.age_source.is_lower_bound(),
        age_source: s.age_source.name().to_owned(),
        local_addr: s.local.ip().to_string(),
        local_port: s.local.port(),
        remote_addr: s.remote.ip().to_string(),
        remote_port: s.remote.port(),
        service_port: s.port,
        pid: s.pid,
        comm: comm_text(&s.comm).into_owned(),
        netns: s.netns,
        workload: WorkloadFields::new(s.cgroup, report.workload(s.cgroup)),
        stuck,
        reason: stuck.then(|| reason(s.state).to_owned()),
    }
}

/// The listing of `report` with these sockets.
fn head(report: &Report, now_ns: u64, total: usize, sockets: Vec<ListedSocket>) -> Listing {
    Listing {
        census_age_seconds: now_ns.saturating_sub(report.taken_ns) as f64 / 1e9,
        census_timestamp_seconds: report
            .taken_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        total,
        sockets,
        cut_at_bytes: false,
        busiest_destinations: report
            .joined
            .figures
            .destinations
            .iter()
            .map(destination)
            .collect(),
    }
}

/// Where `needle` first starts in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl SocketFilter {
    /// True when a socket in `w` passes the pod, namespace and container filters.
    fn matches_workload(&self, w: Option<&Workload>) -> bool {
        let pod = w.and_then(|w| w.pod.as_ref());
        let container = w.and_then(|w| w.container.as_ref());
        self.pod.as_deref().is_none_or(|want| {
            pod.is_some_and(|p| p.uid == want || p.name.as_deref() == Some(want))
        }) && self
            .namespace
            .as_deref()
            .is_none_or(|want| pod.is_some_and(|p| p.namespace.as_deref() == Some(want)))
            && self
                .container
                .as_deref()
                .is_none_or(|want| container.is_some_and(|c| c.id.starts_with(want)))
    }
}

fn destination(d: &Destination) -> ListedDestination {
    ListedDestination {
        netns: d.netns,
        local_addr: d.local_ip.to_string(),
        remote_addr: d.remote.ip().to_string(),
        remote_port: d.remote.port(),
        ephemeral_ports_used: d.used,
        ephemeral_port_range: d.range,
        utilization: d.utilization(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::join::{AgeSource, Joined};
    use tracer_common::state;

    const S: u64 = 1_000_000_000;

    fn view(state: u8, entered_s: Option<u64>, port: u16) -> SocketView {
        SocketView {
            netns: 1,
            state,
            local: format!("127.0.0.1:{port}").parse().unwrap(),
            remote: "127.0.0.1:40000".parse().unwrap(),
            entered_ns: entered_s.map(|s| s * S),
            age_source: AgeSource::Transition,
            pid: 7,
            comm: *b"srv\0\0\0\0\0\0\0\0\0\0\0\0\0",
            cgroup: 0,
            port,
            cookie: 0,
            inode: 0,
        }
    }

    fn report(sockets: Vec<SocketView>) -> Report {
        Report {
            taken_ns: 90 * S,
            // Whole seconds: serde_json reads back other floats to the nearest, not exactly.
            taken_at: std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::ZERO,
            visited: 1,
            unreachable: 0,
            joined: Joined {
                sockets,
                ..Default::default()
            },
            listen_overflows: 0,
            listen_drops: 0,
            segments_sent: 0,
            state_corrected: 0,
            added: 0,
            owner_found: 0,
            thresholds: Default::default(),
            workloads: Default::default(),
            cgroups: Default::default(),
        }
    }

    fn query(q: &[(&str, &str)]) -> Result<SocketFilter, String> {
        let pairs: Vec<(String, String)> = q
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SocketFilter::from_query(&pairs)
    }

    #[test]
    fn oldest_first_ages_at_request_time_and_the_limit_keeps_the_oldest() {
        let r = report(vec![
            view(state::CLOSE_WAIT, Some(50), 1),
            view(state::CLOSE_WAIT, None, 2),
            view(state::CLOSE_WAIT, Some(10), 3),
            view(state::ESTABLISHED, Some(5), 4),
            view(state::CLOSE_WAIT, Some(30), 5),
        ]);
        let f = query(&[("state", "close_wait"), ("limit", "2")]).unwrap();
        let l = f.render(&r, 100 * S);
        assert_eq!(l.total, 4);
        let got: Vec<(u16, Option<f64>, bool)> = l
            .sockets
            .iter()
            .map(|s| (s.local_port, s.age_seconds, s.stuck))
            .collect();
        // 90 s and 70 s in CLOSE_WAIT at the request: both past the 60 s threshold.
        assert_eq!(got, vec![(3, Some(90.0), true), (5, Some(70.0), true)]);
        assert_eq!(l.census_age_seconds, 10.0);
        let all = query(&[]).unwrap().render(&r, 100 * S);
        assert_eq!(
            all.sockets.last().unwrap().age_seconds,
            None,
            "unknown ages last"
        );
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<Listing>(&json).unwrap(), l);
    }

    #[test]
    fn queries_are_checked_and_repeated_states_add_up() {
        let f = query(&[("state", "close_wait"), ("state", "syn_sent,syn_recv")]).unwrap();
        assert_eq!(
            f.states,
            vec![state::CLOSE_WAIT, state::SYN_SENT, state::SYN_RECV]
        );
        assert!(query(&[("limit", "0")]).unwrap_err().contains("limit"));
        assert!(query(&[("limit", "10001")]).is_err());
        assert!(query(&[("state", "bogus")]).unwrap_err().contains("bogus"));
        assert!(query(&[("older", "1s")])
            .unwrap_err()
            .contains("unknown parameter"));
        assert!(query(&[("port", "1"), ("port", "2")])
            .unwrap_err()
            .contains("given twice"));
        assert!(query(&[("limit", "5"), ("state", "listen"), ("limit", "9")]).is_err());
    }

    #[test]
    fn json_answers_stop_at_the_byte_bound_and_say_so() {
        let sockets = (1..=50).map(|i| view(state::CLOSE_WAIT, Some(i), 1000 + i as u16));
        let r = report(sockets.collect());
        let f = query(&[("limit", "40")]).unwrap();
        let whole = f.render(&r, 100 * S);
        let unbounded = f.render_json(&r, 100 * S, MAX_BODY_BYTES);
        assert_eq!(
            unbounded,
            serde_json::to_vec(&whole).unwrap(),
            "the schema's own JSON"
        );
        for max in [300, 2_000, 9_000] {
            let body = f.render_json(&r, 100 * S, max);
            assert!(body.len() <= max, "{} > {max}", body.len());
            let l: Listing = serde_json::from_slice(&body).unwrap();
            assert!(
                l.cut_at_bytes && l.sockets.len() < 40,
                "{max}: {}",
                l.sockets.len()
            );
            assert_eq!(
                (l.total, &l.sockets[..]),
                (50, &whole.sockets[..l.sockets.len()])
            );
        }
        let tiny = f.render_json(&r, 100 * S, 10);
        let l: Listing = serde_json::from_slice(&tiny).unwrap();
        assert!(l.sockets.is_empty() && l.cut_at_bytes);
    }
}
