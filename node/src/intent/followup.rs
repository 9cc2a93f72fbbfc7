//! Follow-ups of intent-routed work: which agent has which task.
//!
//! An A2A client that sent a message to `mesh.<tenant>.dmsc` keeps using
//! that address for everything that follows: `tasks/get`, `tasks/cancel`,
//! `tasks/resubscribe` (0.3), `GetTask`, `CancelTask`, `SubscribeToTask`
//! (1.0), and messages carrying the task's `taskId` or `contextId`. Those
//! carry no text to route by, or text that would pick another agent, which
//! knows nothing of the task. So the node that routed by intent reads the
//! task and context ids of the agent's answer as it passes (a JSON answer
//! when it is small, an SSE stream event by event, never held back) and
//! remembers which agent made them; a follow-up naming one goes there.
//!
//! Why here: the ingress node is where both the request and the answer
//! pass, and the client keeps talking to it. The record is per node (a
//! client that switches nodes gets TaskNotFound and can call the agent by
//! name, which `dmsc-agent` told it), bounded ([`CAPACITY`] entries, the
//! least recently seen dropped first, each forgotten after [`TTL`]), and
//! scoped to the target tenant and the caller (its verified identity, or
//! the listener for anonymous callers), so one caller cannot steer another
//! caller's task by guessing its id.
//!
//! It also keeps the asks of ask mode ([`super::ask`]) by their task id
//! (`dmsc-ask-<id>`), with the text asked about, so that a caller that
//! answers in that task (its reply: an agent's name or number) gets its
//! original request routed to the agent it chose.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, SizeHint};
use serde_json::Value;

use crate::proto::a2a::{answer_refs, Ref};
use crate::proto::http::{Body, BoxError};

/// Entries kept per node (tasks, contexts and asks together).
pub const CAPACITY: usize = 10_000;
/// How long a task or context is remembered after it was last seen.
pub const TTL: Duration = Duration::from_secs(3600);
/// A JSON answer larger than this is not read for its ids (its frames
/// are held, by reference, until its end: an A2A Task with artifacts
/// easily passes 64 KiB, and a2a-sdk writes the artifacts before the ids).
pub const MAX_JSON: usize = 1024 * 1024;
/// An SSE line longer than this stops the reading of that stream.
const MAX_LINE: usize = 256 * 1024;
/// Original text of an ask kept for the reply that resolves it.
pub const MAX_ASK_TEXT: usize = 8 * 1024;

/// Whose work it is: the target tenant, and the caller (tenant and id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope(String);

impl Scope {
    pub fn new(tenant: &str, caller_tenant: &str, caller: &str) -> Scope {
        Scope(format!("{tenant}\n{caller_tenant}\n{caller}"))
    }
}

/// An ask waiting for a reply in its task.
#[derive(Debug, Clone, PartialEq)]
pub struct AskRecord {
    /// The ask id (without `dmsc-ask-`).
    pub id: String,
    /// The text asked about (empty if it was too long to keep).
    pub text: String,
    /// Candidate names, in the order offered.
    pub candidates: Vec<String>,
}

#[derive(Debug, Clone)]
enum Known {
    Agent(String),
    Ask(AskRecord),
}

type Key = (Scope, Ref);

/// The record: bounded, least recently seen first out, entries expire.
#[derive(Debug)]
pub struct Followups {
    cap: usize,
    ttl: Duration,
    map: HashMap<Key, (Known, Instant, u64)>,
    /// Insertion order, with the sequence number each entry had then
    /// (a stale pair is skipped when it comes out).
    order: VecDeque<(Key, u64)>,
    seq: u64,
}

impl Default for Followups {
    fn default() -> Self {
        Followups::new(CAPACITY, TTL)
    }
}

impl Followups {
    pub fn new(cap: usize, ttl: Duration) -> Followups {
        Followups {
            cap: cap.max(1),
            ttl,
            map: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn put(&mut self, key: Key, known: Known, now: Instant) {
        self.seq += 1;
        self.map.insert(key.clone(), (known, now, self.seq));
        self.order.push_back((key, self.seq));
        while self.map.len() > self.cap {
            let Some((k, s)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|e| e.2 == s) {
                self.map.remove(&k);
            }
        }
        if self.order.len() > 2 * self.cap {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|e| e.2 == *s));
        }
    }

    fn get(&mut self, key: &Key, now: Instant) -> Option<Known> {
        let (known, at, _) = self.map.get(key)?;
        if now.duration_since(*at) >= self.ttl {
            self.map.remove(key);
            return None;
        }
        Some(known.clone())
    }

    /// The ids an answer of `agent` named, for this scope.
    pub fn record(&mut self, scope: &Scope, refs: Vec<Ref>, agent: &str, now: Instant) {
        for r in refs {
            // an ask's own task is not an agent's
            if matches!(&r, Ref::Task(id) if id.starts_with(ASK_TASK_PREFIX)) {
                continue;
            }
            self.put((scope.clone(), r), Known::Agent(agent.to_string()), now);
        }
    }

    /// The agent that made the task or context, if this scope saw it.
    pub fn agent(&mut self, scope: &Scope, r: &Ref, now: Instant) -> Option<String> {
        match self.get(&(scope.clone(), r.clone()), now)? {
            Known::Agent(a) => Some(a),
            Known::Ask(_) => None,
        }
    }

    /// Keeps an ask for a reply in its task (`dmsc-ask-<id>`).
    pub fn remember_ask(&mut self, scope: &Scope, ask: AskRecord, now: Instant) {
        let task = format!("{ASK_TASK_PREFIX}{}", ask.id);
        self.put((scope.clone(), Ref::Task(task)), Known::Ask(ask), now);
    }

    /// The ask whose task id this is, if this scope was asked it.
    pub fn ask(&mut self, scope: &Scope, task: &str, now: Instant) -> Option<AskRecord> {
        match self.get(&(scope.clone(), Ref::Task(task.to_string())), now)? {
            Known::Ask(a) => Some(a),
            Known::Agent(_) => None,
        }
    }

    /// An ask answered: forgotten.
    pub fn forget_ask(&mut self, scope: &Scope, task: &str) {
        self.map
            .remove(&(scope.clone(), Ref::Task(task.to_string())));
    }
}

/// Task ids of asks start with this.
pub const ASK_TASK_PREFIX: &str = "dmsc-ask-";

/// The candidate a reply to an ask names: its name (any case) or its
/// number in the list (1-based), alone in the reply.
pub fn chosen<'a>(reply: &str, candidates: &'a [String]) -> Option<&'a String> {
    let r = reply
        .trim()
        .trim_matches(|c: char| c.is_ascii_punctuation() && c != '-' && c != '_')
        .trim();
    if let Ok(n) = r.parse::<usize>() {
        return n.checked_sub(1).and_then(|i| candidates.get(i));
    }
    let r = r.strip_prefix("http://").unwrap_or(r);
    let name = r.split('.').next().unwrap_or(r);
    candidates.iter().find(|c| c.eq_ignore_ascii_case(name))
}

/// The reply to an ask, rewritten into the request the caller first made:
/// its message's text becomes the text asked about (in the message's own
/// dialect), and the ask's task and context ids, which the chosen agent
/// never saw, are taken out.
pub fn with_asked_text(body: &[u8], text: &str) -> Option<Bytes> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let message = if v.get("method").is_some() {
        v.pointer_mut("/params/message")?
    } else {
        v.get_mut("message")?
    };
    let m = message.as_object_mut()?;
    if m.contains_key("content") {
        // A2A 0.3 HTTP+JSON
        m.insert("content".into(), serde_json::json!([{ "text": text }]));
    } else {
        let v03 = m.contains_key("kind")
            || m.get("parts")
                .and_then(Value::as_array)
                .is_some_and(|p| p.iter().any(|p| p.get("kind").is_some()));
        let part = if v03 {
            serde_json::json!({"kind": "text", "text": text})
        } else {
            serde_json::json!({ "text": text })
        };
        m.insert("parts".into(), Value::Array(vec![part]));
    }
    for k in ["taskId", "contextId"] {
        if m.get(k)
            .and_then(Value::as_str)
            .is_some_and(|id| id.starts_with(ASK_TASK_PREFIX))
        {
            m.remove(k);
        }
    }
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

/// The answer's body, read for task and context ids as it passes to the
/// caller: an SSE stream event by event, a JSON answer of at most
/// [`MAX_JSON`] bytes once whole. Nothing is held back: every frame goes
/// on as it comes; a JSON answer's frames are kept (reference-counted,
/// not copied) until its end. Other answers are returned as they are.
pub fn observe<F>(resp: hyper::Response<Body>, sink: F) -> hyper::Response<Body>
where
    F: Fn(Vec<Ref>) + Send + Sync + 'static,
{
    let ctype = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mode = if ctype.starts_with("text/event-stream") {
        Mode::Sse(Vec::new())
    } else if ctype.contains("json")
        && resp
            .body()
            .size_hint()
            .upper()
            .is_none_or(|n| n as usize <= MAX_JSON)
    {
        Mode::Json(Vec::new(), 0)
    } else {
        return resp;
    };
    resp.map(|inner| {
        Observed {
            inner,
            mode,
            sink: Some(Box::new(sink)),
        }
        .boxed()
    })
}

enum Mode {
    /// The bytes of an unfinished line.
    Sse(Vec<u8>),
    /// The frames so far, and their length.
    Json(Vec<Bytes>, usize),
}

type Sink = Box<dyn Fn(Vec<Ref>) + Send + Sync>;

struct Observed {
    inner: Body,
    mode: Mode,
    /// `None` once done (found, given up, or ended).
    sink: Option<Sink>,
}

impl Observed {
    fn data(&mut self, data: &Bytes) {
        let Some(sink) = &self.sink else {
            return;
        };
        match &mut self.mode {
            Mode::Json(chunks, len) => {
                *len += data.len();
                if *len > MAX_JSON {
                    self.sink = None;
                    chunks.clear();
                } else {
                    chunks.push(data.clone());
                }
            }
            Mode::Sse(carry) => {
                let mut rest: &[u8] = data;
                let mut found_task = false;
                while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                    let line: &[u8] = if carry.is_empty() {
                        &rest[..nl]
                    } else {
                        carry.extend_from_slice(&rest[..nl]);
                        carry
                    };
                    if let Some(json) = line.strip_prefix(b"data:") {
                        if let Ok(v) = serde_json::from_slice::<Value>(json) {
                            let refs = answer_refs(&v);
                            found_task |= refs.iter().any(|r| matches!(r, Ref::Task(_)));
                            if !refs.is_empty() {
                                sink(refs);
                            }
                        }
                    }
                    carry.clear();
                    rest = &rest[nl + 1..];
                }
                if found_task {
                    // the task is known: the rest of the stream passes unread
                    self.sink = None;
                    return;
                }
                carry.extend_from_slice(rest);
                if carry.len() > MAX_LINE {
                    self.sink = None;
                    carry.clear();
                }
            }
        }
    }

    fn end(&mut self) {
        let Some(sink) = self.sink.take() else {
            return;
        };
        if let Mode::Json(chunks, _) = &mut self.mode {
            let chunks = std::mem::take(chunks);
            let v: Option<Value> = match chunks.as_slice() {
                [one] => serde_json::from_slice(one).ok(),
                many => serde_json::from_slice(&many.concat()).ok(),
            };
            if let Some(v) = v {
                let refs = answer_refs(&v);
                if !refs.is_empty() {
                    sink(refs);
                }
            }
        }
    }
}

impl Drop for Observed {
    /// hyper stops polling a body once its declared length is written (no
    /// final `None`): the end is read here then. A body cut short does not
    /// parse, so nothing is recorded from it.
    fn drop(&mut self) {
        self.end();
    }
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let d = d.clone();
                    self.data(&d);
                }
                if self.inner.is_end_stream() {
                    self.end();
                }
            }
            Poll::Ready(None) => self.end(),
            // a failed body: what was read is not trusted
            Poll::Ready(Some(Err(_))) => self.sink = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::http::full;
    use std::sync::{Arc, Mutex};

    #[test]
    fn bounded_scoped_and_expiring() {
        let now = Instant::now();
        let mut f = Followups::new(3, Duration::from_secs(60));
        let a = Scope::new("acme", "acme", "alice");
        let b = Scope::new("acme", "acme", "bob");
        f.record(
            &a,
            vec![Ref::Task("t1".into()), Ref::Context("c1".into())],
            "payroll",
            now,
        );
        assert_eq!(
            f.agent(&a, &Ref::Task("t1".into()), now).as_deref(),
            Some("payroll")
        );
        assert_eq!(
            f.agent(&b, &Ref::Task("t1".into()), now),
            None,
            "another caller"
        );
        assert_eq!(
            f.agent(&a, &Ref::Task("t1".into()), now + Duration::from_secs(60)),
            None,
            "expired"
        );
        f.record(&a, vec![Ref::Task("t2".into())], "x", now);
        f.record(&a, vec![Ref::Task("t3".into())], "x", now);
        f.record(&a, vec![Ref::Task("t4".into())], "x", now);
        assert_eq!(f.len(), 3);
        assert_eq!(
            f.agent(&a, &Ref::Context("c1".into()), now),
            None,
            "oldest out"
        );
        assert_eq!(
            f.agent(&a, &Ref::Task("t4".into()), now).as_deref(),
            Some("x")
        );
        // seen again: moves to the back
        f.record(&a, vec![Ref::Task("t2".into())], "x", now);
        f.record(&a, vec![Ref::Task("t5".into())], "x", now);
        assert!(f.agent(&a, &Ref::Task("t2".into()), now).is_some());
        assert!(f.agent(&a, &Ref::Task("t3".into()), now).is_none());
        for i in 0..100 {
            f.record(&a, vec![Ref::Task(format!("n{i}"))], "x", now);
        }
        assert!(f.order.len() <= 6 + 1 && f.len() == 3);
    }

    #[test]
    fn asks_are_found_by_their_task_and_replies_name_a_candidate() {
        let now = Instant::now();
        let mut f = Followups::default();
        let a = Scope::new("acme", "acme", "alice");
        let ask = AskRecord {
            id: "ab".into(),
            text: "my pay".into(),
            candidates: vec!["payroll".into(), "benefits".into()],
        };
        f.remember_ask(&a, ask.clone(), now);
        assert_eq!(f.ask(&a, "dmsc-ask-ab", now), Some(ask.clone()));
        assert_eq!(f.agent(&a, &Ref::Task("dmsc-ask-ab".into()), now), None);
        let c = &ask.candidates;
        assert_eq!(chosen("Benefits", c), Some(&c[1]));
        assert_eq!(chosen(" 1. ", c), Some(&c[0]));
        assert_eq!(chosen("payroll.acme.dmsc", c), Some(&c[0]));
        assert_eq!(chosen("3", c), None);
        assert_eq!(chosen("0", c), None);
        assert_eq!(chosen("the first one", c), None);
    }

    #[test]
    fn a_reply_becomes_the_asked_request() {
        let reply = br#"{"jsonrpc":"2.0","id":3,"method":"message/send","params":{"message":{"kind":"message","role":"user","messageId":"m2","taskId":"dmsc-ask-ab","contextId":"dmsc-ask-ab","parts":[{"kind":"text","text":"2"}]}}}"#;
        let out = with_asked_text(reply, "my pay").expect("rewritten");
        let v: Value = serde_json::from_slice(&out).expect("json");
        let m = &v["params"]["message"];
        assert_eq!(
            m["parts"],
            serde_json::json!([{"kind": "text", "text": "my pay"}])
        );
        assert!(m.get("taskId").is_none() && m.get("contextId").is_none());
        assert_eq!(v["id"], 3);
        let reply10 = br#"{"jsonrpc":"2.0","id":"x","method":"SendMessage","params":{"message":{"role":"ROLE_USER","taskId":"dmsc-ask-ab","contextId":"mine","parts":[{"text":"payroll"}]}}}"#;
        let v: Value =
            serde_json::from_slice(&with_asked_text(reply10, "my pay").expect("rewritten"))
                .expect("json");
        let m = &v["params"]["message"];
        assert_eq!(m["parts"], serde_json::json!([{"text": "my pay"}]));
        assert_eq!(m["contextId"], "mine", "the caller's own context stays");
    }

    async fn drain(resp: hyper::Response<Body>) -> Bytes {
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn answers_are_read_as_they_pass() {
        let seen: Arc<Mutex<Vec<Ref>>> = Arc::default();
        let sink = {
            let seen = seen.clone();
            move |r: Vec<Ref>| seen.lock().expect("lock").extend(r)
        };
        // JSON, in one frame
        let json = r#"{"jsonrpc":"2.0","id":1,"result":{"kind":"task","id":"t","contextId":"c","status":{}}}"#;
        let mut r = hyper::Response::new(full(json));
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("hv"));
        assert_eq!(drain(observe(r, sink.clone())).await, json.as_bytes());
        assert_eq!(
            std::mem::take(&mut *seen.lock().expect("lock")),
            [Ref::Task("t".into()), Ref::Context("c".into())]
        );
        // SSE, split at every byte
        let sse = "event: x\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"statusUpdate\":{\"taskId\":\"t2\",\"contextId\":\"c2\"}}}\n\ndata: {\"result\":{\"task\":{\"id\":\"later\"}}}\n\n";
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = sse
            .bytes()
            .map(|b| Ok(Frame::data(Bytes::from(vec![b]))))
            .collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let mut r = hyper::Response::new(body);
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().expect("hv"));
        assert_eq!(drain(observe(r, sink.clone())).await, sse.as_bytes());
        assert_eq!(
            std::mem::take(&mut *seen.lock().expect("lock")),
            [Ref::Task("t2".into()), Ref::Context("c2".into())],
            "the first event with a task is enough"
        );
        // a Task whose artifacts (150 KB, written before its ids, as
        // a2a-sdk does) pass 64 KiB: read
        let artifacts = format!(r#"[{{"parts":[{{"text":"{}"}}]}}]"#, "a".repeat(150_000));
        let task = format!(
            r#"{{"result":{{"artifacts":{artifacts},"contextId":"c3","id":"t3","kind":"task","status":{{}}}}}}"#
        );
        let mut r = hyper::Response::new(full(task.clone()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("hv"));
        assert_eq!(drain(observe(r, sink.clone())).await.len(), task.len());
        assert_eq!(
            std::mem::take(&mut *seen.lock().expect("lock")),
            [Ref::Task("t3".into()), Ref::Context("c3".into())]
        );
        // larger than MAX_JSON: not read
        let big = format!(
            r#"{{"result":{{"id":"t","status":{{}},"pad":"{}"}}}}"#,
            "x".repeat(MAX_JSON)
        );
        let mut r = hyper::Response::new(full(big.clone()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("hv"));
        assert_eq!(drain(observe(r, sink)).await.len(), big.len());
        assert!(seen.lock().expect("lock").is_empty());
    }
}
