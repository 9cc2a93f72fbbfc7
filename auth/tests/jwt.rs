//! Bearer JWT validation end to end, with real keys: RS256 from a checked-in
//! fixture (ring cannot generate RSA keys), ES256 and EdDSA generated per
//! run with ring, tokens signed by jsonwebtoken, JWKS from a file or a tiny
//! HTTP server on 127.0.0.1:0.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use dmsc_auth::{AuthError, Jwks, JwksSource, JwtConfig, JwtPolicy, JwtValidator};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const RSA_PEM: &str = include_str!("fixtures/rs256.pem");
const RSA_JWK: &str = include_str!("fixtures/rs256.jwk.json");
const ISS: &str = "https://idp.test";
const AUD: &str = "dmsc";

struct TestKey {
    alg: Algorithm,
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(b64).expect("fixture PEM")
}

fn rsa_key() -> TestKey {
    let jwk: Value = serde_json::from_str(RSA_JWK).expect("fixture JWK");
    TestKey {
        alg: Algorithm::RS256,
        kid: jwk["kid"].as_str().expect("kid").to_owned(),
        enc: EncodingKey::from_rsa_der(&pem_to_der(RSA_PEM)),
        jwk,
    }
}

fn es_key(kid: &str) -> TestKey {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("generate");
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("pair");
    let point = pair.public_key().as_ref();
    assert_eq!(point.len(), 65);
    TestKey {
        alg: Algorithm::ES256,
        kid: kid.to_owned(),
        enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        }),
    }
}

fn ed_key(kid: &str) -> TestKey {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("generate");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
    TestKey {
        alg: Algorithm::EdDSA,
        kid: kid.to_owned(),
        enc: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA",
            "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
        }),
    }
}

fn jwks_json(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn claims() -> Value {
    json!({
        "iss": ISS, "aud": AUD, "sub": "bot-1", "tenant": "acme",
        "iat": now(), "nbf": now() - 5, "exp": now() + 600,
    })
}

fn sign_with(key: &TestKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key.enc).expect("sign")
}

fn sign(key: &TestKey, claims: &Value) -> String {
    sign_with(key, Some(&key.kid), claims)
}

fn with(mut base: Value, patch: Value) -> Value {
    for (k, v) in patch.as_object().expect("patch").clone() {
        if v.is_null() {
            base.as_object_mut().expect("claims").remove(&k);
        } else {
            base[k] = v;
        }
    }
    base
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    rsa: TestKey,
    es: TestKey,
    ed: TestKey,
    v: JwtValidator,
}

impl Fixture {
    async fn new() -> Self {
        Self::with_config(|_| {}).await
    }

    async fn with_config(tweak: impl FnOnce(&mut JwtConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        let (rsa, es, ed) = (rsa_key(), es_key("es-1"), ed_key("ed-1"));
        std::fs::write(&path, jwks_json(&[&rsa, &es, &ed])).expect("write jwks");
        let mut cfg = config(JwksSource::File(path.clone()));
        tweak(&mut cfg);
        let v = JwtValidator::new(cfg).await.expect("validator");
        Fixture {
            _dir: dir,
            path,
            rsa,
            es,
            ed,
            v,
        }
    }

    async fn err(&self, token: &str) -> AuthError {
        self.v
            .validate(token)
            .await
            .expect_err("token must be refused")
    }
}

fn config(source: JwksSource) -> JwtConfig {
    JwtConfig::new(
        vec![ISS.into()],
        vec![AUD.into(), "dmsc-alt".into()],
        source,
    )
}

async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn valid_tokens_of_each_algorithm_are_accepted() {
    let f = Fixture::new().await;
    for key in [&f.rsa, &f.es, &f.ed] {
        let exp = now() + 600;
        let token = sign(key, &with(claims(), json!({"exp": exp})));
        let caller =
            f.v.validate(&token)
                .await
                .unwrap_or_else(|e| panic!("{:?}: {e}", key.alg));
        assert_eq!(caller.tenant, "acme");
        assert_eq!(caller.agent, "bot-1");
        assert_eq!(caller.subject.as_deref(), Some("bot-1"));
        assert_eq!(caller.issuer, ISS);
        assert_eq!(caller.key_id.as_deref(), Some(key.kid.as_str()));
        assert_eq!(caller.expires_at.unix_timestamp(), exp);
    }
}

#[tokio::test]
async fn audience_array_and_custom_claims() {
    let f = Fixture::with_config(|c| {
        c.tenant_claim = "ext.tenant".into();
        c.agent_claim = "agent_name".into();
    })
    .await;
    let token = sign(
        &f.es,
        &with(
            claims(),
            json!({"aud": ["other", "dmsc-alt"], "tenant": null, "ext": {"tenant": "beta"}, "agent_name": "summarizer"}),
        ),
    );
    let caller = f.v.validate(&token).await.expect("valid");
    assert_eq!(
        (caller.tenant.as_str(), caller.agent.as_str()),
        ("beta", "summarizer")
    );
    // The top-level claim no longer counts.
    let token = sign(&f.es, &with(claims(), json!({"agent_name": "summarizer"})));
    assert_eq!(f.err(&token).await.reason(), "claim `ext.tenant` missing");
}

#[tokio::test]
async fn expired_and_leeway() {
    let f = Fixture::new().await;
    let exp = now() - 120;
    let e = f
        .err(&sign(&f.ed, &with(claims(), json!({"exp": exp}))))
        .await;
    assert_eq!(e.code(), "jwt_expired");
    let at = OffsetDateTime::from_unix_timestamp(exp).expect("time");
    let at = at
        .format(&time::format_description::well_known::Rfc3339)
        .expect("fmt");
    assert_eq!(e.reason(), format!("token expired at {at}"));
    // Inside the 30 s leeway: accepted.
    let token = sign(&f.ed, &with(claims(), json!({"exp": now() - 10})));
    assert!(f.v.validate(&token).await.is_ok());
    // No exp at all.
    let e = f
        .err(&sign(&f.ed, &with(claims(), json!({"exp": null}))))
        .await;
    assert_eq!(e.reason(), "claim `exp` missing");
}

#[tokio::test]
async fn not_before_in_the_future() {
    let f = Fixture::new().await;
    let e = f
        .err(&sign(&f.es, &with(claims(), json!({"nbf": now() + 300}))))
        .await;
    assert_eq!(e.code(), "jwt_not_yet_valid");
    assert!(e.reason().starts_with("token not valid before 20"), "{e}");
    // validate_at in the future accepts it.
    let token = sign(&f.es, &with(claims(), json!({"nbf": now() + 300})));
    let later = OffsetDateTime::now_utc() + time::Duration::seconds(400);
    assert!(f.v.validate_at(&token, later).await.is_ok());
}

#[tokio::test]
async fn wrong_audience_and_issuer() {
    let f = Fixture::new().await;
    let e = f
        .err(&sign(&f.rsa, &with(claims(), json!({"aud": "billing"}))))
        .await;
    assert_eq!(e.code(), "jwt_audience_not_accepted");
    assert_eq!(
        e.reason(),
        "audience `billing` is not accepted (expected `dmsc`, `dmsc-alt`)"
    );
    let e = f
        .err(&sign(&f.rsa, &with(claims(), json!({"aud": ["a", "b"]}))))
        .await;
    assert!(
        e.reason().starts_with("audience `a`, `b` is not accepted"),
        "{e}"
    );
    let e = f
        .err(&sign(
            &f.rsa,
            &with(claims(), json!({"iss": "https://evil.test"})),
        ))
        .await;
    assert_eq!(e.code(), "jwt_issuer_not_accepted");
    assert_eq!(e.reason(), "issuer `https://evil.test` is not accepted");
}

#[tokio::test]
async fn another_key_with_the_same_kid_is_refused() {
    let f = Fixture::new().await;
    let impostor = es_key("es-1");
    let e = f.err(&sign(&impostor, &claims())).await;
    assert_eq!(e.code(), "jwt_bad_signature");
    assert_eq!(e.reason(), "signature does not verify with key `es-1`");
    let impostor = ed_key("ed-1");
    assert_eq!(
        f.err(&sign(&impostor, &claims())).await.code(),
        "jwt_bad_signature"
    );
    // A tampered payload under a genuine signature.
    let token = sign(&f.ed, &claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(with(claims(), json!({"tenant": "other"})).to_string());
    parts[1] = &forged;
    assert_eq!(f.err(&parts.join(".")).await.code(), "jwt_bad_signature");
}

#[tokio::test]
async fn unknown_and_missing_kid() {
    let f = Fixture::new().await;
    let stranger = es_key("nope");
    let e = f.err(&sign(&stranger, &claims())).await;
    assert_eq!(e.code(), "jwt_unknown_kid");
    assert_eq!(e.reason(), "no key `nope` in the JWKS");
    let e = f.err(&sign_with(&f.es, None, &claims())).await;
    assert_eq!(e.reason(), "token has no `kid` and the JWKS holds 3 keys");
}

#[tokio::test]
async fn kidless_token_uses_the_only_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    let mut ed = ed_key("x");
    ed.jwk.as_object_mut().expect("jwk").remove("kid");
    std::fs::write(&path, jwks_json(&[&ed])).expect("write");
    let v = JwtValidator::new(config(JwksSource::File(path)))
        .await
        .expect("validator");
    let caller = v
        .validate(&sign_with(&ed, None, &claims()))
        .await
        .expect("valid");
    assert_eq!(caller.key_id, None);
    // Another key without kid does not verify.
    let other = ed_key("y");
    let e = v
        .validate(&sign_with(&other, None, &claims()))
        .await
        .expect_err("other");
    assert_eq!(e.reason(), "signature does not verify with key `(none)`");
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn alg_none_is_refused_before_anything_else() {
    let f = Fixture::new().await;
    let payload = b64(&claims().to_string());
    for alg in ["none", "None", "NONE", "nOnE"] {
        for header in [
            format!(r#"{{"alg":"{alg}"}}"#),
            format!(r#"{{"alg":"{alg}","kid":"es-1","typ":"JWT"}}"#),
        ] {
            for sig in ["", "c2ln"] {
                let token = format!("{}.{payload}.{sig}", b64(&header));
                let e = f.err(&token).await;
                assert_eq!(e.code(), "jwt_alg_none", "{header}");
                assert_eq!(e.reason(), "algorithm `none` is not accepted");
            }
        }
    }
}

#[tokio::test]
async fn hmac_and_unlisted_algorithms_are_refused() {
    let f = Fixture::new().await;
    // HS256 signed with the RSA public JWK's modulus as the secret: the
    // classic key-confusion attack.
    let secret = f.rsa.jwk["n"].as_str().expect("n").as_bytes().to_vec();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(f.rsa.kid.clone());
    let token =
        jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(&secret)).expect("hs");
    let e = f.err(&token).await;
    assert_eq!(e.code(), "jwt_alg_not_accepted");
    assert_eq!(e.reason(), "algorithm `HS256` is not accepted");
    // A configuration that leaves EdDSA out refuses EdDSA tokens.
    let g = Fixture::with_config(|c| c.algorithms = vec![Algorithm::RS256, Algorithm::ES256]).await;
    assert_eq!(
        g.err(&sign(&g.ed, &claims())).await.reason(),
        "algorithm `EdDSA` is not accepted"
    );
    // Unknown names are shown, bounded.
    let token = format!("{}.{}.", b64(r#"{"alg":"XY999"}"#), b64("{}"));
    assert_eq!(
        f.err(&token).await.reason(),
        "algorithm `XY999` is not accepted"
    );
    // HMAC can never be configured.
    let mut cfg = config(JwksSource::File(f.path.clone()));
    cfg.algorithms = vec![Algorithm::HS256, Algorithm::ES256];
    assert_eq!(
        JwtValidator::new(cfg)
            .await
            .expect_err("hmac config")
            .code(),
        "config_invalid"
    );
}

#[tokio::test]
async fn key_type_must_fit_the_algorithm() {
    let f = Fixture::with_config(|c| c.algorithms.push(Algorithm::PS256)).await;
    // An RS256 signature presented under the EC key's kid.
    let e = f.err(&sign_with(&f.rsa, Some("es-1"), &claims())).await;
    assert_eq!(e.code(), "jwt_key_mismatch");
    assert_eq!(
        e.reason(),
        "key `es-1` is an EC P-256 key, it cannot verify `RS256`"
    );
    // ES256 under the Ed25519 key, EdDSA under the RSA key.
    assert_eq!(
        f.err(&sign_with(&f.es, Some("ed-1"), &claims()))
            .await
            .code(),
        "jwt_key_mismatch"
    );
    assert_eq!(
        f.err(&sign_with(&f.ed, Some("rsa-1"), &claims()))
            .await
            .code(),
        "jwt_key_mismatch"
    );
    // The RSA JWK pins RS256, so PS256 with the same key is refused even
    // though the family fits.
    let mut header = Header::new(Algorithm::PS256);
    header.kid = Some("rsa-1".into());
    let token = jsonwebtoken::encode(&header, &claims(), &f.rsa.enc).expect("ps256");
    assert_eq!(f.err(&token).await.code(), "jwt_key_mismatch");
}

#[tokio::test]
async fn claims_tenant_and_agent() {
    let f = Fixture::new().await;
    let e = f
        .err(&sign(&f.es, &with(claims(), json!({"tenant": null}))))
        .await;
    assert_eq!(e.code(), "jwt_claim_missing");
    assert_eq!(e.reason(), "claim `tenant` missing");
    let e = f
        .err(&sign(&f.es, &with(claims(), json!({"sub": null}))))
        .await;
    assert_eq!(e.reason(), "claim `sub` missing");
    let e = f
        .err(&sign(
            &f.es,
            &with(claims(), json!({"tenant": "Acme Corp"})),
        ))
        .await;
    assert_eq!(e.code(), "jwt_claim_invalid");
    assert!(
        e.reason()
            .starts_with("claim `tenant` is not a valid name: `Acme Corp`"),
        "{e}"
    );
    let e = f
        .err(&sign(&f.es, &with(claims(), json!({"tenant": 7}))))
        .await;
    assert_eq!(e.reason(), "claim `tenant` is not a string");
    let e = f
        .err(&sign(
            &f.es,
            &with(claims(), json!({"sub": "x".repeat(64)})),
        ))
        .await;
    assert_eq!(e.code(), "jwt_claim_invalid");
}

#[tokio::test]
async fn malformed_strings() {
    let f = Fixture::new().await;
    let good = sign(&f.es, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        String::new(),
        "Bearer x".into(),
        "a.b".into(),
        format!("{good}.x"),
        format!("{}.{}", parts[0], parts[1]),
        format!("!{}", good),
        format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}", b64("not json"), parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], b64("[1,2]"), parts[2]),
        format!("{}.{}.{}", parts[0], b64("{\"exp\":"), parts[2]),
        format!("{}.{}.{}", parts[0], parts[1], "A".repeat(20_000)),
    ];
    for token in &cases {
        let e = f.err(token).await;
        assert_eq!(e.code(), "jwt_malformed", "{token:.80}: {e}");
        assert!(e.reason().starts_with("malformed token: "), "{e}");
    }
}

#[tokio::test]
async fn file_jwks_unknown_kid_refresh_is_rate_limited() {
    let f = Fixture::new().await; // refresh period 300 s: only on-demand refreshes happen
    let new1 = ed_key("ed-2");
    std::fs::write(&f.path, jwks_json(&[&f.es, &new1])).expect("rewrite");
    // Unknown kid: one refresh, picks the new key up immediately.
    let caller =
        f.v.validate(&sign(&new1, &claims()))
            .await
            .expect("after refresh");
    assert_eq!(caller.key_id.as_deref(), Some("ed-2"));
    // The removed RSA key is gone with the same refresh.
    assert_eq!(
        f.err(&sign(&f.rsa, &claims())).await.code(),
        "jwt_unknown_kid"
    );
    // A second unknown kid within 10 s does not re-read the file.
    let new2 = ed_key("ed-3");
    std::fs::write(&f.path, jwks_json(&[&f.es, &new1, &new2])).expect("rewrite");
    assert_eq!(
        f.err(&sign(&new2, &claims())).await.code(),
        "jwt_unknown_kid"
    );
    assert_eq!(f.v.jwks_status().loads_ok, 2);
}

#[tokio::test]
async fn file_jwks_periodic_refresh_and_last_good_set() {
    let f = Fixture::with_config(|c| c.refresh = Duration::from_millis(50)).await;
    // Use up the on-demand refresh so only the periodic one can help.
    let _ = f.v.validate(&sign(&es_key("burn"), &claims())).await;
    let newcomer = es_key("es-2");
    std::fs::write(&f.path, jwks_json(&[&f.es, &newcomer])).expect("rewrite");
    let token = sign(&newcomer, &claims());
    eventually("the periodic refresh to load es-2", || async {
        f.v.validate(&token).await.is_ok()
    })
    .await;
    // A broken file keeps the last good set.
    std::fs::write(&f.path, "{ not json").expect("break");
    let before = f.v.jwks_status().loads_failed;
    eventually("two failed refreshes", || async {
        f.v.jwks_status().loads_failed >= before + 2
    })
    .await;
    assert!(f.v.validate(&token).await.is_ok());
    let status = f.v.jwks_status();
    assert_eq!(status.kids, vec!["es-1".to_owned(), "es-2".to_owned()]);
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("jwks.json"),
        "{status:?}"
    );
}

#[tokio::test]
async fn startup_errors_name_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("absent.json");
    let e = JwtValidator::new(config(JwksSource::File(missing.clone())))
        .await
        .expect_err("missing file");
    assert_eq!(e.code(), "jwks_unavailable");
    assert!(e.reason().contains(&missing.display().to_string()), "{e}");

    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).expect("write");
    let e = JwtValidator::new(config(JwksSource::File(junk)))
        .await
        .expect_err("junk");
    assert!(e.reason().contains("no usable signing key"), "{e}");

    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}/jwks");
    let e = JwtValidator::new(config(JwksSource::Url(url.clone())))
        .await
        .expect_err("refused");
    assert!(e.reason().contains(&url), "{e}");
}

/// A minimal HTTP/1.1 server: answers every request with the current body,
/// or 500 once told to fail; counts requests.
struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    fail: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().expect("addr")
        );
        let body = Arc::new(Mutex::new(body));
        let fail = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, fl, h) = (body.clone(), fail.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                assert!(buf.starts_with(b"GET /.well-known/jwks.json HTTP/1.1\r\n"));
                h.fetch_add(1, Ordering::SeqCst);
                let response = if fl.load(Ordering::SeqCst) {
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\noops".to_owned()
                } else {
                    let body = b.lock().expect("body").clone();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        });
        JwksServer {
            url,
            body,
            fail,
            hits,
            task,
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn url_jwks_works_and_keeps_the_last_good_set() {
    let (es, ed) = (es_key("es-1"), ed_key("ed-1"));
    let server = JwksServer::start(jwks_json(&[&es])).await;
    let mut cfg = config(JwksSource::Url(server.url.clone()));
    cfg.refresh = Duration::from_millis(50);
    let v = JwtValidator::new(cfg).await.expect("validator");
    assert_eq!(
        v.validate(&sign(&es, &claims())).await.expect("es").tenant,
        "acme"
    );

    // The server starts publishing a second key: picked up.
    *server.body.lock().expect("body") = jwks_json(&[&es, &ed]);
    let token = sign(&ed, &claims());
    eventually("ed-1 from the URL", || async {
        v.validate(&token).await.is_ok()
    })
    .await;

    // Then it fails: refreshes fail, the last good set stays.
    server.fail.store(true, Ordering::SeqCst);
    let before = v.jwks_status().loads_failed;
    eventually("failed refreshes", || async {
        v.jwks_status().loads_failed >= before + 2
    })
    .await;
    assert!(v.validate(&sign(&es, &claims())).await.is_ok());
    assert!(v.validate(&token).await.is_ok());
    let status = v.jwks_status();
    assert!(
        status.last_error.as_deref().unwrap_or("").contains("500"),
        "{status:?}"
    );
    assert!(status.source.contains(&server.url));
}

#[tokio::test]
async fn dropping_the_validator_stops_the_refresh_task() {
    let es = es_key("es-1");
    let server = JwksServer::start(jwks_json(&[&es])).await;
    let mut cfg = config(JwksSource::Url(server.url.clone()));
    cfg.refresh = Duration::from_millis(20);
    let v = JwtValidator::new(cfg).await.expect("validator");
    let clone = v.clone();
    eventually("a few refreshes", || async {
        server.hits.load(Ordering::SeqCst) >= 4
    })
    .await;
    drop(v);
    // A clone keeps it running.
    let at = server.hits.load(Ordering::SeqCst);
    eventually("refreshes with a clone alive", || async {
        server.hits.load(Ordering::SeqCst) >= at + 2
    })
    .await;
    drop(clone);
    let after_drop = server.hits.load(Ordering::SeqCst);
    // Absence of activity can only be observed over time: 15 periods.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = server.hits.load(Ordering::SeqCst);
    assert!(
        later <= after_drop + 1,
        "refresh task outlived its validator: {after_drop} -> {later}"
    );
}

// ---- the pure policy against a fixed key set, for the no-panic property ----

fn fixed_policy_and_keys() -> (JwtPolicy, Jwks, Vec<TestKey>) {
    let keys = vec![rsa_key(), es_key("es-1"), ed_key("ed-1")];
    let jwks =
        Jwks::from_json(jwks_json(&keys.iter().collect::<Vec<_>>()).as_bytes()).expect("jwks");
    let mut cfg = config(JwksSource::File("unused".into()));
    cfg.algorithms = vec![
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];
    (JwtPolicy::new(&cfg).expect("policy"), jwks, keys)
}

#[test]
fn pure_policy_accepts_what_the_validator_accepts() {
    let (policy, jwks, keys) = fixed_policy_and_keys();
    for k in &keys {
        let caller = policy
            .verify(&jwks, &sign(k, &claims()), OffsetDateTime::now_utc())
            .expect("valid");
        assert_eq!(caller.key_id.as_deref(), Some(k.kid.as_str()));
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> &'static (JwtPolicy, Jwks, Vec<TestKey>) {
        static P: std::sync::OnceLock<(JwtPolicy, Jwks, Vec<TestKey>)> = std::sync::OnceLock::new();
        P.get_or_init(fixed_policy_and_keys)
    }

    fn alg() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "none", "NONE", "HS256", "RS256", "RS384", "PS256", "ES256", "ES384", "EdDSA", "X",
        ])
    }

    fn kid() -> impl Strategy<Value = Option<&'static str>> {
        prop::option::of(prop::sample::select(vec!["rsa-1", "es-1", "ed-1", "zz"]))
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let (p, jwks, _) = policy();
            let _ = dmsc_auth::parse_header(&s);
            let _ = p.verify(jwks, &s, OffsetDateTime::now_utc());
        }

        #[test]
        fn structured_garbage_never_panics_or_passes(
            alg in alg(), kid in kid(),
            payload in prop::collection::vec(any::<u8>(), 0..200),
            sig in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let (p, jwks, _) = policy();
            let header = match kid {
                Some(k) => json!({"alg": alg, "kid": k}),
                None => json!({"alg": alg}),
            };
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(&payload),
                URL_SAFE_NO_PAD.encode(&sig),
            );
            let _ = dmsc_auth::parse_header(&token);
            prop_assert!(p.verify(jwks, &token, OffsetDateTime::now_utc()).is_err());
        }

        #[test]
        fn valid_claims_with_random_signatures_are_refused(
            alg in alg(), kid in kid(),
            sig in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let (p, jwks, _) = policy();
            let header = match kid {
                Some(k) => json!({"alg": alg, "kid": k}),
                None => json!({"alg": alg}),
            };
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims().to_string()),
                URL_SAFE_NO_PAD.encode(&sig),
            );
            let e = p.verify(jwks, &token, OffsetDateTime::now_utc());
            prop_assert!(e.is_err());
        }
    }
}

#[test]
fn public_fixture_for_the_fuzz_target_parses() {
    let jwks = Jwks::from_json(include_bytes!("fixtures/public-jwks.json")).expect("fixture");
    assert_eq!(jwks.kids(), ["rsa-1", "es-1", "ed-1"]);
}
