//! `GET /v1/audit?tenant=T&since=..&limit=..`: the most recent entries of
//! this node's audit log through the admin API, so a tenant's operators can
//! read their tenant's trail with a read token and no shell on the host.
//!
//! The log is read from its file (the writer owns the file; readers only
//! ever read whole, newline-terminated lines), newest `limit` entries kept in
//! a ring, on a blocking thread. A tenant read token sees its tenant's
//! entries only, and asking for another tenant is a 403, not an empty list.
//! `since` is an RFC 3339 time or a duration back from now (`90s`, `30m`,
//! `24h`, `7d`); the same parser serves `dmsc-node audit report --since`.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::{Request, Response, StatusCode};

use super::scope::{read_scope, ReadScope};
use super::{json, Body, Shared};

/// Entries returned when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// The most entries one call returns.
pub const MAX_LIMIT: usize = 10_000;

/// `90s`, `30m`, `24h`, `7d`, `2w` (one number, one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` has no unit: write e.g. 90s, 30m, 24h or 7d"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` does not start with a whole number"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => return Err(format!("`{s}`: unit `{other}` is not one of s, m, h, d, w")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{s}` is too long"))
}

/// A `since` bound as unix milliseconds: an RFC 3339 time, or a duration
/// (see [`parse_duration`]) back from `now`.
pub fn parse_since(s: &str, now: SystemTime) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        let ms = t.unix_timestamp_nanos() / 1_000_000;
        return u64::try_from(ms).map_err(|_| format!("`{s}` is before 1970"));
    }
    let back = parse_duration(s)
        .map_err(|e| format!("{e} (or give an RFC 3339 time such as 2026-12-04T10:00:00Z)"))?;
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    Ok(now_ms.saturating_sub(back.as_millis() as u64))
}

/// Minimal `%XX` and `+` decoding for query values.
pub(crate) fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What `GET /v1/audit` was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    pub tenant: Option<String>,
    /// Unix milliseconds.
    pub since_ms: Option<u64>,
    pub limit: usize,
}

impl AuditQuery {
    /// Parses the query string; every problem at once.
    pub fn parse(query: Option<&str>, now: SystemTime) -> Result<AuditQuery, Vec<String>> {
        let mut q = AuditQuery {
            tenant: None,
            since_ms: None,
            limit: DEFAULT_LIMIT,
        };
        let mut errors = Vec::new();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v);
            match k {
                "tenant" => q.tenant = Some(v),
                "since" => match parse_since(&v, now) {
                    Ok(ms) => q.since_ms = Some(ms),
                    Err(e) => errors.push(format!("since: {e}")),
                },
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_LIMIT).contains(&n) => q.limit = n,
                    _ => errors.push(format!("limit `{v}` must be 1 to {MAX_LIMIT}")),
                },
                other => errors.push(format!(
                    "unknown parameter `{other}`: use tenant, since, limit"
                )),
            }
        }
        if errors.is_empty() {
            Ok(q)
        } else {
            Err(errors)
        }
    }
}

/// The newest `q.limit` entries of the log at `dir` matching `q`, oldest
/// first; and whether older matching entries were left out.
pub fn recent(
    dir: &Path,
    q: &AuditQuery,
) -> Result<(Vec<dmsc_audit::Line>, bool), dmsc_audit::AuditError> {
    let mut ring = VecDeque::with_capacity(q.limit.min(1024));
    let mut dropped = false;
    for line in dmsc_audit::tail(dir, q.tenant.as_deref())? {
        let line = line?;
        if q.since_ms.is_some_and(|s| line.ts < s) {
            continue;
        }
        if ring.len() == q.limit {
            ring.pop_front();
            dropped = true;
        }
        ring.push_back(line);
    }
    Ok((ring.into(), dropped))
}

/// `GET /v1/audit`.
pub(crate) async fn audit_route<B>(req: &Request<B>, s: &Shared) -> Response<Body> {
    let scope = match read_scope(req, s) {
        Ok(scope) => scope,
        Err(r) => return r,
    };
    let mut q = match AuditQuery::parse(req.uri().query(), SystemTime::now()) {
        Ok(q) => q,
        Err(errors) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": errors.join("; ")}),
            )
        }
    };
    if let ReadScope::Tenant(mine) = &scope {
        match &q.tenant {
            Some(asked) if asked != mine => {
                return json(
                    StatusCode::FORBIDDEN,
                    &serde_json::json!({
                        "error": format!("a read token of tenant `{mine}` cannot read tenant `{asked}`'s audit entries"),
                        "code": "tenant_scope",
                    }),
                )
            }
            _ => q.tenant = Some(mine.clone()),
        }
    }
    let Some(audit) = &s.config.audit else {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "this node keeps no audit log ([audit] enabled = false)"}),
        );
    };
    let dir = audit.dir.clone();
    let query = q.clone();
    let security = s.security.clone();
    // Sealed tenant fields are opened with this node's tenant keys (those
    // whose keys were destroyed say so, `unreadable`).
    let read = tokio::task::spawn_blocking(move || {
        recent(&dir, &query).map(|(mut entries, truncated)| {
            for l in &mut entries {
                security.open_audit_line(l);
            }
            (entries, truncated)
        })
    })
    .await;
    match read {
        Ok(Ok((entries, truncated))) => json(
            StatusCode::OK,
            &serde_json::json!({
                "tenant": q.tenant,
                "since_ms": q.since_ms,
                "limit": q.limit,
                "truncated": truncated,
                "entries": entries,
            }),
        ),
        Ok(Err(e)) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": e.to_string()}),
        ),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": format!("audit read task failed: {e}")}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_parse_and_bad_ones_say_why() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("24")
            .expect_err("no unit")
            .contains("no unit"));
        assert!(parse_duration("3y")
            .expect_err("bad unit")
            .contains("unit `y`"));
        assert!(parse_duration("h").is_err());
        let now = UNIX_EPOCH + Duration::from_secs(100_000);
        assert_eq!(parse_since("1h", now), Ok((100_000 - 3600) * 1000));
        assert_eq!(
            parse_since("1970-01-01T00:01:00Z", now),
            Ok(60_000),
            "RFC 3339"
        );
        assert!(parse_since("yesterday", now)
            .expect_err("not a time")
            .contains("RFC 3339"));
    }

    #[test]
    fn queries_parse_with_every_problem_reported() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let q = AuditQuery::parse(
            Some("tenant=acme&since=1970-01-01T00%3A00%3A10Z&limit=5"),
            now,
        )
        .expect("query");
        assert_eq!(
            q,
            AuditQuery {
                tenant: Some("acme".into()),
                since_ms: Some(10_000),
                limit: 5
            }
        );
        assert_eq!(
            AuditQuery::parse(None, now).expect("empty").limit,
            DEFAULT_LIMIT
        );
        let e = AuditQuery::parse(Some("since=soon&limit=0&x=1"), now).expect_err("bad");
        assert_eq!(e.len(), 3, "{e:?}");
    }
}
