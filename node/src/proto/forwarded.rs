//! What an agent may believe about a request: the headers the node owns.
//!
//! The `dmsc-` header namespace belongs to the mesh. A caller may set the
//! few the node reads (`dmsc-timeout`, `dmsc-intent`, `dmsc-trace-id`);
//! ingress consumes them, and every `dmsc-*` header a caller sends is
//! removed before the request goes on, so an agent never sees a caller's
//! `dmsc-caller` as if the node had vouched for it. The node then states
//! what it verified, once, right before the request reaches the agent (on
//! the agent's home node, from the delegation head that crossed the
//! verified overlay, after stripping the same namespace from the head's
//! header list):
//!
//! - `dmsc-caller`: the authenticated caller (a SPIFFE ID, `jwt:<iss>#<sub>`,
//!   or `ingress:<addr>` for an unauthenticated listener);
//! - `dmsc-caller-tenant`: its tenant;
//! - `dmsc-trace-id`: the trace id the node logs and audits under;
//! - `dmsc-timeout`: what is left of the deadline.
//!
//! Ingress also appends the client's address to `X-Forwarded-For` and
//! refuses a request with more than one `Host` (which host it is for would
//! depend on who reads it).

use std::net::IpAddr;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};

// Names made once, not parsed from text on every request.
/// The verified caller, as the agent sees it.
pub const CALLER: HeaderName = HeaderName::from_static("dmsc-caller");
/// The verified caller's tenant.
pub const CALLER_TENANT: HeaderName = HeaderName::from_static("dmsc-caller-tenant");
/// The trace id of the delegation.
pub const TRACE_ID: HeaderName = HeaderName::from_static("dmsc-trace-id");
/// The remaining deadline.
pub const TIMEOUT: HeaderName = HeaderName::from_static("dmsc-timeout");
/// Between nodes only: the request was sent to a router's endpoint (an
/// intent or capability address, whose interfaces are at `/`), in
/// `<binding> <A2A version>` (`-` for one not known): the agent's node
/// moves it to the agent's own endpoint (`forward::local`) and removes it.
/// Set by the ingress after it removed every `dmsc-*` header the caller
/// sent, so no caller sets it.
pub const ROUTED: HeaderName = HeaderName::from_static("dmsc-routed");
/// The client address chain.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// True for the mesh's own header namespace.
fn is_mesh_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("dmsc-")
}

/// Removes every `dmsc-*` header.
pub fn strip_mesh_headers(headers: &mut HeaderMap) {
    // The common case, no mesh header at all, allocates nothing.
    if !headers.keys().any(is_mesh_header) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_mesh_header(n))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

/// More than one `Host` header.
pub fn duplicate_host(headers: &HeaderMap) -> bool {
    headers.get_all(HOST).iter().nth(1).is_some()
}

/// Appends `client` to `X-Forwarded-For` (several of the caller's own
/// headers are joined into one list first, as RFC 9110 allows).
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let mut list = String::new();
    for v in headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        list.push_str(v);
        list.push_str(", ");
    }
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(list, "{client}");
    if let Ok(v) = HeaderValue::from_str(&list) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// What the node vouches for to the agent.
#[derive(Debug, Clone, Copy)]
pub struct Vouched<'a> {
    pub caller: &'a str,
    pub tenant: &'a str,
    pub trace_id: &'a str,
    pub remaining: Duration,
}

/// Replaces whatever `dmsc-*` headers are present with the node's own.
pub fn vouch(headers: &mut HeaderMap, v: Vouched<'_>) {
    strip_mesh_headers(headers);
    // Room for the four below at once (a map decoded from the wire has no
    // spare room).
    headers.reserve(4);
    let mut set = |name: HeaderName, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    set(CALLER, v.caller);
    set(CALLER_TENANT, v.tenant);
    set(TRACE_ID, v.trace_id);
    set(TIMEOUT, &format!("{}ms", v.remaining.as_millis().max(1)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn the_node_replaces_the_callers_mesh_headers_with_its_own() {
        let mut h = headers(&[
            ("dmsc-caller", "spiffe://forged/agent/admin"),
            ("DMSC-Caller-Tenant", "other"),
            ("dmsc-tenant", "other"),
            ("dmsc-trace-id", "caller-chosen"),
            ("dmsc-timeout", "3600s"),
            ("content-type", "application/json"),
        ]);
        vouch(
            &mut h,
            Vouched {
                caller: "spiffe://mesh/tenant/acme/agent/payer",
                tenant: "acme",
                trace_id: "0af7651916cd43dd8448eb211c80319c",
                remaining: Duration::from_millis(1500),
            },
        );
        assert_eq!(h[CALLER], "spiffe://mesh/tenant/acme/agent/payer");
        assert_eq!(h.get_all(CALLER).iter().count(), 1);
        assert_eq!(h[CALLER_TENANT], "acme");
        assert_eq!(h[TRACE_ID], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(h[TIMEOUT], "1500ms");
        assert!(h.get("dmsc-tenant").is_none());
        assert_eq!(h["content-type"], "application/json");
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.1, 10.0.0.1"),
        ]);
        append_forwarded_for(&mut h, "127.0.0.1".parse().expect("ip"));
        assert_eq!(
            h[X_FORWARDED_FOR],
            "203.0.113.7, 198.51.100.1, 10.0.0.1, 127.0.0.1"
        );
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "::1".parse().expect("ip"));
        assert_eq!(h[X_FORWARDED_FOR], "::1");
    }

    #[test]
    fn two_hosts_are_noticed() {
        assert!(!duplicate_host(&headers(&[("host", "a.acme.dmsc")])));
        assert!(duplicate_host(&headers(&[
            ("host", "a.acme.dmsc"),
            ("host", "b.acme.dmsc")
        ])));
    }
}
