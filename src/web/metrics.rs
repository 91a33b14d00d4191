//! `GET /metrics`: Prometheus text format. Counters come from `Metrics` and the view;
//! instance gauges are computed from the registry at scrape time.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::instance::Status;
use crate::metrics::{Family, Metrics};
use crate::problem::Severity;
use crate::web::WebState;

pub async fn metrics(State(state): State<WebState>) -> Response {
    let view = state.view.borrow().clone();
    let targets = Arc::clone(&state.targets.borrow());
    let now = crate::time::now_ms();
    let mut summaries = state.registry.summaries(&targets, now);
    // Fleets without instances are shown too, at zero.
    if let Some(desired) = &view.desired {
        for name in desired.fleets.keys() {
            summaries.entry(Arc::from(name.as_str())).or_default();
        }
    }
    let mut summaries: Vec<_> = summaries.into_iter().collect();
    summaries.sort_by(|a, b| a.0.cmp(&b.0));
    let (websocket, http) = state.registry.connected(&targets, now);

    let mut out = String::with_capacity(4096);
    {
        let mut family = Family::new(&mut out, "gitfleet_instances", "gauge", "Instances by fleet and status.");
        for (fleet, summary) in &summaries {
            for status in Status::ALL {
                family.sample(&[("fleet", fleet), ("status", status.as_str())], summary.counts.get(status));
            }
        }
    }
    {
        let mut family =
            Family::new(&mut out, "gitfleet_fleet_drift", "gauge", "Instances served a config other than assigned.");
        for (fleet, summary) in &summaries {
            family.sample(&[("fleet", fleet)], summary.drift);
        }
    }
    {
        use crate::rollout::State as Rollout;
        const STATES: [Rollout; 6] = [
            Rollout::Running,
            Rollout::Held,
            Rollout::Halted,
            Rollout::RolledBack,
            Rollout::Complete,
            Rollout::Reverted,
        ];
        let rollouts: Vec<_> = targets.iter().filter_map(|(fleet, t)| Some((fleet, t.rollout.as_deref()?))).collect();
        let mut family = Family::new(
            &mut out,
            "gitfleet_rollout_state",
            "gauge",
            "1 for the state each fleet's rollout is in (its last one when none runs).",
        );
        for (fleet, rollout) in &rollouts {
            for state in STATES {
                family.sample(&[("fleet", fleet), ("state", state.as_str())], usize::from(rollout.state == state));
            }
        }
        let mut family = Family::new(
            &mut out,
            "gitfleet_rollout_step",
            "gauge",
            "The step each fleet's rollout is at, from 1 (all of them once it completed).",
        );
        for (fleet, rollout) in &rollouts {
            let step = if rollout.state.is_active() { rollout.step + 1 } else { rollout.steps.len() };
            family.sample(&[("fleet", fleet)], step);
        }
        let mut family = Family::new(&mut out, "gitfleet_rollout_steps", "gauge", "The steps of each fleet's rollout.");
        for (fleet, rollout) in &rollouts {
            family.sample(&[("fleet", fleet)], rollout.steps.len());
        }
    }
    // What this replica alone does is labelled with its name; the fleet figures above are
    // the same on every replica (each sees every instance).
    let replica = view.replica.as_str();
    Family::new(
        &mut out,
        "gitfleet_instances_connected",
        "gauge",
        "Instances connected to this replica, by transport.",
    )
    .sample(&[("replica", replica), ("transport", "websocket")], websocket)
    .sample(&[("replica", replica), ("transport", "http")], http);
    Family::new(&mut out, "gitfleet_leader", "gauge", "1 while this replica leads.")
        .sample(&[("replica", replica)], usize::from(view.leading));
    let counter = |out: &mut String, name: &'static str, help: &str, value: u64| {
        Family::new(out, name, "counter", help).sample(&[], value);
    };
    let m = &state.metrics;
    for (name, help, value) in [
        ("gitfleet_opamp_messages_received_total", "OpAMP messages this replica received.", &m.opamp_messages_in),
        ("gitfleet_opamp_messages_sent_total", "OpAMP messages this replica sent.", &m.opamp_messages_out),
        (
            "gitfleet_opamp_remote_configs_sent_total",
            "OpAMP messages this replica sent that carried a remote config.",
            &m.remote_configs_out,
        ),
    ] {
        Family::new(&mut out, name, "counter", help).sample(&[("replica", replica)], Metrics::read(value));
    }
    counter(&mut out, "gitfleet_reconciles_total", "Reconciles of the repository.", view.reconciles);
    counter(
        &mut out,
        "gitfleet_reconcile_errors_total",
        "Reconciles that found errors or could not persist.",
        view.reconcile_errors,
    );
    Family::new(&mut out, "gitfleet_reconcile_duration_seconds", "gauge", "Duration of the last reconcile.")
        .sample(&[], view.reconcile_micros as f64 / 1e6);
    counter(&mut out, "gitfleet_git_fetches_total", "Fetches of the config repository.", view.fetches);
    counter(
        &mut out,
        "gitfleet_git_fetch_errors_total",
        "Fetches of the config repository that failed.",
        view.fetch_errors,
    );
    counter(
        &mut out,
        "gitfleet_git_push_errors_total",
        "Pushes of the status branch that failed.",
        Metrics::read(&m.git_push_errors),
    );
    counter(
        &mut out,
        "gitfleet_store_write_errors_total",
        "Writes of instance changes to the store that failed (each is tried again).",
        Metrics::read(&m.store_write_errors),
    );
    counter(
        &mut out,
        "gitfleet_status_commits_total",
        "Commits made to the status branch.",
        Metrics::read(&m.status_commits),
    );
    counter(
        &mut out,
        "gitfleet_forge_statuses_posted_total",
        "Commit statuses posted to the forge.",
        Metrics::read(&m.forge_posts),
    );
    counter(
        &mut out,
        "gitfleet_forge_errors_total",
        "Commit status posts that failed.",
        Metrics::read(&m.forge_errors),
    );
    counter(
        &mut out,
        "gitfleet_instances_forgotten_total",
        "Instances forgotten after --forget-after without a word.",
        Metrics::read(&m.instances_forgotten),
    );
    counter(
        &mut out,
        "gitfleet_new_instances_refused_total",
        "OpAMP messages refused because their token had created too many new instances.",
        Metrics::read(&m.new_instances_refused),
    );
    let not_after = m.tls_certificate_not_after.load(std::sync::atomic::Ordering::Relaxed);
    if not_after != 0 {
        counter(
            &mut out,
            "gitfleet_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out, on both ports.",
            Metrics::read(&m.tls_handshake_failures),
        );
        Family::new(
            &mut out,
            "gitfleet_tls_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the served TLS certificate expires (Unix seconds).",
        )
        .sample(&[], not_after);
    }
    let problems = view.problems();
    Family::new(&mut out, "gitfleet_problems", "gauge", "Repository and server problems, by severity.")
        .sample(&[("severity", "error")], problems.iter().filter(|p| p.severity == Severity::Error).count())
        .sample(&[("severity", "warning")], problems.iter().filter(|p| p.severity == Severity::Warning).count());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}
