//! `docs/metrics.md` lists every metric both binaries record: a metric added in the code without
//! a row there fails here, and so does a row for a metric the code no longer records.
//!
//! The names come from the sources: every `metrics::counter!`, `gauge!` and `histogram!` call in
//! `relay/src` and `worker/src` whose name is a string literal (all of them are).

use std::collections::BTreeSet;
use std::path::Path;

const DOC: &str = include_str!("../../docs/metrics.md");

/// Every metric name recorded in the `.rs` files under `dir`.
fn recorded(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("source folder").flatten() {
        let path = entry.path();
        if path.is_dir() {
            recorded(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("source");
        for kind in ["metrics::counter!(", "metrics::gauge!(", "metrics::histogram!("] {
            for (at, _) in text.match_indices(kind) {
                let rest = text[at + kind.len()..].trim_start();
                if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                    out.insert(name.to_owned());
                }
            }
        }
    }
}

/// The metric names the doc's tables list (first column).
fn documented() -> BTreeSet<String> {
    DOC.lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_owned))
        .filter(|name| name.starts_with("relay_") || name.starts_with("worker_"))
        .collect()
}

#[test]
fn every_recorded_metric_is_in_the_reference_and_nothing_else_is() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut names = BTreeSet::new();
    recorded(&root.join("relay/src"), &mut names);
    recorded(&root.join("worker/src"), &mut names);
    assert!(names.len() > 50, "the scan found the metrics: {names:?}");
    let listed = documented();
    let missing: Vec<&String> = names.difference(&listed).collect();
    let stale: Vec<&String> = listed.difference(&names).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/metrics.md is out of date.\nRecorded but not listed: {missing:?}\nListed but not recorded: {stale:?}"
    );
}
