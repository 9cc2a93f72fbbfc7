//! A whole mesh in one process, for the demo, benchmarks and tests: a
//! throwaway CA, N nodes on loopback (real QUIC with mutual TLS, real
//! gossip, every listener on port 0), each with one ingress listener for a
//! tenant, plus a small HTTP client that talks to an ingress the way an
//! agent would (origin form, target in `Host`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use dmsc_transport::pki::{CertificateAuthority, NODE_VALIDITY};
use http_body_util::BodyExt;
use hyper::{Request, Response};

use crate::config::{RawAgent, RawConfig, RawIngress};
use crate::forward::client::Upstream;
use crate::proto::http::{full, Body};
use crate::App;

/// Nodes of a local mesh, started in order, each bootstrapping through the first.
#[derive(Debug)]
pub struct LocalMesh {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
    pub nodes: Vec<App>,
    pub tenant: String,
    client: Upstream,
}

impl LocalMesh {
    /// Starts `names.len()` nodes with an ingress for `tenant` each;
    /// `tweak` may adjust each node's config (index, config) before it starts.
    pub async fn start(
        names: &[&str],
        tenant: &str,
        tweak: impl Fn(usize, &mut RawConfig),
    ) -> anyhow::Result<LocalMesh> {
        let dir = tempfile::Builder::new().prefix("dmsc-mesh-").tempdir()?;
        let ca = CertificateAuthority::generate("mesh.dmsc.local")?;
        ca.save(dir.path())?;
        let mut nodes: Vec<App> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let node_dir = dir.path().join(name);
            ca.issue_node_credentials(name, NODE_VALIDITY, &["localhost".to_string()])?
                .write_dir(&node_dir, &ca.cert_pem)?;
            let mut raw =
                RawConfig::loopback(name, &node_dir, nodes.first().map(|a| a.bound().overlay));
            raw.ingress = vec![RawIngress {
                listen: "127.0.0.1:0".into(),
                tenant: Some(tenant.to_string()),
                ..Default::default()
            }];
            tweak(i, &mut raw);
            nodes.push(App::build(raw.validate()?).await?);
        }
        Ok(LocalMesh {
            dir,
            ca,
            nodes,
            tenant: tenant.to_string(),
            client: Upstream::new(),
        })
    }

    /// The first ingress address of node `i`.
    pub fn ingress(&self, i: usize) -> SocketAddr {
        self.nodes[i].bound().ingress[0]
    }

    /// Where node `i`'s credentials (and data) live.
    pub fn node_dir(&self, i: usize) -> std::path::PathBuf {
        self.dir
            .path()
            .join(self.nodes[i].security().identity().name())
    }

    /// Node `i`'s admin token (for mutating admin calls).
    pub fn admin_token(&self, i: usize) -> String {
        crate::ops::read_admin_token(
            &self.nodes[i]
                .config()
                .data_dir
                .join(crate::security::ADMIN_TOKEN_FILE),
        )
        .unwrap_or_default()
    }

    /// Starts one more node (bootstrapping through the first) and returns its index.
    pub async fn join(
        &mut self,
        name: &str,
        tweak: impl Fn(&mut RawConfig),
    ) -> anyhow::Result<usize> {
        let node_dir = self.dir.path().join(name);
        self.ca
            .issue_node_credentials(name, NODE_VALIDITY, &["localhost".to_string()])?
            .write_dir(&node_dir, &self.ca.cert_pem)?;
        let mut raw = RawConfig::loopback(
            name,
            &node_dir,
            self.nodes.first().map(|a| a.bound().overlay),
        );
        raw.ingress = vec![RawIngress {
            listen: "127.0.0.1:0".into(),
            tenant: Some(self.tenant.clone()),
            ..Default::default()
        }];
        tweak(&mut raw);
        self.nodes.push(App::build(raw.validate()?).await?);
        Ok(self.nodes.len() - 1)
    }

    /// Attaches an agent to node `i` (as `POST /v1/agents` does).
    pub async fn attach(&self, i: usize, url: &str, name: Option<&str>) -> anyhow::Result<String> {
        let spec = RawAgent {
            tenant: self.tenant.clone(),
            url: url.to_string(),
            name: name.map(str::to_string),
            ..Default::default()
        };
        let a = self.nodes[i].agents().add(&spec).await?;
        Ok(a.id.to_string())
    }

    /// True once every node can route to `tenant/agent`.
    pub fn routable_everywhere(&self, agent: &str) -> bool {
        let id = dmsc_registry::AgentId {
            tenant: self.tenant.clone(),
            name: agent.to_string(),
        };
        self.nodes
            .iter()
            .all(|n| n.mesh().read().get(&id).is_some())
    }

    /// Sends a request to node `i`'s ingress for `host` and reads it whole.
    pub async fn call(
        &self,
        i: usize,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<(Response<()>, Bytes)> {
        let resp = self
            .send(i, method, host, path, headers, full(body.into()))
            .await?;
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_bytes();
        Ok((Response::from_parts(parts, ()), bytes))
    }

    /// Sends a request to node `i`'s ingress; the body streams back.
    pub async fn send(
        &self,
        i: usize,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> anyhow::Result<Response<hyper::body::Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.ingress(i)))
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = tokio::time::timeout(
            Duration::from_secs(30),
            self.client.h1.request(req.body(body)?),
        )
        .await??;
        Ok(resp)
    }

    pub async fn stop(self) {
        let mut set = tokio::task::JoinSet::new();
        for app in self.nodes {
            set.spawn(app.stop());
        }
        while set.join_next().await.is_some() {}
    }
}

/// An A2A 0.3 `message/send` request body with one text part.
pub fn message_send(text: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "message/send",
        "params": {"message": {"role": "user", "messageId": "m-1",
            "parts": [{"kind": "text", "text": text}]}}
    })
    .to_string()
}

/// An A2A 1.0 `SendMessage` request body with one text part.
pub fn send_message_v10(text: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0", "id": "r-1", "method": "SendMessage",
        "params": {"message": {"role": "ROLE_USER", "messageId": "m-1",
            "parts": [{"text": text}]}}
    })
    .to_string()
}

/// A TLS client config (TLS 1.3, HTTP/1.1 by ALPN) that trusts the mesh CA
/// in `ca_pem` and, if given, presents `client = (chain PEM, key PEM)`:
/// what an enrolled agent uses to reach an authenticated ingress.
pub fn tls_client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in dmsc_transport::identity::certs_from_pem(ca_pem, std::path::Path::new("ca"))? {
        roots.add(c)?;
    }
    let b = rustls::ClientConfig::builder_with_provider(dmsc_transport::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut cfg = match client {
        None => b.with_no_client_auth(),
        Some((chain, key)) => {
            let chain =
                dmsc_transport::identity::certs_from_pem(chain, std::path::Path::new("chain"))?;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|e| anyhow::anyhow!("client key: {e}"))?;
            b.with_client_auth_cert(chain, key)?
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(cfg))
}

/// An HTTP/1.1 connection over TLS to an ingress (server name `localhost`).
pub async fn tls_connect(
    addr: SocketAddr,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}
