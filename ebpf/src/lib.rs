//! dmsc-ebpf: transparent interception of agent traffic (planned).
//!
//! Plan: eBPF programs written in C (compiled by clang; this toolchain has no
//! rust-src/bpf-linker for Rust eBPF) and loaded with aya: a cgroup
//! `connect4/6` hook that rewrites agents' outbound connections to the local
//! node's ingress and records the original destination, so agents need no
//! proxy settings and no code change. An iptables `REDIRECT` fallback covers
//! kernels without the needed hooks. Tests that load programs need root and
//! say so when they skip; CI runs as root.
