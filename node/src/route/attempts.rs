//! Retry decisions for one delegation, as a sans-I/O state machine: the
//! forwarding loop asks which candidates to leave out, reports each attempt's
//! failure, and is told whom to charge (the agent's circuit, the path's to
//! its home node, or nobody) and whether to
//! try the next candidate or stop with an error. No clocks, sockets or
//! registry here, so every rule is tested on values.
//!
//! The rules (docs/delegation.md):
//! - a failure that certainly happened before the agent saw the request
//!   (refused connection, unknown at the home node, home node unreachable)
//!   moves on to the next candidate, if the body can be sent again;
//! - one that may have reached the agent is retried only for idempotent
//!   methods with a replayable body, and never after a timeout (the
//!   deadline is spent);
//! - the caller's own failures (bad or cut body) and a home node's policy
//!   refusal are never retried and never charged to the agent;
//! - a failed path to the home node (no stream, or the connection lost) is
//!   charged to the path, not the agent, and retried by the same rules as
//!   the agent's failures (before or after the request was sent);
//! - at most `retries` further candidates; a candidate whose circuit is
//!   open is skipped and counts as one;
//! - a response is held back from the caller (until it is whole, or the
//!   hold limit or the deadline is reached) only while losing it could
//!   still be retried: idempotent, replayable, with an attempt left, and
//!   not a stream (SSE, gRPC), which must flow as it comes. A response lost
//!   while held is a maybe-delivered failure like any other; once handed
//!   over, it is the caller's, and a later cut reaches it as an error.

use dmsc_registry::AgentId;

use crate::proto::http::{ErrorKind, MeshError};
use crate::proto::outcome::Failure;

/// What to do after a failed attempt.
#[derive(Debug)]
pub enum Next {
    /// Try the next candidate.
    Retry,
    /// Give the caller this error.
    Stop(MeshError),
}

/// Whom a failed attempt counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    Nobody,
    /// The agent (its circuit breaker and error rate).
    Agent,
    /// This node's circuit for the path to the agent's home node.
    Path,
}

/// The verdict on one failed attempt.
#[derive(Debug)]
pub struct Verdict {
    pub charge: Charge,
    pub next: Next,
}

/// The attempts of one delegation.
#[derive(Debug)]
pub struct Attempts {
    exclude: Vec<AgentId>,
    last: Option<MeshError>,
    made: u32,
    max: u32,
    replayable: bool,
    idempotent: bool,
}

impl Attempts {
    /// `retries` further candidates at most; `replayable`: the body is
    /// buffered; `idempotent`: the method may safely be repeated.
    pub fn new(retries: u32, replayable: bool, idempotent: bool) -> Attempts {
        Attempts {
            exclude: Vec::new(),
            last: None,
            made: 0,
            max: retries.saturating_add(1),
            replayable,
            idempotent,
        }
    }

    /// Candidates already tried or skipped (left out of the next selection).
    pub fn excluded(&self) -> &[AgentId] {
        &self.exclude
    }

    /// Starts the next attempt; false when the budget is spent.
    pub fn begin(&mut self) -> bool {
        if self.made >= self.max {
            return false;
        }
        self.made += 1;
        true
    }

    /// Attempts made so far (the one in progress included).
    pub fn made(&self) -> u32 {
        self.made
    }

    /// The candidate's circuit did not admit the request: leave it out.
    pub fn skip(&mut self, id: AgentId) {
        self.exclude.push(id);
    }

    /// Passes over a candidate the tenant policy does not allow: it is
    /// excluded and the attempt in progress is not counted (nothing was
    /// tried; the candidates are finite, so this ends).
    pub fn pass_over(&mut self, id: AgentId) {
        self.exclude.push(id);
        self.made = self.made.saturating_sub(1);
    }

    /// Whether the response of the attempt in progress, of content type
    /// `content_type`, is held back until it is whole (up to the hold
    /// limit): only when its loss could be retried on another candidate.
    pub fn holds_response(&self, content_type: Option<&str>) -> bool {
        self.replayable && self.idempotent && self.made < self.max && !streams(content_type)
    }

    /// Judges a failed attempt at `id`.
    pub fn failed(&mut self, id: AgentId, failure: Failure) -> Verdict {
        match failure {
            Failure::Caller(e) => Verdict {
                charge: Charge::Nobody,
                next: Next::Stop(e),
            },
            // A home node's tenant policy refused: another candidate of the
            // same tenant would be refused alike, and the agent did nothing.
            Failure::NotDelivered(e)
                if matches!(e.kind, ErrorKind::Forbidden | ErrorKind::PolicyViolation) =>
            {
                Verdict {
                    charge: Charge::Nobody,
                    next: Next::Stop(e),
                }
            }
            // A target's rate limit at its home node, or a home node that
            // is full or shutting down: the agent did nothing wrong;
            // another replica may have room.
            Failure::NotDelivered(e)
                if matches!(e.kind, ErrorKind::RateLimited | ErrorKind::Overloaded) =>
            {
                let mut v = self.after(id, self.replayable, e);
                v.charge = Charge::Nobody;
                v
            }
            Failure::NotDelivered(e) => self.after(id, self.may_retry(false, &e), e),
            Failure::MaybeDelivered(e) => self.after(id, self.may_retry(true, &e), e),
            Failure::Path {
                error,
                maybe_delivered,
            } => {
                let retry = self.may_retry(maybe_delivered, &error);
                let mut v = self.after(id, retry, error);
                v.charge = Charge::Path;
                v
            }
        }
    }

    /// Whether another candidate may get the request: one that certainly
    /// did not reach the agent, if the body can be sent again; one that may
    /// have, only for an idempotent method and never after a timeout.
    fn may_retry(&self, maybe_delivered: bool, e: &MeshError) -> bool {
        self.replayable && (!maybe_delivered || (self.idempotent && e.kind != ErrorKind::Timeout))
    }

    /// A failure charged to the agent: try the next candidate, or stop.
    fn after(&mut self, id: AgentId, retry: bool, mut e: MeshError) -> Verdict {
        // The error names the agent it is about (`error.data.agent`).
        if e.agent.is_none() {
            e.agent = Some(id.to_string());
        }
        let next = if retry {
            self.exclude.push(id);
            self.last = Some(e);
            Next::Retry
        } else {
            Next::Stop(e)
        };
        Verdict {
            charge: Charge::Agent,
            next,
        }
    }

    /// Selection found no (further) candidate: the error to give, naming
    /// the last failure if there was one.
    pub fn no_candidate(&mut self, me: &str, e: MeshError) -> MeshError {
        match self.last.take() {
            Some(prev) => MeshError {
                retry_after: prev.retry_after,
                agent: prev.agent,
                ..MeshError::new(
                    prev.kind,
                    me,
                    format!("{}; no other candidate: {}", prev.detail, e.detail),
                )
            },
            None => e,
        }
    }

    /// The budget is spent: the last failure, or that nothing admitted it.
    pub fn exhausted(&mut self, me: &str) -> MeshError {
        self.last.take().unwrap_or_else(|| {
            MeshError::new(
                ErrorKind::NoneAvailable,
                me,
                "no candidate admitted the request",
            )
        })
    }
}

/// A response that is a stream by its content type (server-sent events,
/// newline-delimited JSON, gRPC, whose unary and streaming calls look
/// alike): it flows to the caller as it comes, never held back.
pub fn streams(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or(ct).trim();
    [
        "text/event-stream",
        "application/x-ndjson",
        "application/jsonl",
    ]
    .iter()
    .any(|s| essence.eq_ignore_ascii_case(s))
        || essence
            .get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: &str) -> AgentId {
        AgentId::new("acme", n)
    }

    fn err(kind: ErrorKind) -> MeshError {
        MeshError::new(kind, "n1", "it failed")
    }

    fn retried(v: &Verdict) -> bool {
        matches!(v.next, Next::Retry)
    }

    #[test]
    fn not_delivered_moves_on_only_with_a_replayable_body() {
        let mut a = Attempts::new(2, true, false);
        assert!(a.begin());
        let v = a.failed(id("a"), Failure::NotDelivered(err(ErrorKind::Unreachable)));
        assert!(retried(&v) && v.charge == Charge::Agent);
        assert_eq!(a.excluded(), [id("a")]);
        let mut streamed = Attempts::new(2, false, true);
        assert!(streamed.begin());
        let v = streamed.failed(id("a"), Failure::NotDelivered(err(ErrorKind::Unreachable)));
        assert!(!retried(&v) && v.charge == Charge::Agent);
    }

    #[test]
    fn maybe_delivered_is_retried_only_when_idempotent_replayable_and_not_a_timeout() {
        for (replayable, idempotent, kind, retry) in [
            (true, true, ErrorKind::Unreachable, true),
            (true, false, ErrorKind::Unreachable, false),
            (false, true, ErrorKind::Unreachable, false),
            (true, true, ErrorKind::Timeout, false),
        ] {
            let mut a = Attempts::new(2, replayable, idempotent);
            a.begin();
            let v = a.failed(id("a"), Failure::MaybeDelivered(err(kind)));
            assert_eq!(retried(&v), retry, "{replayable} {idempotent} {kind:?}");
            assert!(v.charge == Charge::Agent);
        }
    }

    #[test]
    fn a_failed_path_is_charged_to_the_path_and_retried_like_the_agents_failures() {
        for (maybe_delivered, replayable, idempotent, kind, retry) in [
            (false, true, false, ErrorKind::Unreachable, true),
            (false, false, true, ErrorKind::Unreachable, false),
            (true, true, true, ErrorKind::Unreachable, true),
            (true, true, false, ErrorKind::Unreachable, false),
            (true, true, true, ErrorKind::Timeout, false),
        ] {
            let mut a = Attempts::new(2, replayable, idempotent);
            a.begin();
            let v = a.failed(
                id("a"),
                Failure::Path {
                    error: err(kind),
                    maybe_delivered,
                },
            );
            let case = format!("{maybe_delivered} {replayable} {idempotent} {kind:?}");
            assert_eq!(retried(&v), retry, "{case}");
            assert_eq!(v.charge, Charge::Path, "{case}");
        }
    }

    #[test]
    fn the_callers_failures_and_policy_refusals_stop_and_charge_nobody() {
        let mut a = Attempts::new(2, true, true);
        a.begin();
        let v = a.failed(id("a"), Failure::Caller(err(ErrorKind::BadRequest)));
        assert!(!retried(&v) && v.charge == Charge::Nobody);
        let v = a.failed(id("a"), Failure::NotDelivered(err(ErrorKind::Forbidden)));
        assert!(!retried(&v) && v.charge == Charge::Nobody);
        assert!(a.excluded().is_empty());
    }

    #[test]
    fn a_targets_rate_limit_tries_another_replica_and_charges_nobody() {
        let mut a = Attempts::new(1, true, false);
        a.begin();
        let limited = err(ErrorKind::RateLimited).retry_after(std::time::Duration::from_secs(2));
        let v = a.failed(id("a"), Failure::NotDelivered(limited));
        assert!(retried(&v) && v.charge == Charge::Nobody);
        // No other replica: the caller gets the 429 with its wait.
        let e = a.no_candidate("n1", err(ErrorKind::UnknownAgent));
        assert_eq!(e.kind, ErrorKind::RateLimited);
        assert_eq!(e.retry_after, Some(std::time::Duration::from_secs(2)));
        // A streamed body cannot go to another replica.
        let mut a = Attempts::new(1, false, false);
        a.begin();
        let v = a.failed(id("a"), Failure::NotDelivered(err(ErrorKind::RateLimited)));
        assert!(!retried(&v) && v.charge == Charge::Nobody);
    }

    #[test]
    fn a_home_node_shutting_down_sends_to_another_replica_and_charges_nobody() {
        let mut a = Attempts::new(1, true, false);
        a.begin();
        let v = a.failed(id("a"), Failure::NotDelivered(err(ErrorKind::Overloaded)));
        assert!(retried(&v) && v.charge == Charge::Nobody);
        assert_eq!(a.excluded(), &[id("a")]);
    }

    #[test]
    fn the_budget_is_retries_plus_one_and_skips_count() {
        let mut a = Attempts::new(1, true, true);
        assert!(a.begin());
        a.skip(id("open-circuit"));
        assert!(a.begin());
        assert!(!a.begin(), "two attempts for one retry");
        assert_eq!(a.made(), 2);
        assert_eq!(a.exhausted("n1").kind, ErrorKind::NoneAvailable);
    }

    #[test]
    fn no_candidate_names_the_last_failure() {
        let mut a = Attempts::new(2, true, false);
        a.begin();
        a.failed(id("a"), Failure::NotDelivered(err(ErrorKind::Unreachable)));
        let e = a.no_candidate("n1", err(ErrorKind::NoneAvailable));
        assert_eq!(e.kind, ErrorKind::Unreachable);
        assert_eq!(
            e.agent.as_deref(),
            Some("acme/a"),
            "names the agent that failed"
        );
        assert!(e.detail.contains("no other candidate"), "{}", e.detail);
        let mut fresh = Attempts::new(2, true, false);
        assert_eq!(
            fresh.no_candidate("n1", err(ErrorKind::NoMatch)).kind,
            ErrorKind::NoMatch
        );
    }

    #[test]
    fn a_response_is_held_only_while_its_loss_could_be_retried() {
        for (replayable, idempotent, hold) in [
            (true, true, true),
            (true, false, false),
            (false, true, false),
        ] {
            let mut a = Attempts::new(1, replayable, idempotent);
            a.begin();
            assert_eq!(
                a.holds_response(Some("application/json")),
                hold,
                "{replayable} {idempotent}"
            );
        }
        // The last attempt: nothing to retry on, so nothing to hold for.
        let mut a = Attempts::new(1, true, true);
        a.begin();
        assert!(a.holds_response(None));
        a.begin();
        assert!(!a.holds_response(None));
    }

    #[test]
    fn streams_flow_and_are_never_held() {
        let mut a = Attempts::new(2, true, true);
        a.begin();
        for ct in [
            "text/event-stream",
            "Text/Event-Stream; charset=utf-8",
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web",
            "application/x-ndjson",
        ] {
            assert!(streams(Some(ct)), "{ct}");
            assert!(!a.holds_response(Some(ct)), "{ct}");
        }
        for ct in [
            None,
            Some("text/plain"),
            Some("application/json"),
            Some("app"),
        ] {
            assert!(!streams(ct), "{ct:?}");
            assert!(a.holds_response(ct), "{ct:?}");
        }
    }

    #[test]
    fn a_response_lost_while_held_is_retried_like_any_maybe_delivered_failure() {
        let lost = || {
            Failure::MaybeDelivered(MeshError::new(
                ErrorKind::Unreachable,
                "n1",
                "home node `n2` lost mid-response",
            ))
        };
        let mut a = Attempts::new(2, true, true);
        a.begin();
        assert!(a.holds_response(None));
        let v = a.failed(id("a"), lost());
        assert!(retried(&v) && v.charge == Charge::Agent);
        let mut post = Attempts::new(2, true, false);
        post.begin();
        assert!(!post.holds_response(None));
        assert!(!retried(&post.failed(id("a"), lost())));
    }
}
