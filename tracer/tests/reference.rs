//! The metric tables of the guide's metrics reference (`docs/metrics.md`) are the reference of
//! what `/metrics` exports: every `tracer_` metric family a fresh agent serves is there with
//! the same label names, and every one there is served, so that the reference cannot drift
//! from the code.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;

/// Label names by metric family, as the reference's tables name them: each table row whose first
/// cell names metrics (`` `tracer_x{a,b="v"}` ``, several per cell).
fn documented(readme: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for line in readme.lines().filter(|l| l.starts_with("| `tracer_")) {
        let cell = line[1..].split(" | ").next().unwrap_or("");
        for code in cell.split('`').skip(1).step_by(2) {
            let Some(code) = code.strip_prefix("tracer_").map(|_| code) else {
                continue;
            };
            let (name, labels) = match code.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (code, ""),
            };
            let labels: BTreeSet<String> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| l.split('=').next().unwrap().trim().to_owned())
                .collect();
            out.insert(name.to_owned(), labels);
        }
    }
    out
}

/// Label names by metric family of the `tracer_` families in an exposition (histograms by
/// their family name, without `le`).
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let histograms: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("tracer_")) {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| histograms.contains(f)))
            .unwrap_or(name);
        let entry = out.entry(family.to_owned()).or_default();
        for label in labels.split("\",").filter(|l| !l.is_empty()) {
            let key = label.split('=').next().unwrap();
            if key != "le" {
                entry.insert(key.to_owned());
            }
        }
    }
    out
}

#[test]
fn every_exported_metric_is_in_the_readme_with_its_labels_and_no_other() {
    let test = "every_exported_metric_is_in_the_readme_with_its_labels_and_no_other";
    if !require_root(test)
        || host_only(
            test,
            "the agent's metric families, which do not depend on the kernel",
        )
    {
        return;
    }
    // With an OTLP endpoint (nothing listens on the discard port), so that the export's
    // metrics are served too.
    let agent = Agent::start(&["--otlp-endpoint", "http://127.0.0.1:9"]);
    settle();
    let served = exported(&agent.metrics_now());
    let readme = documented(include_str!("../../docs/metrics.md"));
    eprintln!(
        "{} metric families served, {} in the tables of docs/metrics.md",
        served.len(),
        readme.len()
    );
    // Not an empty comparison: the agent serves some fifty families.
    assert!(served.len() >= 40, "{served:?}");
    let missing: Vec<String> = served
        .keys()
        .filter(|k| !readme.contains_key(*k))
        .cloned()
        .collect();
    let unserved: Vec<String> = readme
        .keys()
        .filter(|k| !served.contains_key(*k))
        .cloned()
        .collect();
    let differing: Vec<String> = served
        .iter()
        .filter_map(|(k, labels)| {
            let doc = readme.get(k)?;
            (doc != labels).then(|| format!("{k}: served {labels:?}, docs/metrics.md {doc:?}"))
        })
        .collect();
    assert!(
        missing.is_empty() && unserved.is_empty() && differing.is_empty(),
        "served but not in the tables of docs/metrics.md: {missing:?}\nin docs/metrics.md but \
         not served: {unserved:?}\nlabels differ:\n{}",
        differing.join("\n")
    );
}
