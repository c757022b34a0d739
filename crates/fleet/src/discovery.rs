//! Where the fleet's workers come from. A [`Discovery`] yields the current worker list;
//! the fleet re-reads it periodically and keeps the members that did not change. Built
//! in: the static config list, with DNS names re-resolved (one worker per address). A
//! Kubernetes EndpointSlice watcher is one more implementation of the same trait.

use crate::spec::WorkerSpec;
use futures::future::BoxFuture;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub trait Discovery: Send + Sync {
    /// The workers now.
    fn workers(&self) -> BoxFuture<'_, Result<Vec<WorkerSpec>, String>>;
}

/// The configured list; each `http://` URL whose host is a DNS name becomes one worker
/// per address it resolves to (named `<name>@<address>`). `https://` URLs (hosted APIs)
/// stay as they are: their certificates name the host, not an address.
pub struct StaticDns {
    pub workers: Vec<WorkerSpec>,
}

impl Discovery for StaticDns {
    fn workers(&self) -> BoxFuture<'_, Result<Vec<WorkerSpec>, String>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for w in &self.workers {
                out.extend(expand(w).await?);
            }
            Ok(out)
        })
    }
}

/// `(host, port, path)` of an `http://` URL whose host is a name, not an address.
fn dns_name(url: &str) -> Option<(&str, u16, &str)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (authority, 80),
    };
    let is_name = host.parse::<IpAddr>().is_err() && !host.starts_with('[') && host != "localhost";
    is_name.then_some((host, port, path))
}

async fn expand(w: &WorkerSpec) -> Result<Vec<WorkerSpec>, String> {
    let Some((host, port, path)) = dns_name(&w.url) else {
        return Ok(vec![w.clone()]);
    };
    let mut addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    let name = w.display_name();
    Ok(addrs
        .into_iter()
        .map(|a| WorkerSpec {
            name: format!("{name}@{a}"),
            url: format!("http://{a}{path}"),
            ..w.clone()
        })
        .collect())
}

/// Re-read `discovery` every `every` and apply it to `fleet` (keep the last good list when
/// a lookup fails).
pub async fn refresh(fleet: Arc<crate::Fleet>, discovery: Arc<dyn Discovery>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match discovery.workers().await {
            Ok(ws) => {
                if let Err(e) = fleet.set_workers(&ws) {
                    tracing::warn!(error = e, "discovery returned an unusable worker list");
                }
            }
            Err(e) => tracing::warn!(error = e, "worker discovery failed; keeping the last list"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_dns_names_are_expanded() {
        assert_eq!(
            dns_name("http://workers.svc:8000/x"),
            Some(("workers.svc", 8000, "/x"))
        );
        assert_eq!(dns_name("http://10.0.0.1:8000"), None);
        assert_eq!(dns_name("http://localhost:8000"), None);
        assert_eq!(dns_name("https://api.example.com"), None);
    }

    #[tokio::test]
    async fn a_name_becomes_one_worker_per_address() {
        let w = WorkerSpec {
            name: "pool".into(),
            url: "http://localhost:9".into(),
            models: vec!["m".into()],
            ..WorkerSpec::default()
        };
        // localhost is kept as is (its addresses are the same host).
        let got = StaticDns { workers: vec![w] }
            .workers()
            .await
            .expect("resolve");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].url, "http://localhost:9");
    }
}
