//! Mesh addresses: the host names a caller uses for what it wants,
//! `<agent>.<tenant>.dmsc` (an agent by name), `<tag>.cap.<tenant>.dmsc`
//! (any agent with a skill tag) and `mesh.<tenant>.dmsc` (the router:
//! an agent by intent). Here because both the ingress (which picks) and
//! the agent's node (which delivers a request sent to a router's endpoint)
//! read them.

/// What a host name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostTarget {
    Agent(String),
    Tag(String),
    Intent,
}

/// A host name that names nothing in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a mesh address: mesh addresses are <agent>.<tenant>.dmsc, <tag>.cap.<tenant>.dmsc or mesh.<tenant>.dmsc")]
pub struct NotMeshAddress(pub String);

/// Parses `<agent>.<tenant>.dmsc`, `<tag>.cap.<tenant>.dmsc`, `mesh.<tenant>.dmsc`.
pub fn parse_host(host: &str) -> Result<(String, HostTarget), NotMeshAddress> {
    let trimmed = host.trim_end_matches('.');
    // Hosts arrive lowercase nearly always: no copy then.
    let h: std::borrow::Cow<'_, str> = if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        trimmed.to_ascii_lowercase().into()
    } else {
        trimmed.into()
    };
    let bad = || NotMeshAddress(host.to_string());
    let Some(rest) = h.strip_suffix(".dmsc") else {
        return Err(bad());
    };
    // Host name characters only (a space, a quote or a slash is a bad
    // address, not an agent that happens to be missing).
    if !rest
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(bad());
    }
    let mut labels = rest.split('.');
    match (labels.next(), labels.next(), labels.next(), labels.next()) {
        (Some("mesh"), Some(tenant), None, None) => Ok((tenant.to_string(), HostTarget::Intent)),
        (Some(agent), Some(tenant), None, None) if !agent.is_empty() && !tenant.is_empty() => {
            Ok((tenant.to_string(), HostTarget::Agent(agent.to_string())))
        }
        (Some(tag), Some("cap"), Some(tenant), None) if !tag.is_empty() && !tenant.is_empty() => {
            Ok((tenant.to_string(), HostTarget::Tag(tag.to_string())))
        }
        _ => Err(bad()),
    }
}
