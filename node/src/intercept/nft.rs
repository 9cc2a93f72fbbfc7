//! The nftables fallback: interception where eBPF is unavailable (a build
//! without clang, a kernel without cgroup BPF) or where the binding is a
//! user id rather than a cgroup.
//!
//! Each binding gets a listener of its own on 127.0.0.1 (an ephemeral
//! port) and two kinds of rule in one table of this node's own,
//! `inet dmsc_<node>`:
//!
//! - in the nat `output` hook, connects by the binding's processes (`meta
//!   skuid U`, or `socket cgroupv2 level L "<path>"`) to a selected
//!   destination are redirected to the binding's port; the listener reads
//!   the original destination back with `SO_ORIGINAL_DST`;
//! - in the filter `output` hook, anyone else's connection to that port is
//!   reset, so the port that accepted a connection names who made it (a
//!   process cannot pose as a binding by dialling its port).
//!
//! The table is written whole, in one `nft -f -` transaction (add, delete,
//! add: atomic, and no error when it was not there), every time a binding
//! changes; it is deleted when interception stops and, in case the node
//! crashed, when it starts. Only this table is touched: other tables'
//! rules stay as they are (one that already redirects locally generated
//! traffic is named in a warning, since the two would compete).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};

/// Who a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Sockets owned by this user id.
    Uid(u32),
    /// Sockets of processes in this cgroup v2 group or below it: `path` is
    /// relative to /sys/fs/cgroup (nft resolves it there), `level` its
    /// depth in the cgroup2 hierarchy.
    Cgroup { path: String, level: usize },
    /// Every socket: the table is in the binding's own network namespace.
    All,
}

impl Match {
    fn expr(&self) -> String {
        match self {
            Match::Uid(u) => format!("meta skuid {u}"),
            Match::Cgroup { path, level } => {
                format!("socket cgroupv2 level {level} \"{path}\"")
            }
            Match::All => String::new(),
        }
    }

    /// The match for a cgroup directory (`mount`: where cgroup2 is
    /// mounted). nft only resolves paths below /sys/fs/cgroup.
    pub fn cgroup(mount: &Path, dir: &Path) -> Result<Match, String> {
        let path = dir.strip_prefix("/sys/fs/cgroup").map_err(|_| {
            format!(
                "cgroup {}: nftables matches cgroups below /sys/fs/cgroup only",
                dir.display()
            )
        })?;
        let level = dir
            .strip_prefix(mount)
            .map_err(|_| format!("cgroup {} is not below {}", dir.display(), mount.display()))?
            .components()
            .count();
        if level == 0 {
            return Err("the cgroup2 root cannot be a binding (every process is in it)".into());
        }
        let path = path.display().to_string();
        if path.contains('"') || path.contains('\n') {
            return Err(format!(
                "cgroup path {path:?}: quotes and new lines are not allowed"
            ));
        }
        Ok(Match::Cgroup { path, level })
    }
}

/// One binding's rules: its processes, its listener's port, and the only
/// destination ports it intercepts (empty: any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub who: Match,
    pub port: u16,
    pub only_ports: Vec<u16>,
}

impl Rule {
    fn dport(&self) -> String {
        if self.only_ports.is_empty() {
            return String::new();
        }
        let list: Vec<String> = self.only_ports.iter().map(u16::to_string).collect();
        format!(" tcp dport {{ {} }}", list.join(", "))
    }
}

/// The table of the node called `node`.
pub fn table_name(node: &str) -> String {
    let clean: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    // (nft names are at most 256 bytes; node names are far shorter.)
    format!("dmsc_{clean}")
}

/// The whole table: destinations (`ADDR:PORT`, or port 0 for any port of
/// that address), the virtual range, and each binding's redirect and guard.
/// Applying it replaces whatever the table held.
pub fn ruleset(
    table: &str,
    rules: &[Rule],
    dests: &[SocketAddrV4],
    vip_range: (Ipv4Addr, u8),
) -> String {
    let mut s = format!("table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n");
    let with_port: Vec<String> = dests
        .iter()
        .filter(|d| d.port() != 0)
        .map(|d| format!("{} . {}", d.ip(), d.port()))
        .collect();
    let mut any_port: Vec<String> = dests
        .iter()
        .filter(|d| d.port() == 0)
        .map(|d| d.ip().to_string())
        .collect();
    any_port.push(format!("{}/{}", vip_range.0, vip_range.1));
    s.push_str("  set dests {\n    type ipv4_addr . inet_service\n");
    if !with_port.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", with_port.join(", "));
    }
    s.push_str("  }\n  set hosts {\n    type ipv4_addr\n    flags interval\n    auto-merge\n");
    let _ = writeln!(s, "    elements = {{ {} }}", any_port.join(", "));
    s.push_str("  }\n");
    s.push_str("  chain to_node {\n    type nat hook output priority -100; policy accept;\n");
    for r in rules {
        let who = match r.who.expr() {
            e if e.is_empty() => e,
            e => format!(" {e}"),
        };
        let dport = r.dport();
        let _ = writeln!(
            s,
            "    meta l4proto tcp{who}{dport} ip daddr . tcp dport @dests redirect to :{}",
            r.port
        );
        let _ = writeln!(
            s,
            "    meta l4proto tcp{who}{dport} ip daddr @hosts redirect to :{}",
            r.port
        );
    }
    s.push_str("  }\n");
    s.push_str("  chain port_guard {\n    type filter hook output priority 0; policy accept;\n");
    // The binding's own sockets pass; everything else to its port is
    // reset. (Not one `!=` rule: a match that cannot be evaluated, e.g. a
    // process in a cgroup shallower than the level, or a socket without
    // an owner, fails both `==` and `!=`, and would slip through.) A
    // namespace's own table guards nothing: all of it is the binding.
    for r in rules.iter().filter(|r| r.who != Match::All) {
        let _ = writeln!(
            s,
            "    ip daddr 127.0.0.0/8 tcp dport {} {} accept",
            r.port,
            r.who.expr()
        );
        let _ = writeln!(
            s,
            "    ip daddr 127.0.0.0/8 tcp dport {} reject with tcp reset",
            r.port
        );
    }
    s.push_str("  }\n}\n");
    s
}

/// Deletes the table (no error when it is not there).
pub fn remove_script(table: &str) -> String {
    remove_script_of("inet", table)
}

/// Deletes a table of `family` (no error when it is not there).
pub fn remove_script_of(family: &str, table: &str) -> String {
    format!("table {family} {table}\ndelete table {family} {table}\n")
}

/// Runs `nft -f -` with `script`; the error is nft's own message.
pub fn apply(script: &str) -> Result<(), String> {
    apply_in(None, script)
}

/// [`apply`] inside the named network namespace (`None`: this one).
pub fn apply_in(netns: Option<&str>, script: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut cmd = match netns {
        None => Command::new("nft"),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
    };
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft ({e}): install nftables"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft refused the interception rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether nft runs here (and the caller may change the ruleset).
pub fn available() -> Result<(), String> {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run nft ({e}): install nftables"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft cannot read the ruleset: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Other tables whose nat output chains redirect or rewrite destinations
/// (they would compete with ours for the same connections).
pub fn competing_tables(ours: &str) -> Vec<String> {
    match Command::new("nft")
        .args(["list", "ruleset"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            competing_in(&String::from_utf8_lossy(&out.stdout), ours)
        }
        _ => Vec::new(),
    }
}

fn competing_in(ruleset: &str, ours: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut table: Option<String> = None;
    let mut nat_output = false;
    for line in ruleset.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("table ") {
            table = rest.strip_suffix('{').map(|t| t.trim().to_string());
            nat_output = false;
        } else if l.starts_with("chain ") {
            nat_output = false;
        } else if l.starts_with("type nat hook output") {
            nat_output = true;
        } else if nat_output && (l.contains("redirect") || l.contains("dnat")) {
            if let Some(t) = &table {
                let name = t.rsplit(' ').next().unwrap_or(t);
                if name != ours && !found.contains(t) {
                    found.push(t.clone());
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_redirects_each_binding_and_guards_its_port() {
        let rules = [
            Rule {
                who: Match::Uid(1001),
                port: 40001,
                only_ports: vec![],
            },
            Rule {
                who: Match::Cgroup {
                    path: "unified/agents/a".into(),
                    level: 2,
                },
                port: 40002,
                only_ports: vec![80, 8080],
            },
        ];
        let dests = [
            "10.0.0.5:8080".parse().expect("addr"),
            "10.0.0.6:0".parse().expect("addr"),
        ];
        let s = ruleset(
            "dmsc_n1",
            &rules,
            &dests,
            ("198.19.0.0".parse().expect("ip"), 16),
        );
        assert!(
            s.starts_with("table inet dmsc_n1\ndelete table inet dmsc_n1\ntable inet dmsc_n1 {\n")
        );
        assert!(s.contains("elements = { 10.0.0.5 . 8080 }"), "{s}");
        assert!(s.contains("elements = { 10.0.0.6, 198.19.0.0/16 }"), "{s}");
        assert!(s.contains(
            "meta l4proto tcp meta skuid 1001 ip daddr . tcp dport @dests redirect to :40001"
        ));
        assert!(s.contains(
            "meta l4proto tcp socket cgroupv2 level 2 \"unified/agents/a\" tcp dport { 80, 8080 } ip daddr @hosts redirect to :40002"
        ));
        assert!(s.contains(
            "    ip daddr 127.0.0.0/8 tcp dport 40001 meta skuid 1001 accept\n    ip daddr 127.0.0.0/8 tcp dport 40001 reject with tcp reset\n"
        ));
        assert!(s.contains(
            "tcp dport 40002 socket cgroupv2 level 2 \"unified/agents/a\" accept\n    ip daddr 127.0.0.0/8 tcp dport 40002 reject with tcp reset\n"
        ));
        // A namespace's own table: every socket, and no guard.
        let ns = Rule {
            who: Match::All,
            port: 40003,
            only_ports: vec![],
        };
        let s3 = ruleset("t", &[ns], &[], ("198.19.0.0".parse().expect("ip"), 16));
        assert!(
            s3.contains("    meta l4proto tcp ip daddr @hosts redirect to :40003\n"),
            "{s3}"
        );
        assert!(!s3.contains("reject"), "{s3}");
        // No destination with a port: the set stays, empty.
        let s = ruleset(
            "t",
            &rules[..1],
            &[],
            ("198.19.0.0".parse().expect("ip"), 16),
        );
        assert!(
            s.contains("set dests {\n    type ipv4_addr . inet_service\n  }"),
            "{s}"
        );
    }

    #[test]
    fn names_and_cgroup_paths() {
        assert_eq!(table_name("edge-1.Paris"), "dmsc_edge_1_paris");
        let m = Match::cgroup(
            Path::new("/sys/fs/cgroup/unified"),
            Path::new("/sys/fs/cgroup/unified/a/b"),
        )
        .expect("match");
        assert_eq!(
            m,
            Match::Cgroup {
                path: "unified/a/b".into(),
                level: 2
            }
        );
        assert!(Match::cgroup(Path::new("/cg"), Path::new("/cg/a")).is_err());
        assert!(Match::cgroup(Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/cgroup")).is_err());
    }

    #[test]
    fn a_table_that_redirects_local_traffic_is_named() {
        let rs = "table ip mine {\n\tchain out {\n\t\ttype nat hook output priority -100; policy accept;\n\t\ttcp dport 80 redirect to :3128\n\t}\n}\ntable inet dmsc_n1 {\n\tchain redirect {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tmeta skuid 5 redirect to :1\n\t}\n}\ntable ip other {\n\tchain pre {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\tdnat to 1.2.3.4\n\t}\n}\n";
        assert_eq!(competing_in(rs, "dmsc_n1"), vec!["ip mine".to_string()]);
    }
}
