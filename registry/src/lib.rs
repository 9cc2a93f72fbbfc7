//! dmsc-registry: the capability registry (planned; next issue).
//!
//! What it will own, and why it is shaped so: agent records (A2A agent cards
//! imported without loss: skills, tags, examples, modes, security schemes),
//! an index by tenant and tag, an intent matcher (BM25-style lexical scoring
//! with tag boosts, pluggable for a semantic scorer), and selection among
//! matching agents (healthy, circuit closed, power-of-two-choices on gossiped
//! load plus local in-flight counts). It is pure: no I/O and no tokio
//! networking, fed records by the node and asked questions, so it can be
//! property-tested and benchmarked alone (DESIGN.md, "Workspace").

#![forbid(unsafe_code)]
