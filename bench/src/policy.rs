//! `dmsc-bench policy`: what a tenant-policy decision costs on the request
//! path, with documents of many rules. The provider has `--rules` exports
//! (one per consumer tenant, plus tag exports), the consumer as many
//! imports; each decision goes through the node's own entry point
//! (the store lookups of both tenants' policies, as the request path does
//! them, and `dmsc_node::policy::outbound`), timed one by one; p50/p99/max reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmsc_node::policy::{outbound, Route};
use dmsc_node::security::policies::PolicyStore;
use dmsc_policy::{Addressed, SignedPolicy};
use dmsc_transport::pki::CertificateAuthority;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

#[derive(clap::Args)]
pub struct PolicyArgs {
    /// Rules in each of the two documents.
    #[arg(long, default_value_t = 1000)]
    rules: usize,
    /// Decisions timed.
    #[arg(long, default_value_t = 1_000_000)]
    decisions: usize,
}

fn provider_doc(rules: usize) -> String {
    let mut d = String::from("tenant = \"acme\"\nversion = 1\n");
    for i in 0..rules {
        d.push_str(&format!(
            "[[export]]\nto = [\"c{i}\"]\nagents = [\"agent-{i}\"]\ntags = [\"tag-{i}\"]\ndata_tags = [\"pii\"]\n"
        ));
    }
    d
}

fn consumer_doc(tenant: &str, rules: usize) -> String {
    let mut d = format!("tenant = \"{tenant}\"\nversion = 1\n");
    for i in 0..rules {
        d.push_str(&format!(
            "[[import]]\nfrom = [\"p{i}\"]\nagents = [\"agent-{i}\"]\n"
        ));
    }
    d.push_str("[[import]]\nfrom = [\"acme\"]\nagents = [\"*\"]\ndata_tags = [\"pii\"]\n");
    d
}

pub fn run(a: PolicyArgs) -> anyhow::Result<()> {
    let ca = CertificateAuthority::generate("bench.test")?;
    let roots = vec![CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())?];
    let dir = tempfile::tempdir()?;
    let keys = Arc::new(dmsc_keys::KeyStore::load(dir.path())?);
    let store = PolicyStore::open(dir.path().join("p"), &roots, |_| false, keys)?;
    // The consumer is the last tenant the provider exports to: its entry
    // is found by hash, not by scanning, whatever the position.
    let consumer = format!("c{}", a.rules.saturating_sub(1));
    for doc in [provider_doc(a.rules), consumer_doc(&consumer, a.rules)] {
        let s = SignedPolicy::sign_operator(&ca, doc.as_bytes())?;
        store
            .apply(s.to_json().as_bytes(), &roots, |_| false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let name = format!("agent-{}", a.rules.saturating_sub(1));
    let tags = vec!["tag-x".to_string()];
    let pii = vec!["pii".to_string()];
    let route = Route {
        caller: "spiffe://bench.test/tenant/c/agent/x",
        caller_tenant: &consumer,
        tenant: "acme",
        target: Addressed::Agent {
            name: &name,
            tags: &tags,
        },
        data_tags: &pii,
        crosses_region: false,
    };
    // What the request path does per decision: both tenants' policies looked
    // up in the store, then the decision.
    let decide = |r: Route<'_>| {
        let (c, p) = (store.get(r.caller_tenant), store.get(r.tenant));
        outbound(c.as_deref(), p.as_deref(), r)
    };
    anyhow::ensure!(
        decide(route).is_ok(),
        "the benchmark's call must be allowed"
    );
    let denied = Route {
        caller_tenant: "nobody",
        ..route
    };
    anyhow::ensure!(decide(denied).is_err(), "and the other refused");
    for (label, r) in [("allowed", route), ("refused", denied)] {
        let mut samples = Vec::with_capacity(a.decisions);
        for _ in 0..a.decisions {
            let t = Instant::now();
            let v = decide(r);
            samples.push(t.elapsed());
            std::hint::black_box(v.is_ok());
        }
        samples.sort_unstable();
        let q = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "policy decision ({label}, {} rules per document): p50 {:.2} µs  p99 {:.2} µs  max {:.1} µs  ({} decisions)",
            a.rules,
            us(q(0.5)),
            us(q(0.99)),
            us(*samples.last().unwrap_or(&Duration::ZERO)),
            a.decisions
        );
    }
    Ok(())
}
