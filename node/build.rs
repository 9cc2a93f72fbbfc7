//! Link the `dmsc-node` binary with packed relative relocations (RELR,
//! `-z pack-relative-relocs`, GNU ld >= 2.38 with glibc >= 2.36): the
//! position-independent binary's relocation table shrinks from about 1 MB
//! to a few KB, and the loader no longer touches a megabyte of it at every
//! start, which is most of an idle node's resident memory growth from
//! linking the embedding model's code (BENCHMARKS.md, "Issue 13").
//! Elsewhere (other linkers, other targets) nothing changes.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target == "x86_64-unknown-linux-gnu" || target == "aarch64-unknown-linux-gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
