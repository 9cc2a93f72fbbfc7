//! `/v1/intercept`: the bindings of transparent interception, changed while
//! the node runs (what `dmsc-node intercept enable|disable|status` calls).
//! GET lists them with the mechanism in use; POST
//! `{"cgroup"|"uid"|"netns", "tenant", "agent"?, "ports"?}` binds one;
//! DELETE `?cgroup=PATH`, `?uid=N`, `?netns=NAME` or `?all` unbinds.
//! Bindings made here last until they are disabled or the node stops (the
//! config's come back at the next start). A node without `[intercept]`
//! starts interception, with the defaults, at the first POST.

// A refusal is an answer, returned as is (as in `scope`).
#![allow(clippy::result_large_err)]

use hyper::{Request, Response, StatusCode};

use super::{json, read_json, Body, Shared};
use crate::config::{InterceptBinding, InterceptWho, WhoSpec};
use crate::intercept::State;

/// Interception as it runs; `Ok(None)`: not started yet (a node without
/// `[intercept]` before its first `enable`).
fn running(
    state: Option<&State>,
) -> Result<Option<&std::sync::Arc<crate::intercept::Intercept>>, Response<Body>> {
    match state {
        Some(State::On(ic)) => Ok(Some(ic)),
        Some(State::Off(why)) => Err(json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": format!("interception is off on this node: {why}")}),
        )),
        None => Ok(None),
    }
}

fn not_started(what: &str) -> Response<Body> {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"error": format!("{what} is not bound on this node (interception was never enabled here)")}),
    )
}

fn listing(ic: &crate::intercept::Intercept) -> serde_json::Value {
    serde_json::json!({
        "mechanism": ic.mechanism().as_str(),
        "fallback": ic.fallback(),
        "listen": ic.fallback().is_none().then(|| ic.listen.to_string()),
        "bindings": ic.bindings(),
        "competing_tables": ic.competing(),
    })
}

/// `GET /v1/intercept`.
pub(super) fn list(s: &Shared) -> Response<Body> {
    match running(s.intercept.get()) {
        Ok(Some(ic)) => json(StatusCode::OK, &listing(ic)),
        Ok(None) => json(
            StatusCode::OK,
            &serde_json::json!({"mechanism": null, "started": false, "bindings": []}),
        ),
        Err(r) => r,
    }
}

/// `POST /v1/intercept`.
pub(super) async fn enable(req: Request<hyper::body::Incoming>, s: &Shared) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        cgroup: Option<String>,
        uid: Option<u32>,
        netns: Option<String>,
        tenant: String,
        agent: Option<String>,
        #[serde(default)]
        ports: Vec<u16>,
    }
    let ask: Ask = match read_json(
        req,
        r#"{"cgroup": PATH | "uid": N | "netns": NAME, "tenant", "agent"?, "ports"?}"#,
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return r,
    };
    let who = WhoSpec {
        cgroup: ask.cgroup.as_deref(),
        uid: ask.uid,
        netns: ask.netns.as_deref(),
    };
    let spec = match InterceptBinding::parse(who, &ask.tenant, ask.agent.as_deref())
        .and_then(|b| b.with_ports(&ask.ports))
    {
        Ok(b) => b,
        Err(e) => return json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": e})),
    };
    // A node without `[intercept]` starts it now, with the defaults.
    let ic = match running(Some(s.intercept.ensure().await)) {
        Ok(Some(ic)) => ic.clone(),
        Ok(None) => return not_started("interception"),
        Err(r) => return r,
    };
    match ic.enable(spec).await {
        Ok(b) => json(StatusCode::OK, &serde_json::json!({"bound": b})),
        Err(e) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &serde_json::json!({"error": e}),
        ),
    }
}

/// `DELETE /v1/intercept?cgroup=PATH|uid=N|all`.
pub(super) async fn disable(req: &Request<hyper::body::Incoming>, s: &Shared) -> Response<Body> {
    let ic = match running(s.intercept.get()) {
        Ok(Some(ic)) => ic.clone(),
        Ok(None) if req.uri().query() == Some("all") => {
            return json(StatusCode::OK, &serde_json::json!({"removed": []}))
        }
        Ok(None) => return not_started(req.uri().query().unwrap_or("that")),
        Err(r) => return r,
    };
    let query = req.uri().query().unwrap_or_default();
    let mut which: Vec<InterceptWho> = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = super::audit::decode(v);
        let who = match k {
            "all" => {
                which.extend(ic.bindings().into_iter().filter_map(|b| parse_who(&b.who)));
                continue;
            }
            "cgroup" => WhoSpec {
                cgroup: Some(&v),
                ..Default::default()
            }
            .parse(),
            "netns" => WhoSpec {
                netns: Some(&v),
                ..Default::default()
            }
            .parse(),
            "uid" => v
                .parse::<u32>()
                .map(InterceptWho::Uid)
                .map_err(|_| format!("uid {v:?} is not a number")),
            other => Err(format!(
                "unknown parameter {other:?}: use cgroup=PATH, uid=N, netns=NAME or all"
            )),
        };
        match who {
            Ok(w) => which.push(w),
            Err(e) => return json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": e})),
        }
    }
    if which.is_empty() && !query.split('&').any(|k| k == "all") {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "say which binding: ?cgroup=PATH, ?uid=N or ?all"}),
        );
    }
    let mut removed = Vec::new();
    for w in which {
        match ic.disable(&w).await {
            Ok(true) => removed.push(w.to_string()),
            Ok(false) => {
                return json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": format!("{w} is not bound on this node"), "removed": removed}),
                )
            }
            Err(e) => {
                return json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": e, "removed": removed}),
                )
            }
        }
    }
    json(StatusCode::OK, &serde_json::json!({"removed": removed}))
}

/// A binding's `who` as listed (`cgroup /a`, `uid 5`) back to its key.
fn parse_who(s: &str) -> Option<InterceptWho> {
    match s.split_once(' ')? {
        ("cgroup", c) => Some(InterceptWho::Cgroup(c.to_string())),
        ("uid", u) => u.parse().ok().map(InterceptWho::Uid),
        ("netns", n) => Some(InterceptWho::Netns(n.to_string())),
        _ => None,
    }
}
