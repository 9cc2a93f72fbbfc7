//! OAuth 2.0 bearer JWT validation against a JWKS.
//!
//! [`JwtPolicy`] is the whole decision as a pure function of (token, key set,
//! time); [`JwtValidator`] adds the live key set and its refresh. The checks
//! run in a fixed order so that the reason a caller gets is the first thing
//! wrong, and the cheap structural checks come before any cryptography:
//!
//! 1. length and shape (three base64url parts, JSON header and payload);
//! 2. `alg`: `none` (any spelling) and HMAC are refused by our own header
//!    parser before a key is ever touched, then the configured list;
//! 3. `kid` lookup (the validator refreshes the JWKS once on a miss);
//! 4. the key's type (and its JWK `alg`) must fit the header `alg`;
//! 5. the signature (ring, through `jsonwebtoken::crypto::verify`);
//! 6. `exp`, `nbf`, `iss`, `aud`, then the tenant and agent claims.
//!
//! We call `jsonwebtoken`'s signature primitive rather than its `decode`
//! because `decode` reports "invalid algorithm" for `none`, checks claims in
//! its own order with reasons that name no value, and would parse the header
//! a second time.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::error::AuthError;
use crate::jwks::{AbortGuard, Jwks, JwksSource, JwksStatus, KeyCache, ON_DEMAND_MIN_INTERVAL};

/// Longest token accepted, in bytes; real ones are well under 4 KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Configuration of bearer JWT validation.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Accepted `iss` values (at least one).
    pub issuers: Vec<String>,
    /// Accepted `aud` values (at least one); a token matches if any of its audiences is here.
    pub audiences: Vec<String>,
    /// Where the verification keys come from.
    pub jwks: JwksSource,
    /// How often the JWKS is re-read (default 300 s).
    pub refresh: Duration,
    /// Claim holding the tenant name (default `tenant`); a dotted path
    /// (`ext.tenant`) reaches into nested objects.
    pub tenant_claim: String,
    /// Claim holding the agent name (default `sub`); dotted paths as above.
    pub agent_claim: String,
    /// Clock skew tolerated on `exp` and `nbf` (default 30 s).
    pub leeway: Duration,
    /// Accepted signature algorithms (default RS256, ES256, EdDSA). HMAC
    /// algorithms are refused: a JWKS holds public keys.
    pub algorithms: Vec<Algorithm>,
}

impl JwtConfig {
    /// Default refresh period of the JWKS.
    pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
    /// Default clock skew tolerance.
    pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
    /// Largest leeway accepted.
    pub const MAX_LEEWAY: Duration = Duration::from_secs(600);

    /// A configuration with the defaults for everything but issuers, audiences and keys.
    pub fn new(issuers: Vec<String>, audiences: Vec<String>, jwks: JwksSource) -> Self {
        JwtConfig {
            issuers,
            audiences,
            jwks,
            refresh: Self::DEFAULT_REFRESH,
            tenant_claim: "tenant".to_owned(),
            agent_claim: "sub".to_owned(),
            leeway: Self::DEFAULT_LEEWAY,
            algorithms: vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
        }
    }
}

/// The protected header of a JWT, as far as this crate reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtHeader {
    pub alg: String,
    pub kid: Option<String>,
    pub typ: Option<String>,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtCaller {
    /// From the tenant claim; a valid name.
    pub tenant: String,
    /// From the agent claim; a valid name.
    pub agent: String,
    /// The `sub` claim, when present (for the audit log).
    pub subject: Option<String>,
    /// The `iss` claim (one of the configured issuers).
    pub issuer: String,
    /// The `exp` claim.
    pub expires_at: OffsetDateTime,
    /// `kid` of the key that verified the token (none when the JWKS's only key has none).
    pub key_id: Option<String>,
}

/// Bounded, printable copy of an untrusted string for an error message:
/// header values are not authenticated yet and end up in logs.
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s
        .chars()
        .take(MAX)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    out
}

#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    kid: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    typ: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

/// A token split and decoded, nothing verified yet.
struct Parsed<'t> {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    crit: bool,
    /// `header.payload`, the signed bytes.
    signing_input: &'t str,
    signature: &'t str,
    payload: Vec<u8>,
}

fn malformed(why: impl Into<String>) -> AuthError {
    AuthError::Malformed(why.into())
}

fn is_b64url(s: &str) -> bool {
    s.bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

fn split(token: &str) -> Result<Parsed<'_>, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed(format!(
            "{} bytes, more than {MAX_TOKEN_LEN}",
            token.len()
        )));
    }
    let mut parts = token.splitn(4, '.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("expected three dot-separated parts"));
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| malformed("header is not base64url"))?;
    let raw: RawHeader<'_> = serde_json::from_slice(&header_bytes)
        .map_err(|e| malformed(format!("header is not a JSON object: {e}")))?;
    let alg = raw
        .alg
        .ok_or_else(|| malformed("header has no `alg`"))?
        .into_owned();
    let payload = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|_| malformed("payload is not base64url"))?;
    // Decoded by the signature check; here only its alphabet.
    if !is_b64url(s) {
        return Err(malformed("signature is not base64url"));
    }
    Ok(Parsed {
        alg,
        kid: raw.kid.map(|k| k.into_owned()),
        typ: raw.typ.map(|t| t.into_owned()),
        crit: raw.crit.is_some(),
        signing_input: &token[..h.len() + 1 + p.len()],
        signature: s,
        payload,
    })
}

/// Parses the header of a compact JWS without verifying anything.
///
/// Refuses what [`JwtPolicy::verify`] refuses as malformed (length over
/// [`MAX_TOKEN_LEN`], not three base64url parts, header not a JSON object
/// with an `alg`); it does not judge the algorithm.
pub fn parse_header(token: &str) -> Result<JwtHeader, AuthError> {
    let p = split(token)?;
    Ok(JwtHeader {
        alg: p.alg,
        kid: p.kid,
        typ: p.typ,
    })
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// A claim name, possibly a dotted path into nested objects.
#[derive(Debug, Clone)]
struct ClaimPath {
    name: String,
    parts: Vec<String>,
}

impl ClaimPath {
    fn new(name: &str) -> Self {
        ClaimPath {
            name: name.to_owned(),
            parts: name.split('.').map(str::to_owned).collect(),
        }
    }

    /// The literal name first (URL-style claim names contain dots), then the path.
    fn lookup<'c>(&self, claims: &'c Map<String, Value>) -> Option<&'c Value> {
        if let Some(v) = claims.get(&self.name) {
            return Some(v);
        }
        if self.parts.len() < 2 {
            return None;
        }
        let (first, rest) = self.parts.split_first()?;
        let mut v = claims.get(first)?;
        for part in rest {
            v = v.as_object()?.get(part)?;
        }
        Some(v)
    }
}

/// The validation rules of a [`JwtConfig`], checked and ready: a pure
/// function of (token, key set, time).
#[derive(Debug, Clone)]
pub struct JwtPolicy {
    issuers: Vec<String>,
    audiences: Vec<String>,
    audiences_shown: String,
    tenant: ClaimPath,
    agent: ClaimPath,
    leeway: i64,
    algorithms: Vec<Algorithm>,
}

impl JwtPolicy {
    /// Checks a configuration; every problem is reported at once.
    pub fn new(cfg: &JwtConfig) -> Result<Self, AuthError> {
        let mut problems = Vec::new();
        if cfg.issuers.is_empty() || cfg.issuers.iter().any(|i| i.is_empty()) {
            problems.push("`issuers` needs at least one non-empty issuer".to_owned());
        }
        if cfg.audiences.is_empty() || cfg.audiences.iter().any(|a| a.is_empty()) {
            problems.push("`audiences` needs at least one non-empty audience".to_owned());
        }
        if cfg.algorithms.is_empty() {
            problems.push("`algorithms` is empty".to_owned());
        }
        for alg in cfg.algorithms.iter().filter(|a| is_hmac(**a)) {
            problems.push(format!(
                "algorithm {alg:?} is symmetric and cannot be verified with a JWKS public key"
            ));
        }
        for (field, name) in [
            ("tenant_claim", &cfg.tenant_claim),
            ("agent_claim", &cfg.agent_claim),
        ] {
            if name.is_empty() || name.split('.').any(str::is_empty) {
                problems.push(format!(
                    "`{field}` `{name}` is not a claim name or dotted path"
                ));
            }
        }
        if cfg.leeway > JwtConfig::MAX_LEEWAY {
            problems.push(format!(
                "`leeway` of {} s is more than the {} s allowed",
                cfg.leeway.as_secs(),
                JwtConfig::MAX_LEEWAY.as_secs()
            ));
        }
        if cfg.refresh.is_zero() {
            problems.push("`refresh` must be more than zero".to_owned());
        }
        match &cfg.jwks {
            JwksSource::File(p) if p.as_os_str().is_empty() => {
                problems.push("`jwks` file path is empty".to_owned())
            }
            JwksSource::Url(u) => {
                if let Err(e) = crate::jwks::parse_url(u) {
                    problems.push(format!("`jwks` URL `{u}`: {e}"));
                }
            }
            JwksSource::File(_) => {}
        }
        if !problems.is_empty() {
            return Err(AuthError::Config(problems));
        }
        let mut algorithms = cfg.algorithms.clone();
        algorithms.dedup();
        Ok(JwtPolicy {
            issuers: cfg.issuers.clone(),
            audiences: cfg.audiences.clone(),
            audiences_shown: cfg.audiences.join("`, `"),
            tenant: ClaimPath::new(&cfg.tenant_claim),
            agent: ClaimPath::new(&cfg.agent_claim),
            // Bounded by MAX_LEEWAY above.
            leeway: i64::try_from(cfg.leeway.as_secs()).unwrap_or(i64::MAX),
            algorithms,
        })
    }

    /// Validates `token` against `jwks` at time `now`.
    pub fn verify(
        &self,
        jwks: &Jwks,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<JwtCaller, AuthError> {
        let parsed = split(token)?;
        let claims: Map<String, Value> = serde_json::from_slice(&parsed.payload)
            .map_err(|e| malformed(format!("payload is not a JSON object: {e}")))?;

        if parsed.alg.eq_ignore_ascii_case("none") {
            return Err(AuthError::AlgNone);
        }
        let alg = match parsed.alg.parse::<Algorithm>() {
            Ok(alg) if !is_hmac(alg) && self.algorithms.contains(&alg) => alg,
            _ => return Err(AuthError::AlgNotAccepted(shown(&parsed.alg))),
        };
        if parsed.crit {
            return Err(AuthError::CritUnsupported);
        }

        let key = jwks.find(parsed.kid.as_deref())?;
        let kid_shown = || shown(key.kid.as_deref().unwrap_or("(none)"));
        if !key.kind.accepts(alg) || key.alg.is_some_and(|a| a != alg) {
            return Err(AuthError::KeyMismatch {
                kid: kid_shown(),
                key_kind: key.kind.describe(),
                alg: parsed.alg,
            });
        }
        // `kind.accepts` above guarantees the key family fits `alg`, which
        // jsonwebtoken's verify assumes (it panics on an RSA-components key
        // given an EC algorithm).
        let ok = jsonwebtoken::crypto::verify(
            parsed.signature,
            parsed.signing_input.as_bytes(),
            &key.key,
            alg,
        )
        .unwrap_or(false);
        if !ok {
            return Err(AuthError::BadSignature { kid: kid_shown() });
        }

        let now_ts = now.unix_timestamp();
        let exp = numeric_date(&claims, "exp")?.ok_or_else(|| missing("exp"))?;
        if now_ts >= exp.saturating_add(self.leeway) {
            return Err(AuthError::Expired { at: to_time(exp) });
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")? {
            if nbf.saturating_sub(self.leeway) > now_ts {
                return Err(AuthError::NotYetValid { at: to_time(nbf) });
            }
        }
        let issuer = match claims.get("iss") {
            None => return Err(missing("iss")),
            Some(Value::String(iss)) if self.issuers.iter().any(|i| i == iss) => iss.clone(),
            Some(Value::String(iss)) => return Err(AuthError::IssuerNotAccepted(shown(iss))),
            Some(_) => return Err(invalid("iss", "is not a string")),
        };
        self.check_audience(claims.get("aud"))?;
        let tenant = self.name_claim(&claims, &self.tenant)?;
        let agent = self.name_claim(&claims, &self.agent)?;
        let subject = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
        let expires_at = OffsetDateTime::from_unix_timestamp(exp)
            .map_err(|_| invalid("exp", "is out of range"))?;
        Ok(JwtCaller {
            tenant,
            agent,
            subject,
            issuer,
            expires_at,
            key_id: key.kid.clone(),
        })
    }

    fn check_audience(&self, aud: Option<&Value>) -> Result<(), AuthError> {
        let accepted = |a: &str| self.audiences.iter().any(|x| x == a);
        let got = match aud {
            None => return Err(missing("aud")),
            Some(Value::String(a)) if accepted(a) => return Ok(()),
            Some(Value::String(a)) => a.clone(),
            Some(Value::Array(list)) => {
                let mut names = Vec::with_capacity(list.len());
                for v in list {
                    let a = v
                        .as_str()
                        .ok_or_else(|| invalid("aud", "is not a string or array of strings"))?;
                    if accepted(a) {
                        return Ok(());
                    }
                    names.push(a);
                }
                names.join("`, `")
            }
            Some(_) => return Err(invalid("aud", "is not a string or array of strings")),
        };
        Err(AuthError::AudienceNotAccepted {
            got: shown(&got),
            expected: self.audiences_shown.clone(),
        })
    }

    fn name_claim(
        &self,
        claims: &Map<String, Value>,
        path: &ClaimPath,
    ) -> Result<String, AuthError> {
        match path.lookup(claims) {
            None | Some(Value::Null) => Err(missing(&path.name)),
            Some(Value::String(s)) if crate::is_valid_name(s) => Ok(s.clone()),
            Some(Value::String(s)) => Err(AuthError::ClaimInvalid {
                claim: path.name.clone(),
                detail: format!(
                    "is not a valid name: `{}` (1-63 of a-z, 0-9, '-', not starting or ending with '-')",
                    shown(s)
                ),
            }),
            Some(_) => Err(invalid(&path.name, "is not a string")),
        }
    }
}

fn missing(claim: &str) -> AuthError {
    AuthError::ClaimMissing(claim.to_owned())
}

fn invalid(claim: &str, detail: &str) -> AuthError {
    AuthError::ClaimInvalid {
        claim: claim.to_owned(),
        detail: detail.to_owned(),
    }
}

/// A NumericDate claim (seconds since the epoch; fractions are allowed and truncated).
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                // Saturating float-to-int cast; far-off dates clamp harmlessly.
                Ok(Some(f.floor() as i64))
            } else {
                Err(invalid(name, "is not a number of seconds"))
            }
        }
        Some(_) => Err(invalid(name, "is not a number of seconds")),
    }
}

/// For messages: clamps to the range `time` can represent.
fn to_time(ts: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(ts).unwrap_or(if ts < 0 {
        OffsetDateTime::UNIX_EPOCH
    } else {
        time::PrimitiveDateTime::MAX.assume_utc()
    })
}

/// Validates bearer JWTs against a live JWKS. Cheap to clone (an `Arc`);
/// the periodic JWKS refresh task stops when the last clone is dropped.
#[derive(Clone)]
pub struct JwtValidator {
    inner: Arc<Inner>,
}

struct Inner {
    policy: JwtPolicy,
    keys: Arc<KeyCache>,
    _refresher: AbortGuard,
}

impl std::fmt::Debug for JwtValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtValidator")
            .field("policy", &self.inner.policy)
            .field("jwks", &self.inner.keys.status())
            .finish()
    }
}

impl JwtValidator {
    /// Checks the configuration and loads the JWKS once; fails if it cannot,
    /// naming the file or URL. Must run inside a Tokio runtime (the periodic
    /// refresh is a task owned by the validator).
    pub async fn new(cfg: JwtConfig) -> Result<Self, AuthError> {
        let policy = JwtPolicy::new(&cfg)?;
        let keys = KeyCache::load(cfg.jwks, ON_DEMAND_MIN_INTERVAL).await?;
        let refresher = KeyCache::spawn_refresher(&keys, cfg.refresh);
        Ok(JwtValidator {
            inner: Arc::new(Inner {
                policy,
                keys,
                _refresher: refresher,
            }),
        })
    }

    /// Validates a bearer token (without the `Bearer ` prefix) now.
    pub async fn validate(&self, token: &str) -> Result<JwtCaller, AuthError> {
        self.validate_at(token, OffsetDateTime::now_utc()).await
    }

    /// Validates a bearer token at a given time. On an unknown `kid` the JWKS
    /// is refreshed once (rate-limited) and the token checked again.
    pub async fn validate_at(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<JwtCaller, AuthError> {
        let inner = &self.inner;
        let jwks = inner.keys.current();
        match inner.policy.verify(&jwks, token, now) {
            Err(e @ (AuthError::UnknownKid(_) | AuthError::NoKid { .. })) => {
                if !inner.keys.on_demand_allowed() {
                    return Err(e);
                }
                drop(jwks);
                inner.keys.refresh_on_demand().await;
                inner.policy.verify(&inner.keys.current(), token, now)
            }
            other => other,
        }
    }

    /// The rules in force.
    pub fn policy(&self) -> &JwtPolicy {
        &self.inner.policy
    }

    /// The key set in use right now.
    pub fn jwks(&self) -> Arc<Jwks> {
        self.inner.keys.current()
    }

    /// Health of the key set (for the admin API).
    pub fn jwks_status(&self) -> JwksStatus {
        self.inner.keys.status()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn header_parses() {
        let t = format!(
            "{}.{}.",
            b64(r#"{"alg":"ES256","kid":"k1","typ":"JWT","x":1}"#),
            b64("{}")
        );
        let h = parse_header(&t).expect("header");
        assert_eq!(h.alg, "ES256");
        assert_eq!(h.kid.as_deref(), Some("k1"));
        assert_eq!(h.typ.as_deref(), Some("JWT"));
        // Escapes in borrowed strings still work.
        let t = format!("{}.{}.", b64(r#"{"alg":"E\u0053256"}"#), b64("{}"));
        assert_eq!(parse_header(&t).expect("header").alg, "ES256");
    }

    #[test]
    fn header_refusals() {
        let cases = [
            ("", "three"),
            ("a.b", "three"),
            ("a.b.c.d", "three"),
            ("!!.e30.", "header is not base64url"),
            (
                &format!("{}.e30.", b64("[1]")),
                "header is not a JSON object",
            ),
            (&format!("{}.e30.", b64(r#"{"typ":"JWT"}"#)), "no `alg`"),
            (&format!("{}.!.", b64(r#"{"alg":"ES256"}"#)), "payload"),
            (
                &format!("{}.e30.a+b", b64(r#"{"alg":"ES256"}"#)),
                "signature",
            ),
        ];
        for (token, want) in cases {
            let e = parse_header(token).expect_err(token);
            assert_eq!(e.code(), "jwt_malformed");
            assert!(e.reason().contains(want), "{token}: {e}");
        }
        let long = format!(
            "{}.{}.",
            b64(r#"{"alg":"ES256"}"#),
            "A".repeat(MAX_TOKEN_LEN)
        );
        assert!(parse_header(&long)
            .expect_err("long")
            .reason()
            .contains("more than"));
    }

    #[test]
    fn claim_paths() {
        let claims: Map<String, Value> = serde_json::from_str(
            r#"{"tenant":"a","ext":{"tenant":"b","deep":{"x":"c"}},"https://x.io/t":"d"}"#,
        )
        .expect("json");
        let get = |p: &str| ClaimPath::new(p).lookup(&claims).and_then(Value::as_str);
        assert_eq!(get("tenant"), Some("a"));
        assert_eq!(get("ext.tenant"), Some("b"));
        assert_eq!(get("ext.deep.x"), Some("c"));
        assert_eq!(get("https://x.io/t"), Some("d"));
        assert_eq!(get("ext.nope"), None);
        assert_eq!(get("tenant.x"), None);
    }

    #[test]
    fn config_problems_are_all_reported() {
        let mut cfg = JwtConfig::new(vec![], vec![], JwksSource::Url("ftp://x".into()));
        cfg.algorithms = vec![Algorithm::HS256];
        cfg.tenant_claim = "a..b".into();
        cfg.refresh = Duration::ZERO;
        let AuthError::Config(problems) = JwtPolicy::new(&cfg).expect_err("bad") else {
            panic!("not a config error");
        };
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("HS256")));
    }

    #[test]
    fn shown_bounds_and_sanitizes() {
        assert_eq!(shown("ab\ncd"), "ab?cd");
        assert_eq!(shown(&"x".repeat(100)).chars().count(), 65);
    }

    #[test]
    fn numeric_dates() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"a":10,"b":10.9,"c":"10","d":1e300}"#).expect("json");
        assert_eq!(numeric_date(&claims, "a").ok(), Some(Some(10)));
        assert_eq!(numeric_date(&claims, "b").ok(), Some(Some(10)));
        assert!(numeric_date(&claims, "c").is_err());
        assert_eq!(numeric_date(&claims, "d").ok(), Some(Some(i64::MAX)));
        assert_eq!(numeric_date(&claims, "e").ok(), Some(None));
    }
}
