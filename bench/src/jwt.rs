//! `dmsc-bench jwt`: bearer JWT validations per second and per-call latency
//! (p50/p99) for RS256 (2048-bit), ES256 and EdDSA, through the same
//! `JwtValidator::validate` the node's ingress calls, with the JWKS loaded
//! from a file in a temp dir (the three keys in one set, so the `kid` lookup
//! is part of what is measured).
//!
//! Each worker is an OS thread with its own current-thread runtime, looping
//! on one token for `secs` seconds: validation does no I/O on this path, so
//! this measures CPU cost (signature check, base64 and JSON) and, with
//! `--threads` > 1, how it scales on shared state (the key set `Arc`). The
//! RSA key is the test fixture of `dmsc-auth` (ring cannot generate RSA
//! keys); the EC and Ed25519 keys are generated per run.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use dmsc_auth::{JwksSource, JwtConfig, JwtValidator};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use serde_json::{json, Value};

const RSA_PEM: &str = include_str!("../../auth/tests/fixtures/rs256.pem");
const RSA_JWK: &str = include_str!("../../auth/tests/fixtures/rs256.jwk.json");
const ISS: &str = "https://idp.bench";
const AUD: &str = "dmsc";

#[derive(clap::Args)]
pub struct JwtArgs {
    /// Seconds of measurement per algorithm.
    #[arg(long, default_value_t = 3)]
    pub secs: u64,
    /// Worker threads validating concurrently.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

struct BenchKey {
    alg: Algorithm,
    kid: &'static str,
    enc: EncodingKey,
    jwk: Value,
}

fn keys() -> anyhow::Result<Vec<BenchKey>> {
    let rsa_der = STANDARD
        .decode(
            RSA_PEM
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .context("RSA fixture PEM")?;
    let rsa_jwk: Value = serde_json::from_str(RSA_JWK).context("RSA fixture JWK")?;

    let rng = SystemRandom::new();
    let ec_alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let ec_pkcs8 = EcdsaKeyPair::generate_pkcs8(ec_alg, &rng)
        .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?;
    let ec_pair = EcdsaKeyPair::from_pkcs8(ec_alg, ec_pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("loading the P-256 key"))?;
    let point = ec_pair.public_key().as_ref();
    let (x, y) = (&point[1..33], &point[33..65]);

    let ed_pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("generating an Ed25519 key"))?;
    let ed_pair = Ed25519KeyPair::from_pkcs8(ed_pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("loading the Ed25519 key"))?;

    Ok(vec![
        BenchKey {
            alg: Algorithm::RS256,
            kid: "rsa-1",
            enc: EncodingKey::from_rsa_der(&rsa_der),
            jwk: rsa_jwk,
        },
        BenchKey {
            alg: Algorithm::ES256,
            kid: "es-1",
            enc: EncodingKey::from_ec_der(ec_pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "crv": "P-256", "use": "sig", "kid": "es-1",
                        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}),
        },
        BenchKey {
            alg: Algorithm::EdDSA,
            kid: "ed-1",
            enc: EncodingKey::from_ed_der(ed_pkcs8.as_ref()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "use": "sig", "kid": "ed-1",
                        "x": URL_SAFE_NO_PAD.encode(ed_pair.public_key().as_ref())}),
        },
    ])
}

struct Row {
    alg: Algorithm,
    calls: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

/// Runs the workers for one token; returns (calls, wall time, per-call latencies).
fn measure(
    v: &JwtValidator,
    token: &str,
    threads: usize,
    secs: u64,
) -> anyhow::Result<(u64, Duration, Vec<u64>)> {
    let window = Duration::from_secs(secs);
    let start = Instant::now();
    let per_thread = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || -> anyhow::Result<Vec<u64>> {
                    let rt = tokio::runtime::Builder::new_current_thread().build()?;
                    rt.block_on(async {
                        let mut lat = Vec::with_capacity(200_000);
                        let deadline = Instant::now() + window;
                        loop {
                            let t0 = Instant::now();
                            if t0 >= deadline {
                                break;
                            }
                            v.validate(token)
                                .await
                                .map_err(|e| anyhow::anyhow!("validation failed: {e}"))?;
                            lat.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        }
                        Ok(lat)
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a worker thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let elapsed = start.elapsed();
    let all: Vec<u64> = per_thread.into_iter().flatten().collect();
    Ok((all.len() as u64, elapsed, all))
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Duration::from_nanos(sorted[i.min(sorted.len() - 1)])
}

pub async fn run(args: JwtArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(args.secs >= 1, "--secs must be at least 1");
    let keys = keys()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("jwks.json");
    let jwks = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    std::fs::write(&path, jwks.to_string())?;
    let cfg = JwtConfig::new(
        vec![ISS.into()],
        vec![AUD.into()],
        JwksSource::File(path.clone()),
    );
    let v = JwtValidator::new(cfg).await?;

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "iss": ISS, "aud": AUD, "sub": "bench-agent", "tenant": "bench",
        "iat": now, "nbf": now, "exp": now + 3600,
    });
    let mut rows = Vec::new();
    for key in &keys {
        let mut header = Header::new(key.alg);
        header.kid = Some(key.kid.to_owned());
        let token = jsonwebtoken::encode(&header, &claims, &key.enc)
            .with_context(|| format!("signing a {:?} token", key.alg))?;
        let caller = v
            .validate(&token)
            .await
            .with_context(|| format!("the {:?} token must validate", key.alg))?;
        anyhow::ensure!(caller.tenant == "bench" && caller.agent == "bench-agent");

        let (v2, token2, threads, secs) = (v.clone(), token.clone(), args.threads, args.secs);
        let (calls, elapsed, mut lat) =
            tokio::task::spawn_blocking(move || measure(&v2, &token2, threads, secs)).await??;
        lat.sort_unstable();
        eprintln!("jwt {:?}: {calls} validations", key.alg);
        rows.push(Row {
            alg: key.alg,
            calls,
            elapsed,
            p50: percentile(&lat, 0.50),
            p99: percentile(&lat, 0.99),
        });
    }

    println!(
        "JWT validation, {} thread(s), {} s per algorithm, JWKS file with {} keys",
        args.threads,
        args.secs,
        keys.len()
    );
    println!(
        "{:<8} {:>14} {:>10} {:>10}",
        "alg", "validations/s", "p50 µs", "p99 µs"
    );
    for r in &rows {
        println!(
            "{:<8} {:>14.0} {:>10.1} {:>10.1}",
            format!("{:?}", r.alg),
            r.calls as f64 / r.elapsed.as_secs_f64(),
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
        );
    }
    Ok(())
}
