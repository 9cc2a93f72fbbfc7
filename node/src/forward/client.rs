//! The pooled HTTP clients this node uses to reach its own agents.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::proto::http::Body;

/// A pooled client to agents (plain TCP; one for each HTTP version).
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Body>;

/// Pooled clients to local agents: HTTP/1.1 for most, h2c (prior
/// knowledge) when the caller spoke HTTP/2, which is what gRPC needs.
/// Delegations to HTTP/1.1 agents take the lean client of [`super::h1`];
/// the node's own calls (health checks, cards) take hyper's.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub h1: Client,
    pub h2: Client,
    pub delegations: super::h1::H1Client,
    /// Edge agents over MQTT (set once the bridge starts).
    pub edge: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn super::local::EdgeLink>>>,
}

impl Upstream {
    pub fn new() -> Upstream {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        // Health checks (every 2 s by default) and card fetches: idle
        // connections kept no longer than delegations keep theirs, under
        // the agents' own idle timeouts (a check must not fail because the
        // agent closed the connection as it went out; see `super::h1`).
        let h1 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(super::h1::IDLE_LIMIT)
            .pool_max_idle_per_host(256)
            .build(conn.clone());
        let h2 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        Upstream {
            h1,
            h2,
            delegations: super::h1::H1Client::new(),
            edge: Default::default(),
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream::new()
    }
}
