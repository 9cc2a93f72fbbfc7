//! `/v1/policies`: the tenant policies this node enforces. `GET` lists them
//! (or shows one tenant's document), `POST` applies a signed document
//! (`dmsc-node policy apply`): verified, persisted, announced by gossip.

use hyper::{Request, Response, StatusCode};
use serde_json::json as j;

use super::{json, read_body_up_to, Body, ReadScope, Shared};
use crate::security::policies::{Applied, ApplyError};

/// `GET /v1/policies`: one line per tenant (the reader's own only, for a
/// tenant read token).
pub(super) fn list(s: &Shared, scope: &ReadScope) -> Response<Body> {
    let list: Vec<_> = s
        .security
        .policies
        .all()
        .iter()
        .filter(|h| scope.allows(&h.policy.tenant))
        .map(|h| {
            j!({
                "tenant": h.policy.tenant,
                "version": h.policy.version,
                "digest": h.policy.digest,
                "signer": h.signer.to_string(),
                "rules": h.policy.rules,
            })
        })
        .collect();
    json(StatusCode::OK, &j!({ "policies": list }))
}

/// `GET /v1/policies/{tenant}`: the document as signed, and its envelope
/// (403 for a read token of another tenant).
pub(super) fn show(s: &Shared, tenant: &str, scope: &ReadScope) -> Response<Body> {
    if !scope.allows(tenant) {
        return json(
            StatusCode::FORBIDDEN,
            &j!({
                "error": format!("a read token of tenant `{}` cannot read tenant `{tenant}`'s policy", scope.tenant().unwrap_or_default()),
                "code": "tenant_scope",
            }),
        );
    }
    match s.security.policies.held(tenant) {
        Some(h) => json(
            StatusCode::OK,
            &j!({
                "tenant": h.policy.tenant,
                "version": h.policy.version,
                "digest": h.policy.digest,
                "signer": h.signer.to_string(),
                "rules": h.policy.rules,
                "document": String::from_utf8_lossy(&h.doc),
                "signed": serde_json::from_str::<serde_json::Value>(&h.envelope).unwrap_or_default(),
            }),
        ),
        None => json(
            StatusCode::NOT_FOUND,
            &j!({"error": format!("tenant `{tenant}` has no policy on this node")}),
        ),
    }
}

/// `POST /v1/policies`: applies a signed policy.
pub(super) async fn apply(req: Request<hyper::body::Incoming>, s: &Shared) -> Response<Body> {
    // A signed policy of a maximal document is larger than other admin bodies.
    let body = match read_body_up_to(req, dmsc_policy::signed::MAX_ENVELOPE_BYTES).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match s.security.apply_policy(&body, "admin") {
        Ok(Applied::New {
            tenant,
            version,
            digest,
            signer,
            previous,
        }) => {
            crate::control::sync::publish_policy(&s.gossip, &tenant, version, &digest).await;
            json(
                StatusCode::CREATED,
                &j!({"tenant": tenant, "version": version, "digest": digest,
                     "signer": signer, "previous": previous, "new": true}),
            )
        }
        Ok(Applied::Unchanged { tenant, version }) => json(
            StatusCode::OK,
            &j!({"tenant": tenant, "version": version, "new": false}),
        ),
        Err(e) => {
            let status = match &e {
                ApplyError::Policy(dmsc_policy::PolicyError::Invalid(_)) => StatusCode::BAD_REQUEST,
                ApplyError::Policy(_) => StatusCode::FORBIDDEN,
                ApplyError::Older { .. } | ApplyError::Conflict { .. } => StatusCode::CONFLICT,
            };
            json(
                status,
                &j!({"error": e.to_string(), "code": e.code(), "problems": e.problems()}),
            )
        }
    }
}
