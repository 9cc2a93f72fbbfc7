//! Compiles the interception programs (`bpf/intercept.bpf.c`) with clang.
//!
//! Without clang (or the libbpf headers) the crate is built without them:
//! a warning says so, `Interceptor::load` reports it, and the node falls
//! back to nftables. With `CI=true` a missing compiler fails the build
//! instead, so CI never silently tests less. `DMSC_CLANG` names the
//! compiler to use.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=bpf");
    println!("cargo::rerun-if-env-changed=DMSC_CLANG");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rustc-check-cfg=cfg(dmsc_no_bpf)");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("intercept.bpf.o");
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => other,
        Err(_) => "x86",
    }
    .to_string();
    // Debian keeps asm/types.h under the multiarch include directory.
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let candidates: Vec<String> = match std::env::var("DMSC_CLANG") {
        Ok(c) => vec![c],
        Err(_) => [
            "clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    };
    let mut why = String::from("no clang found (install clang and libbpf-dev)");
    for cc in candidates {
        let mut cmd = Command::new(&cc);
        cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
            .arg(format!("-D__TARGET_ARCH_{arch}"));
        if let Some(m) = &multiarch {
            cmd.arg(format!("-I/usr/include/{m}"));
        }
        cmd.args(["-c", "bpf/intercept.bpf.c", "-o"]).arg(&out);
        match cmd.output() {
            Ok(o) if o.status.success() => return,
            Ok(o) => {
                why = format!("{cc} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
                break;
            }
            Err(e) => {
                if std::env::var("DMSC_CLANG").is_ok() {
                    why = format!("DMSC_CLANG={cc} cannot be run: {e}");
                }
                continue;
            }
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("dmsc-ebpf: cannot build the interception programs: {why}");
    }
    println!("cargo::warning=dmsc-ebpf: built without eBPF ({why}); interception will use the nftables fallback");
    println!("cargo::rustc-cfg=dmsc_no_bpf");
    std::fs::write(&out, b"").expect("write the empty object");
}
