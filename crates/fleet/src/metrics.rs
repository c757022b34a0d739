//! Fleet series (names listed in ARCHITECTURE.md's catalog). The worker label's values
//! are the configured workers, so they stay bounded.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct FleetMetrics {
    pub worker_up: IntGaugeVec,
    pub worker_outstanding: IntGaugeVec,
    pub decisions: IntCounterVec,
    pub retries: IntCounterVec,
    pub ejections: IntCounterVec,
    pub failures: IntCounterVec,
}

impl FleetMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<FleetMetrics> {
        let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        Ok(FleetMetrics {
            worker_up: gauge(
                "tokenfab_fleet_worker_up",
                "1 when the worker takes requests, 0 while it is ejected or failing checks.",
                &["worker", "accelerator"],
            )?,
            worker_outstanding: gauge(
                "tokenfab_fleet_worker_outstanding_requests",
                "Requests sent to the worker and not yet finished.",
                &["worker"],
            )?,
            decisions: counter(
                "tokenfab_fleet_route_decisions_total",
                "Routing decisions by policy, chosen worker and reason (policy, session, slo).",
                &["policy", "worker", "reason"],
            )?,
            retries: counter(
                "tokenfab_fleet_retries_total",
                "Requests sent again to another worker before anything reached the client, by why.",
                &["reason"],
            )?,
            ejections: counter(
                "tokenfab_fleet_ejections_total",
                "Times a worker was ejected (consecutive failures or a failed health check).",
                &["worker"],
            )?,
            failures: counter(
                "tokenfab_fleet_worker_failures_total",
                "Requests a worker did not serve, by kind (broken, busy, rejected).",
                &["worker", "kind"],
            )?,
        })
    }

    /// Expose a worker's series from the start (at 0), so dashboards and alerts see
    /// "no ejections yet" rather than no data.
    pub fn init_worker(&self, worker: &str, accelerator: &str, policies: Vec<&str>) {
        self.worker_up
            .with_label_values(&[worker, accelerator])
            .set(1);
        self.worker_outstanding.with_label_values(&[worker]).set(0);
        self.ejections.with_label_values(&[worker]).inc_by(0);
        for kind in ["broken", "busy", "rejected"] {
            self.failures.with_label_values(&[worker, kind]).inc_by(0);
        }
        for reason in ["broken", "busy"] {
            self.retries.with_label_values(&[reason]).inc_by(0);
        }
        for policy in policies {
            self.decisions
                .with_label_values(&[policy, worker, "policy"])
                .inc_by(0);
        }
    }
}
