//! Who is calling, as a listener's rules and the caller's credentials say:
//! the listener's tenant (unauthenticated local ingress), a bearer JWT, or
//! the client certificate the connection presented (judged at the
//! handshake, and again for revocation and expiry on every request). Every
//! refusal is audited with whatever identity it claimed. Whether that caller
//! may reach its target is the tenant decision in the parent module.

use std::net::SocketAddr;

use dmsc_transport::tls::{AgentIdentity, AgentRefused};
use rustls::pki_types::CertificateDer;

use crate::config::IngressSpec;
use crate::security::{Refusal, Security};

/// Who is calling, as proven at the ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    /// The calling agent, when the credential names one.
    pub agent: Option<String>,
    /// For logs and the audit trail: a SPIFFE ID, `jwt:<iss>#<sub>`, or `ingress:<addr>`.
    pub id: String,
    /// The credential was an `Authorization: Bearer` token (consumed by the
    /// mesh: it is not forwarded to the agent, which could replay it).
    pub bearer: bool,
}

/// What one connection proved, judged once after the handshake.
#[derive(Debug, Default)]
pub struct ConnIdentity {
    pub peer: Option<SocketAddr>,
    /// The client certificate chain, if one was presented.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its serials that a revocation could name (parsed once per connection;
    /// checked on every request).
    pub serials: Vec<String>,
    /// The chain's verdict: the agent it proves, or why it proves nothing.
    pub verdict: Option<Result<AgentIdentity, AgentRefused>>,
    /// An intercepted connection: the mesh name of the address its client
    /// dialled, for requests whose `Host` names no mesh target (a client
    /// that called `http://10.0.0.5:8080/`).
    pub target_host: Option<String>,
}

/// Authenticates the callers of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Authenticator<'a> {
    pub security: &'a Security,
    pub spec: &'a IngressSpec,
    /// `ingress:<addr>`: the listener, in audit entries and as the caller of
    /// an unauthenticated listener.
    pub listener: &'a str,
}

impl Authenticator<'_> {
    fn audit_auth_failure(
        &self,
        method: dmsc_audit::AuthMethod,
        reason: &str,
        conn: &ConnIdentity,
        claimed: Option<String>,
        tenant: Option<String>,
    ) {
        self.security
            .record(self.auth_failure_event(method, reason, conn, claimed, tenant));
    }

    fn auth_failure_event(
        &self,
        method: dmsc_audit::AuthMethod,
        reason: &str,
        conn: &ConnIdentity,
        claimed: Option<String>,
        tenant: Option<String>,
    ) -> dmsc_audit::Event {
        dmsc_audit::Event {
            tenant,
            kind: dmsc_audit::AuthFailure {
                listener: self.listener.to_string(),
                method,
                reason: reason.to_string(),
                peer: conn.peer.map(|p| p.to_string()).unwrap_or_default(),
                claimed,
            }
            .into(),
        }
    }

    /// The agent a connection's client certificate proves *now*: judged at
    /// the handshake, and still unrevoked and unexpired for this request (a
    /// connection may outlive its certificate, or a revocation arrive).
    pub fn cert_caller<'a>(
        &self,
        conn: &'a ConnIdentity,
        none: &str,
    ) -> Result<&'a AgentIdentity, Refusal> {
        let unauthorized = |code: &str, reason: String| {
            Refusal::new(hyper::StatusCode::UNAUTHORIZED, code, reason)
        };
        match &conn.verdict {
            None => Err(unauthorized("no_credentials", none.to_string())),
            // Refused at the handshake because it is revoked: the same code
            // as a revocation seen on an open connection.
            Some(Err(r))
                if r.revoked.is_some()
                    || self.security.revoked.revoked_among(&conn.serials).is_some() =>
            {
                Err(unauthorized("cert_revoked", r.reason.clone()))
            }
            Some(Err(r)) => Err(unauthorized("cert_refused", r.reason.clone())),
            Some(Ok(who)) => {
                if let Some(r) = self.security.revoked.revoked_among(&conn.serials) {
                    Err(unauthorized(
                        "cert_revoked",
                        format!(
                            "certificate `{}` is revoked (serial {}: {})",
                            who.spiffe, r.serial, r.reason
                        ),
                    ))
                } else if std::time::SystemTime::now() > who.not_after {
                    Err(unauthorized(
                        "cert_expired",
                        format!("certificate `{}` has expired", who.spiffe),
                    ))
                } else {
                    Ok(who)
                }
            }
        }
    }

    /// Audits a refused client certificate with whatever identity it claimed.
    pub fn audit_cert_refusal(
        &self,
        method: dmsc_audit::AuthMethod,
        r: &Refusal,
        conn: &ConnIdentity,
    ) {
        self.security
            .record(self.cert_refusal_event(method, r, conn));
    }

    /// The audit entry of a refused client certificate.
    pub fn cert_refusal_event(
        &self,
        method: dmsc_audit::AuthMethod,
        r: &Refusal,
        conn: &ConnIdentity,
    ) -> dmsc_audit::Event {
        let claimed = conn
            .chain
            .first()
            .and_then(|c| dmsc_transport::identity::cert_info(c).ok())
            .map(|i| i.spiffe.to_string());
        // The tenant of a chain that verified (only then is it the tenant's
        // entry: anyone can claim a tenant in a chain of their own).
        let tenant = match &conn.verdict {
            Some(Ok(who)) => Some(who.tenant.clone()),
            Some(Err(r)) => r.revoked.as_ref().map(|who| who.tenant.clone()),
            None => None,
        };
        self.auth_failure_event(method, &r.reason, conn, claimed, tenant)
    }

    /// Who is calling: bearer JWT if one is sent, else the client
    /// certificate, else (unauthenticated listeners) the listener's tenant.
    pub async fn caller(
        &self,
        headers: &hyper::HeaderMap,
        conn: &ConnIdentity,
    ) -> Result<Caller, Refusal> {
        use dmsc_audit::AuthMethod;
        let unauthorized = |code: &str, reason: String| {
            Refusal::new(hyper::StatusCode::UNAUTHORIZED, code, reason)
        };
        if let Some(tenant) = &self.spec.tenant {
            return Ok(Caller {
                tenant: tenant.clone(),
                agent: None,
                id: self.listener.to_string(),
                bearer: false,
            });
        }
        let bearer = headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        if let (Some(token), true) = (bearer, self.spec.jwt) {
            return match self.security.validate_jwt(token.trim()).await {
                Ok(c) => Ok(Caller {
                    id: format!(
                        "jwt:{}#{}",
                        c.issuer,
                        c.subject.as_deref().unwrap_or(&c.agent)
                    ),
                    tenant: c.tenant,
                    agent: Some(c.agent),
                    bearer: true,
                }),
                Err(e) => {
                    self.audit_auth_failure(AuthMethod::Jwt, &e.reason(), conn, None, None);
                    Err(unauthorized(e.code(), e.reason()))
                }
            };
        }
        let how = match (self.spec.mtls, self.spec.jwt) {
            (true, true) => {
                "a client certificate from the mesh CA or an `Authorization: Bearer` token"
            }
            (true, false) => "a client certificate from the mesh CA",
            _ => "an `Authorization: Bearer` token",
        };
        match self.cert_caller(conn, &format!("no credentials: this ingress needs {how}")) {
            Ok(who) => Ok(Caller {
                tenant: who.tenant.clone(),
                agent: Some(who.agent.clone()),
                id: who.spiffe.to_string(),
                bearer: false,
            }),
            Err(r) => {
                let method = if self.spec.mtls {
                    AuthMethod::Mtls
                } else {
                    AuthMethod::Jwt
                };
                self.audit_cert_refusal(method, &r, conn);
                Err(r)
            }
        }
    }
}
