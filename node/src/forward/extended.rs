//! The authenticated ("extended") agent card, rewritten on its way back.
//!
//! The well-known card is answered by the home node from its rewritten copy
//! ([`super::local`]). The extended card cannot be: the agent chooses it per
//! caller (by the caller's credentials), so the request goes to the agent and
//! its answer is rewritten here, with the same rewrite
//! ([`AgentCard::rewrite_urls`] to `http://<agent>.<tenant>.dmsc`, both
//! dialects' URL fields) before it leaves the home node. This runs in
//! [`super::local::deliver_local`], so local callers and delegations arriving
//! over the overlay are covered alike. A2A SDKs fetch this card on their own
//! and then use its URLs; passed on as the agent wrote it, it would hand the
//! caller the agent's real address.
//!
//! Recognized requests ([`crate::proto::a2a`]): JSON-RPC `POST` (any path)
//! whose body's `method` is `agent/getAuthenticatedExtendedCard` (A2A 0.3)
//! or `GetExtendedAgentCard` (A2A 1.0), the card being the `result`; REST
//! `GET` of a path ending in `/v1/card` or `/agent/authenticatedExtendedCard`
//! (0.3) or `/extendedAgentCard` (1.0). Telling a JSON-RPC request needs its
//! body: [`peek`] reads it (up to [`PEEK_LIMIT`]) and hands the agent the
//! same bytes.
//!
//! Over gRPC (A2A 1.0 `GetExtendedAgentCard`, 0.3 `GetAgentCard`) the card
//! is protobuf, which is not rewritten: the call is refused with
//! INVALID_ARGUMENT and the reason, before it reaches the agent.
//!
//! Fail closed: a successful (2xx) answer with a JSON (or no) content type
//! is taken as the card. It is held (up to [`MAX_CARD_BYTES`]) and must be a
//! valid card (or a JSON-RPC response whose `result` is one); if it is too
//! large, not JSON, compressed, or not a valid card, the caller gets a
//! `unreachable` (502) error in its request's dialect instead (a JSON-RPC
//! error, `id` echoed, over 200, for a JSON-RPC request), never the
//! agent's bytes. Anything
//! else (an error status, a JSON-RPC `error`, a non-JSON content type) is
//! not a card and passes through unchanged.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use dmsc_registry::card::MAX_CARD_BYTES;
use dmsc_registry::AgentCard;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame};
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Response};
use serde_json::Value;
use tokio::time::Instant;

use super::body::prefixed;
use super::local::{mesh_url, LocalAgent};
use crate::proto::a2a;
use crate::proto::http::{full, Body, BoxError, ErrorKind, MeshError};
use crate::proto::outcome::Failure;

/// How much of a `POST` body is read to find its JSON-RPC method. A request
/// for the card is a few dozen bytes; a body still undecided after this
/// much (a JSON object not yet closed) is taken as something else and goes
/// on streaming. Equal to the default `max_buffered_body`, so a request the
/// ingress buffered whole is always judged whole.
pub(crate) const PEEK_LIMIT: usize = 1 << 20;

/// Which kind of extended-card request a delivery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CardAsk {
    /// REST `GET`: the answer is the card.
    Rest,
    /// JSON-RPC: the answer's `result` is the card.
    JsonRpc,
}

/// A REST request for the extended card.
pub(crate) fn rest_ask(method: &Method, path: &str) -> Option<CardAsk> {
    (method == Method::GET && a2a::is_extended_card_path(path)).then_some(CardAsk::Rest)
}

/// True when the body of this request must be looked into: a `POST` that
/// may be JSON-RPC. Not gRPC (its bidirectional streams must not wait on a
/// read-ahead), and not a body declared larger than [`PEEK_LIMIT`]. The
/// content type is not trusted: the A2A SDKs read a JSON-RPC body whatever
/// it says.
pub(crate) fn may_be_jsonrpc(method: &Method, headers: &HeaderMap, body: &Body) -> bool {
    method == Method::POST
        && !crate::proto::http::is_grpc(headers)
        && !body.is_end_stream()
        && body
            .size_hint()
            .exact()
            .is_none_or(|n| n as usize <= PEEK_LIMIT)
}

/// Reads the start of `body` until it is known whether it is one JSON-RPC
/// request for the extended card (the whole body read and parsed), or that
/// it is not (it does not start with `{`, its first JSON value is complete
/// and is not such a request, or [`PEEK_LIMIT`] passed). Returns the verdict
/// and the body to send on: the same bytes, then whatever was not read yet.
pub(crate) async fn peek(mut body: Body) -> Result<(bool, Body), BoxError> {
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut seen = BytesMut::new();
    let verdict = loop {
        let Some(frame) = body.frame().await.transpose()? else {
            // The whole body: judged as the agent will parse it.
            return Ok((a2a::asks_extended_card(&seen), full(seen.freeze())));
        };
        let trailers = frame.is_trailers();
        if let Some(d) = frame.data_ref() {
            // Most bodies tell at their first byte (not `{`): no copy then.
            let first = d.iter().find(|b| !b.is_ascii_whitespace());
            if seen.is_empty() && first.is_some_and(|b| *b != b'{') {
                frames.push_back(frame);
                break false;
            }
            seen.extend_from_slice(d);
        }
        frames.push_back(frame);
        if trailers {
            // A JSON-RPC client sends no trailers.
            break false;
        }
        if body.is_end_stream() {
            let ask = a2a::asks_extended_card(&seen);
            return Ok((ask, full(seen.freeze())));
        }
        if let Some(v) = undecided_or(&seen) {
            break v;
        }
        if seen.len() > PEEK_LIMIT {
            break false;
        }
    };
    Ok((verdict, prefixed(frames, body)))
}

/// `None` while the bytes so far may still become a card request; else
/// whether they are one.
fn undecided_or(seen: &[u8]) -> Option<bool> {
    let start = seen.iter().position(|b| !b.is_ascii_whitespace())?;
    if seen[start] != b'{' {
        return Some(false);
    }
    // Only a closing brace can end the first value: parse only then.
    let last = seen.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if seen[last] != b'}' {
        return None;
    }
    match serde_json::Deserializer::from_slice(seen)
        .into_iter::<Value>()
        .next()
    {
        // More bytes follow a complete object: the agent's parser refuses
        // such a body, so it is no card request; but a request for the card
        // followed by whitespace is, so judge the value itself.
        Some(Ok(v)) => Some(
            v.get("method")
                .and_then(Value::as_str)
                .is_some_and(|m| a2a::EXTENDED_CARD_METHODS.contains(&m)),
        ),
        Some(Err(e)) if e.is_eof() => None,
        _ => Some(false),
    }
}

/// The agent's answer to an extended-card request, with the card's URLs
/// rewritten to the mesh address; or, for an answer that claims to be the
/// card but cannot be rewritten, a failure (so its bytes never reach the
/// caller). See the module header for which answers are cards.
pub(crate) async fn rewrite_answer(
    agent: &LocalAgent,
    me: &str,
    ask: CardAsk,
    resp: Response<Body>,
    deadline: Instant,
) -> Result<Response<Body>, Failure> {
    if !resp.status().is_success() {
        return Ok(resp);
    }
    let json = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| {
            let essence = v.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/json")
                || essence.to_ascii_lowercase().ends_with("+json")
        });
    if !json {
        return Ok(resp);
    }
    let refuse = |why: String| {
        Failure::MaybeDelivered(
            MeshError::new(
                ErrorKind::Unreachable,
                me,
                format!(
                    "agent `{}` answered the request for its extended agent card with {why}; the mesh passes a card on only with its URLs rewritten to {}/ (so that the agent's address stays hidden), and this one could not be",
                    agent.id,
                    mesh_url(&agent.id)
                ),
            )
            .agent(&agent.id),
        )
    };
    let (mut parts, body) = resp.into_parts();
    if let Some(enc) = parts
        .headers
        .get(CONTENT_ENCODING)
        .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(refuse(format!(
            "a body in content-encoding `{}`",
            String::from_utf8_lossy(enc.as_bytes())
        )));
    }
    let held = match tokio::time::timeout_at(deadline, read_limited(body, MAX_CARD_BYTES)).await {
        Err(_) => {
            return Err(Failure::MaybeDelivered(
                MeshError::new(
                    ErrorKind::Timeout,
                    me,
                    format!(
                        "agent `{}` did not finish its extended agent card within the deadline",
                        agent.id
                    ),
                )
                .agent(&agent.id),
            ))
        }
        Ok(Err(Held::TooLarge)) => {
            return Err(refuse(format!(
                "more than the {MAX_CARD_BYTES}-byte card limit"
            )))
        }
        Ok(Err(Held::Failed(e))) => return Err(refuse(format!("a body that failed: {e}"))),
        Ok(Ok(b)) => b,
    };
    let Ok(value) = serde_json::from_slice::<Value>(&held) else {
        return Err(refuse("a body that is not JSON".into()));
    };
    let mesh = mesh_url(&agent.id);
    let rewritten = match (ask, value) {
        (CardAsk::Rest, card) => rewrite_card(card, &mesh, &agent.base),
        (CardAsk::JsonRpc, Value::Object(mut envelope)) => match envelope.remove("result") {
            Some(card) => rewrite_card(card, &mesh, &agent.base).map(|card| {
                envelope.insert("result".into(), card);
                Value::Object(envelope)
            }),
            // A JSON-RPC error (not configured, unauthenticated): no card.
            None if envelope.contains_key("error") => {
                return Ok(Response::from_parts(parts, full(held)))
            }
            None => Err("no `result` and no `error`".to_string()),
        },
        (CardAsk::JsonRpc, _) => Err("not a JSON-RPC response object".to_string()),
    };
    let rewritten = rewritten
        .map_err(|why| refuse(format!("a body that is not a valid agent card ({why})")))?;
    let bytes = Bytes::from(serde_json::to_vec(&rewritten).unwrap_or_default());
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(Response::from_parts(parts, full(bytes)))
}

/// The same rewrite the well-known card gets (fitted to the registered URL
/// `base`); the card must be valid.
fn rewrite_card(card: Value, mesh: &str, base: &hyper::Uri) -> Result<Value, String> {
    let mut card = AgentCard::from_value(card).map_err(|e| e.to_string())?;
    card.fit_to(&base.to_string());
    card.rewrite_urls(mesh);
    Ok(card.to_json())
}

enum Held {
    TooLarge,
    Failed(BoxError),
}

/// The whole body, unless it is over `limit` bytes.
async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, Held> {
    if body.size_hint().lower() as usize > limit {
        return Err(Held::TooLarge);
    }
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Held::Failed)?;
        if let Some(d) = frame.data_ref() {
            if out.len() + d.len() > limit {
                return Err(Held::TooLarge);
            }
            out.extend_from_slice(d);
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    async fn all(body: Body) -> Bytes {
        body.collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn peeking_keeps_every_byte_and_finds_the_method() {
        let cases: [(&[&'static str], bool); 6] = [
            (
                &[
                    r#"{"jsonrpc":"2.0","id":1,"#,
                    r#""method":"GetExtendedAgentCard"}"#,
                ],
                true,
            ),
            (
                &[
                    r#"{"jsonrpc":"2.0","id":1,"method":"agent/getAuthenticatedExtendedCard"}"#,
                    "\n",
                ],
                true,
            ),
            (
                &[
                    r#"{"jsonrpc":"2.0","id":1,"method":"message/send","params":{}}"#,
                    "more",
                ],
                false,
            ),
            (&["data: x\n\n", "data: y\n\n"], false),
            (&["  ", r#"{"method":"GetExtendedAgentCard"}"#], true),
            (&[r#"{"method":"#, r#""GetExtendedAgentCard"} {"#], false),
        ];
        for (parts, want) in cases {
            let (ask, body) = peek(chunks(parts)).await.expect("peek");
            assert_eq!(ask, want, "{parts:?}");
            assert_eq!(all(body).await, parts.concat(), "{parts:?}");
        }
    }
}
