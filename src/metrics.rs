//! Counters the components bump as things happen; `/metrics` reads them along with the
//! state it can compute (instances by status, connections by transport).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub opamp_messages_in: AtomicU64,
    pub opamp_messages_out: AtomicU64,
    /// Messages that carried a remote config.
    pub remote_configs_out: AtomicU64,
    pub reconciles: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub git_fetch_errors: AtomicU64,
    pub git_push_errors: AtomicU64,
    pub status_commits: AtomicU64,
    pub forge_posts: AtomicU64,
    pub forge_errors: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub instances_forgotten: AtomicU64,
    /// Messages refused because their token had created too many new instances.
    pub new_instances_refused: AtomicU64,
    /// Batches of instance changes the store refused (each is tried again).
    pub store_write_errors: AtomicU64,
    /// The end of the served certificate's validity (Unix seconds); 0 without TLS.
    pub tls_certificate_not_after: AtomicI64,
}

impl Metrics {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Writes one metric family in the Prometheus text format (version 0.0.4).
pub struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    pub fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Self {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Self { out, name }
    }

    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) -> &mut Self {
        use std::fmt::Write as _;
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (index, (key, label)) in labels.iter().enumerate() {
                if index > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"");
                for c in label.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_escaped_labels() {
        let mut out = String::new();
        Family::new(&mut out, "gitfleet_instances", "gauge", "Instances.")
            .sample(&[("fleet", "a\"b\\c\nd"), ("status", "in_sync")], 3)
            .sample(&[], 0.25);
        assert_eq!(
            out,
            "# HELP gitfleet_instances Instances.\n# TYPE gitfleet_instances gauge\n\
             gitfleet_instances{fleet=\"a\\\"b\\\\c\\nd\",status=\"in_sync\"} 3\ngitfleet_instances 0.25\n"
        );
    }
}
