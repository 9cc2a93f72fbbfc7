//! JSON Web Key Sets: parsing a JWKS into ready-to-use verification keys,
//! loading it from a file or an HTTP(S) URL, and keeping it fresh.
//!
//! Keys are decoded once per load into [`DecodingKey`]s indexed by `kid`, so
//! the per-token path is a map lookup plus the signature check. A [`Jwks`] is
//! immutable; the validator's key cache swaps whole sets behind an `Arc`, so
//! a validation never sees half a refresh and never waits for one.
//!
//! Refresh policy: a task owned by the validator re-reads the source every
//! `refresh` period (it holds only a `Weak` and is aborted when the validator
//! is dropped), and a token with an unknown `kid` triggers one extra refresh,
//! at most once per [`ON_DEMAND_MIN_INTERVAL`] so a stream of made-up `kid`s
//! cannot turn the node into a load generator against the identity provider.
//! A failed refresh keeps the last good set and logs a warning: an IdP outage
//! must not lock every agent out.
//!
//! Only what verifies signatures is accepted: RSA (2048 bits and up), EC
//! P-256/P-384 and OKP Ed25519 keys whose `use` is absent or `sig`. Symmetric
//! (`oct`) keys are never loaded, so no HMAC algorithm can be confused with a
//! public key.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::error::AuthError;

/// Largest JWKS document accepted (real ones are a few KiB).
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Minimum time between two refreshes triggered by an unknown `kid`.
pub const ON_DEMAND_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Time limit for one JWKS fetch (connect, TLS, request, body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A local JSON file (e.g. mounted from a secret), re-read every refresh.
    File(PathBuf),
    /// An `http://` or `https://` URL, typically the IdP's `jwks_uri`.
    Url(String),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(p) => write!(f, "file `{}`", p.display()),
            JwksSource::Url(u) => write!(f, "URL `{u}`"),
        }
    }
}

/// What kind of public key a JWK holds, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    pub(crate) fn accepts(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            KeyKind::Rsa => "an RSA key",
            KeyKind::EcP256 => "an EC P-256 key",
            KeyKind::EcP384 => "an EC P-384 key",
            KeyKind::Ed25519 => "an Ed25519 key",
        }
    }
}

/// One usable verification key.
pub(crate) struct Key {
    pub(crate) kid: Option<String>,
    pub(crate) kind: KeyKind,
    /// The JWK's own `alg`, when it pins one.
    pub(crate) alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
}

/// A parsed key set: verification keys indexed by `kid`.
pub struct Jwks {
    keys: Vec<Key>,
    by_kid: HashMap<String, usize>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("kids", &self.kids()).finish()
    }
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    kid: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`). Keys that cannot verify
    /// signatures here (other `use`, unsupported `kty`/`crv`, symmetric keys,
    /// RSA under 2048 bits, bad encodings) are skipped with a debug log; a set
    /// with no usable key at all is an error that lists why each was skipped.
    pub fn from_json(json: &[u8]) -> Result<Jwks, AuthError> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(AuthError::JwksInvalid(format!(
                "document is {} bytes, more than {MAX_JWKS_BYTES}",
                json.len()
            )));
        }
        let raw: RawJwks = serde_json::from_slice(json)
            .map_err(|e| AuthError::JwksInvalid(format!("not a JWKS document: {e}")))?;
        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut by_kid = HashMap::with_capacity(raw.keys.len());
        let mut skipped = Vec::new();
        for (i, value) in raw.keys.into_iter().enumerate() {
            match parse_key(value) {
                Ok(key) => {
                    if let Some(kid) = &key.kid {
                        if by_kid.contains_key(kid) {
                            tracing::warn!(kid, "JWKS lists kid twice; keeping the first");
                            continue;
                        }
                        by_kid.insert(kid.clone(), keys.len());
                    }
                    keys.push(key);
                }
                Err(why) => {
                    tracing::debug!(index = i, %why, "skipping JWKS key");
                    skipped.push(format!("key {i}: {why}"));
                }
            }
        }
        if keys.is_empty() {
            let why = if skipped.is_empty() {
                "the `keys` array is empty".to_owned()
            } else {
                skipped.join("; ")
            };
            return Err(AuthError::JwksInvalid(format!(
                "no usable signing key ({why})"
            )));
        }
        Ok(Jwks { keys, by_kid })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the set holds no key (never the case for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `kid`s of the usable keys, in document order.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().filter_map(|k| k.kid.clone()).collect()
    }

    /// The key for a token's `kid`; a token without `kid` may use the only
    /// key of a one-key set.
    pub(crate) fn find(&self, kid: Option<&str>) -> Result<&Key, AuthError> {
        match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .and_then(|&i| self.keys.get(i))
                .ok_or_else(|| AuthError::UnknownKid(crate::jwt::shown(kid))),
            None => match self.keys.as_slice() {
                [only] => Ok(only),
                keys => Err(AuthError::NoKid { keys: keys.len() }),
            },
        }
    }
}

fn b64_len(field: &str, value: &str) -> Result<usize, String> {
    URL_SAFE_NO_PAD
        .decode(value)
        .map(|b| b.len())
        .map_err(|e| format!("`{field}` is not base64url: {e}"))
}

fn parse_key(value: serde_json::Value) -> Result<Key, String> {
    let jwk: RawJwk = serde_json::from_value(value).map_err(|e| format!("not a JWK: {e}"))?;
    if let Some(u) = &jwk.use_ {
        if u != "sig" {
            return Err(format!("`use` is `{u}`, not `sig`"));
        }
    }
    let alg = match jwk.alg.as_deref() {
        None => None,
        Some(a) => match a.parse::<Algorithm>() {
            Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) | Err(_) => {
                return Err(format!(
                    "`alg` `{a}` is not a supported signature algorithm"
                ))
            }
            Ok(alg) => Some(alg),
        },
    };
    let need = |field: &'static str, v: &Option<String>| -> Result<String, String> {
        v.clone().ok_or_else(|| format!("`{field}` missing"))
    };
    let (kind, key) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => {
            let n = need("n", &jwk.n)?;
            let e = need("e", &jwk.e)?;
            let n_len = URL_SAFE_NO_PAD
                .decode(&n)
                .map_err(|e| format!("`n` is not base64url: {e}"))?;
            // Leading zero bytes do not count towards the modulus size.
            let bits = n_len.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < 2048 {
                return Err(format!("RSA modulus of about {bits} bits, under 2048"));
            }
            b64_len("e", &e)?;
            let key = DecodingKey::from_rsa_components(&n, &e).map_err(|e| e.to_string())?;
            (KeyKind::Rsa, key)
        }
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (kind, len) = if crv == "P-256" {
                (KeyKind::EcP256, 32)
            } else {
                (KeyKind::EcP384, 48)
            };
            let x = need("x", &jwk.x)?;
            let y = need("y", &jwk.y)?;
            if b64_len("x", &x)? != len || b64_len("y", &y)? != len {
                return Err(format!("{crv} coordinates must be {len} bytes"));
            }
            let key = DecodingKey::from_ec_components(&x, &y).map_err(|e| e.to_string())?;
            (kind, key)
        }
        ("OKP", Some("Ed25519")) => {
            let x = need("x", &jwk.x)?;
            if b64_len("x", &x)? != 32 {
                return Err("Ed25519 `x` must be 32 bytes".to_owned());
            }
            let key = DecodingKey::from_ed_components(&x).map_err(|e| e.to_string())?;
            (KeyKind::Ed25519, key)
        }
        (kty, crv) => {
            return Err(match crv {
                Some(crv) => format!("unsupported key type `{kty}` / curve `{crv}`"),
                None => format!("unsupported key type `{kty}`"),
            })
        }
    };
    if let Some(alg) = alg {
        if !kind.accepts(alg) {
            return Err(format!("`alg` {alg:?} does not fit {}", kind.describe()));
        }
    }
    Ok(Key {
        kid: jwk.kid,
        kind,
        alg,
        key,
    })
}

/// Health of the key set, for the admin API and tests.
#[derive(Debug, Clone)]
pub struct JwksStatus {
    /// Where the keys come from (`file `...`` / `URL `...``).
    pub source: String,
    /// `kid`s of the keys in use.
    pub kids: Vec<String>,
    /// When the keys in use were loaded.
    pub loaded_at: OffsetDateTime,
    /// Successful loads, including the first.
    pub loads_ok: u64,
    /// Failed refreshes (the previous set stayed in use).
    pub loads_failed: u64,
    /// The most recent failure, if the most recent attempt failed.
    pub last_error: Option<String>,
}

/// The HTTP client the node uses for outside URLs: hyper-util's pooled
/// client over hyper-rustls (ring, the system's roots), the same stack as
/// the node's agent clients.
type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Fetches a JWKS document.
struct Loader {
    source: JwksSource,
    /// Set for URL sources.
    client: Option<HttpsClient>,
}

impl Loader {
    fn new(source: JwksSource) -> Result<Self, AuthError> {
        let client = match &source {
            JwksSource::Url(url) => Some(https_client(url)?),
            JwksSource::File(_) => None,
        };
        Ok(Loader { source, client })
    }

    async fn load(&self) -> Result<Jwks, AuthError> {
        let unavailable = |detail: String| AuthError::JwksUnavailable {
            location: self.source.to_string(),
            detail,
        };
        let bytes = match &self.source {
            JwksSource::File(path) => {
                let meta = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                if meta.len() > MAX_JWKS_BYTES as u64 {
                    return Err(unavailable(format!(
                        "file is {} bytes, more than {MAX_JWKS_BYTES}",
                        meta.len()
                    )));
                }
                tokio::fs::read(path)
                    .await
                    .map_err(|e| unavailable(e.to_string()))?
            }
            JwksSource::Url(url) => {
                let client = self
                    .client
                    .as_ref()
                    .ok_or_else(|| unavailable("no HTTP client for this URL".into()))?;
                match tokio::time::timeout(FETCH_TIMEOUT, fetch(url, client)).await {
                    Ok(r) => r.map_err(unavailable)?,
                    Err(_) => {
                        return Err(unavailable(format!(
                            "no answer within {} s",
                            FETCH_TIMEOUT.as_secs()
                        )))
                    }
                }
            }
        };
        Jwks::from_json(&bytes).map_err(|e| match e {
            AuthError::JwksInvalid(detail) => unavailable(detail),
            other => other,
        })
    }
}

fn https_client(url: &str) -> Result<HttpsClient, AuthError> {
    let unavailable = |detail: String| AuthError::JwksUnavailable {
        location: format!("URL `{url}`"),
        detail,
    };
    if !url.starts_with("https://") {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| unavailable(format!("TLS setup: {e}")))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
            .https_or_http()
            .enable_http1()
            .build();
        return Ok(Client::builder(TokioExecutor::new()).build(https));
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(unavailable(format!(
            "no trusted root certificates found on this system to check the server \
             (install ca-certificates or set SSL_CERT_FILE){}",
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {}", errors.join("; "))
            }
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| unavailable(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// Where a URL points, checked once at configuration time.
pub(crate) struct Target {
    #[cfg_attr(not(test), allow(dead_code))]
    https: bool,
    host: String,
    port: u16,
    authority: String,
    #[cfg_attr(not(test), allow(dead_code))]
    path: String,
}

pub(crate) fn parse_url(url: &str) -> Result<Target, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("the scheme must be http:// or https://".to_owned()),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| "the URL has no host".to_owned())?;
    if authority.as_str().contains('@') {
        return Err("credentials in the URL are not supported".to_owned());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err("the URL has no host".to_owned());
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    Ok(Target {
        https,
        host,
        port,
        authority: authority.as_str().to_owned(),
        path,
    })
}

async fn fetch(url: &str, client: &HttpsClient) -> Result<Vec<u8>, String> {
    let target = parse_url(url)?;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let request = hyper::Request::get(uri)
        .header(hyper::header::HOST, target.authority.as_str())
        .header(
            hyper::header::ACCEPT,
            "application/json, application/jwk-set+json",
        )
        .header(hyper::header::USER_AGENT, "dmsc-auth")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let response = client.request(request).await.map_err(|e| {
        let mut msg = format!("request to {}:{}: {e}", target.host, target.port);
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        msg
    })?;
    let status = response.status();
    if status != hyper::StatusCode::OK {
        let location = response
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(|l| format!(" (redirect to `{l}` is not followed; configure that URL)"))
            .unwrap_or_default();
        return Err(format!("HTTP status {status}{location}"));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

/// Aborts a task when dropped, so the refresher dies with its validator.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The live key set plus its refresh machinery.
pub(crate) struct KeyCache {
    current: RwLock<Arc<Jwks>>,
    loader: Loader,
    status: Mutex<JwksStatus>,
    /// Completed load attempts; lets a waiter see someone else's refresh.
    generation: AtomicU64,
    /// Serializes loads (periodic and on demand) so a burst makes one fetch.
    load_lock: tokio::sync::Mutex<()>,
    last_on_demand: Mutex<Option<Instant>>,
    on_demand_interval: Duration,
}

impl KeyCache {
    /// Loads the key set once; an error names the source.
    pub(crate) async fn load(
        source: JwksSource,
        on_demand_interval: Duration,
    ) -> Result<Arc<KeyCache>, AuthError> {
        let loader = Loader::new(source)?;
        let jwks = loader.load().await?;
        let status = JwksStatus {
            source: loader.source.to_string(),
            kids: jwks.kids(),
            loaded_at: OffsetDateTime::now_utc(),
            loads_ok: 1,
            loads_failed: 0,
            last_error: None,
        };
        tracing::info!(source = %status.source, kids = ?status.kids, "JWKS loaded");
        Ok(Arc::new(KeyCache {
            current: RwLock::new(Arc::new(jwks)),
            loader,
            status: Mutex::new(status),
            generation: AtomicU64::new(0),
            load_lock: tokio::sync::Mutex::new(()),
            last_on_demand: Mutex::new(None),
            on_demand_interval,
        }))
    }

    /// Starts the periodic refresh; the task stops when the returned guard
    /// is dropped or the cache is gone.
    pub(crate) fn spawn_refresher(cache: &Arc<KeyCache>, every: Duration) -> AbortGuard {
        let weak: Weak<KeyCache> = Arc::downgrade(cache);
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                let _serial = cache.load_lock.lock().await;
                cache.reload("periodic").await;
            }
        });
        AbortGuard(AbortOnDrop(handle))
    }

    pub(crate) fn current(&self) -> Arc<Jwks> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn status(&self) -> JwksStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Refresh because a token named a key we do not have. Returns when the
    /// set is as fresh as the rate limit allows; the caller re-checks.
    pub(crate) async fn refresh_on_demand(&self) {
        let seen = self.generation.load(Ordering::Acquire);
        let _serial = self.load_lock.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            // Someone loaded while we waited: use their result.
            return;
        }
        {
            let mut last = self
                .last_on_demand
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < self.on_demand_interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.reload("unknown kid").await;
    }

    /// Whether an on-demand refresh would be allowed now (cheap pre-check so
    /// a flood of unknown `kid`s does not queue on the load lock).
    pub(crate) fn on_demand_allowed(&self) -> bool {
        !self
            .last_on_demand
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() < self.on_demand_interval)
    }

    /// One load attempt; the caller holds `load_lock`.
    async fn reload(&self, why: &'static str) {
        let result = self.loader.load().await;
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(jwks) => {
                let kids = jwks.kids();
                if kids != status.kids {
                    tracing::info!(source = %status.source, ?kids, why, "JWKS changed");
                }
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(jwks);
                status.kids = kids;
                status.loaded_at = OffsetDateTime::now_utc();
                status.loads_ok += 1;
                status.last_error = None;
            }
            Err(e) => {
                tracing::warn!(why, error = %e, "JWKS refresh failed; keeping the last good key set");
                status.loads_failed += 1;
                status.last_error = Some(e.reason());
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Keeps the periodic refresh task alive; dropping it stops the task.
pub(crate) struct AbortGuard(#[allow(dead_code)] AbortOnDrop);

#[cfg(test)]
mod tests {
    use super::*;

    const ED_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    #[test]
    fn parses_and_skips() {
        let doc = format!(
            r#"{{"keys":[
                {{"kty":"OKP","crv":"Ed25519","x":"{ED_X}","kid":"ed"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{ED_X}","kid":"enc","use":"enc"}},
                {{"kty":"oct","k":"c2VjcmV0","kid":"hmac"}},
                {{"kty":"RSA","n":"AQAB","e":"AQAB","kid":"small"}},
                {{"kty":"EC","crv":"P-256","x":"{ED_X}","y":"{ED_X}","kid":"ec"}},
                {{"kty":"OKP","crv":"Ed25519","x":"{ED_X}","kid":"ed-hs","alg":"HS256"}}
            ]}}"#
        );
        let jwks = Jwks::from_json(doc.as_bytes()).expect("one usable key");
        assert_eq!(jwks.kids(), vec!["ed".to_owned(), "ec".to_owned()]);
        assert!(jwks.find(Some("enc")).is_err());
        assert!(jwks.find(Some("hmac")).is_err());
        assert!(matches!(jwks.find(None), Err(AuthError::NoKid { keys: 2 })));
        assert_eq!(
            jwks.find(Some("ec")).map(|k| k.kind).ok(),
            Some(KeyKind::EcP256)
        );
    }

    #[test]
    fn no_usable_key_is_an_error_with_reasons() {
        let err =
            Jwks::from_json(br#"{"keys":[{"kty":"oct","k":"AA"}]}"#).expect_err("no usable key");
        assert!(err.reason().contains("unsupported key type `oct`"), "{err}");
        assert!(Jwks::from_json(br#"{"keys":[]}"#).is_err());
        assert!(Jwks::from_json(b"[]").is_err());
    }

    #[test]
    fn single_key_serves_kidless_tokens() {
        let doc = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{ED_X}"}}]}}"#);
        let jwks = Jwks::from_json(doc.as_bytes()).expect("jwks");
        assert!(jwks.find(None).is_ok());
        assert!(jwks.find(Some("x")).is_err());
    }

    #[test]
    fn urls() {
        let t = parse_url("https://idp.example.com/.well-known/jwks.json").expect("url");
        assert!(t.https);
        assert_eq!((t.host.as_str(), t.port), ("idp.example.com", 443));
        assert_eq!(t.path, "/.well-known/jwks.json");
        let t = parse_url("http://[::1]:8080").expect("url");
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 8080, "/")
        );
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("https://user:pw@x/").is_err());
        assert!(parse_url("/relative").is_err());
    }
}
