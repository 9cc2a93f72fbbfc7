//! Membership states from chitchat's view plus heartbeat progress (sans-I/O).
//!
//! chitchat answers "alive or dead" (phi-accrual over heartbeat arrivals).
//! Operators also want the moment in between: a node whose heartbeat has not
//! advanced for a few gossip intervals is `suspect` before the detector
//! declares it `dead`. And a node that announced its departure is `left`,
//! whatever the detector says later. The tracker is fed observations with
//! explicit times, so it is tested without a clock.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// What `status` shows for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Suspect,
    Dead,
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
        }
    }
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One observation of a node (a chitchat id: name + generation).
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    pub heartbeat: u64,
    /// chitchat's failure detector says alive.
    pub live: bool,
    /// The node set the `left` key.
    pub left: bool,
}

#[derive(Debug)]
struct Seen {
    heartbeat: u64,
    changed_at: Instant,
    first_seen: Instant,
    ever_live: bool,
    obs: Observation,
}

/// Remembers when each node's heartbeat last advanced.
#[derive(Debug)]
pub struct MembershipTracker<K> {
    suspect_after: Duration,
    seen: HashMap<K, Seen>,
}

impl<K: std::hash::Hash + Eq + Clone> MembershipTracker<K> {
    pub fn new(suspect_after: Duration) -> Self {
        MembershipTracker {
            suspect_after,
            seen: HashMap::new(),
        }
    }

    /// Records an observation made at `now`.
    pub fn observe(&mut self, key: &K, obs: Observation, now: Instant) {
        match self.seen.get_mut(key) {
            Some(s) => {
                if obs.heartbeat > s.heartbeat {
                    s.heartbeat = obs.heartbeat;
                    s.changed_at = now;
                }
                s.ever_live |= obs.live;
                s.obs = obs;
            }
            None => {
                self.seen.insert(
                    key.clone(),
                    Seen {
                        heartbeat: obs.heartbeat,
                        changed_at: now,
                        first_seen: now,
                        ever_live: obs.live,
                        obs,
                    },
                );
            }
        }
    }

    /// Forgets nodes not in `keep` (chitchat garbage-collected them).
    pub fn retain(&mut self, keep: impl Fn(&K) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }

    /// State and time since the heartbeat last advanced.
    pub fn state(&self, key: &K, now: Instant) -> Option<(MemberState, Duration)> {
        let s = self.seen.get(key)?;
        let quiet = now.saturating_duration_since(s.changed_at);
        let state = if s.obs.left {
            MemberState::Left
        } else if !s.obs.live && !s.ever_live {
            // Just learned of it; the failure detector has no samples yet.
            // Not dead: unconfirmed, until it is live or stays silent too long.
            if now.saturating_duration_since(s.first_seen) > self.suspect_after * 2 {
                MemberState::Dead
            } else {
                MemberState::Suspect
            }
        } else if !s.obs.live {
            MemberState::Dead
        } else if quiet > self.suspect_after {
            MemberState::Suspect
        } else {
            MemberState::Alive
        };
        Some((state, quiet))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(heartbeat: u64, live: bool, left: bool) -> Observation {
        Observation {
            heartbeat,
            live,
            left,
        }
    }

    #[test]
    fn alive_then_suspect_then_dead() {
        let t0 = Instant::now();
        let mut t = MembershipTracker::new(Duration::from_secs(1));
        t.observe(&"a", obs(1, true, false), t0);
        assert_eq!(t.state(&"a", t0).map(|s| s.0), Some(MemberState::Alive));
        // Heartbeat keeps advancing: stays alive.
        t.observe(&"a", obs(2, true, false), t0 + Duration::from_millis(900));
        assert_eq!(
            t.state(&"a", t0 + Duration::from_millis(1800)).map(|s| s.0),
            Some(MemberState::Alive)
        );
        // Heartbeat stalls past the bound while chitchat still says live.
        t.observe(&"a", obs(2, true, false), t0 + Duration::from_secs(2));
        assert_eq!(
            t.state(&"a", t0 + Duration::from_secs(2)).map(|s| s.0),
            Some(MemberState::Suspect)
        );
        t.observe(&"a", obs(2, false, false), t0 + Duration::from_secs(3));
        let (state, quiet) = t.state(&"a", t0 + Duration::from_secs(3)).expect("seen");
        assert_eq!(state, MemberState::Dead);
        assert_eq!(quiet, Duration::from_millis(2100));
    }

    #[test]
    fn a_new_node_is_suspect_not_dead_until_confirmed() {
        let t0 = Instant::now();
        let mut t = MembershipTracker::new(Duration::from_secs(1));
        t.observe(&"n", obs(1, false, false), t0);
        assert_eq!(t.state(&"n", t0).map(|s| s.0), Some(MemberState::Suspect));
        t.observe(&"n", obs(2, true, false), t0 + Duration::from_millis(300));
        assert_eq!(
            t.state(&"n", t0 + Duration::from_millis(300)).map(|s| s.0),
            Some(MemberState::Alive)
        );
        // Never confirmed and silent for long: dead.
        t.observe(&"m", obs(1, false, false), t0);
        assert_eq!(
            t.state(&"m", t0 + Duration::from_secs(3)).map(|s| s.0),
            Some(MemberState::Dead)
        );
    }

    #[test]
    fn left_wins_over_dead_and_unknown_is_none() {
        let t0 = Instant::now();
        let mut t = MembershipTracker::new(Duration::from_secs(1));
        t.observe(&"b", obs(5, false, true), t0);
        assert_eq!(t.state(&"b", t0).map(|s| s.0), Some(MemberState::Left));
        assert!(t.state(&"zz", t0).is_none());
        t.retain(|k| *k != "b");
        assert!(t.state(&"b", t0).is_none());
    }
}
