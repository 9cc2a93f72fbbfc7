//! `.dmsc` names for unmodified agents: a small DNS responder.
//!
//! A query for a mesh name (`billing.acme.dmsc`, `invoice.cap.acme.dmsc`,
//! `mesh.acme.dmsc`) is answered with a virtual IPv4 address from the
//! configured range, stable per name for as long as the node runs; a
//! connect to it from a bound cgroup is intercepted (the range is in the
//! kernel's map) and the listener turns the address back into the name.
//! Anything else is relayed, bytes untouched, to the system's resolvers.
//!
//! The wire format is read and written here, without a DNS library: the
//! responder needs only a query's header and first question, and answers
//! with a copy of them plus at most one A record. Every length is checked
//! against the datagram; a malformed query gets no answer.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// Record types and classes this responder names.
const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
/// Answers for mesh names live this long (seconds).
const TTL: u32 = 30;

/// A query's first question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Lowercase, without the trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question ends in the datagram.
    end: usize,
}

/// Reads the first question of a standard query; `None` for anything else
/// (a response, another opcode, no question, a malformed name).
pub fn question(q: &[u8]) -> Option<Question> {
    if q.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([q[2], q[3]]);
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let qdcount = u16::from_be_bytes([q[4], q[5]]);
    if is_response || opcode != 0 || qdcount == 0 {
        return None;
    }
    let mut i = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        // (No compression pointers in a question's first name.)
        if len > 63 {
            return None;
        }
        let label = q.get(i..i + len)?;
        labels.push(String::from_utf8(label.to_vec()).ok()?.to_ascii_lowercase());
        i += len;
        if i > 12 + 255 {
            return None;
        }
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let qclass = u16::from_be_bytes([*q.get(i + 2)?, *q.get(i + 3)?]);
    Some(Question {
        name: labels.join("."),
        qtype,
        qclass,
        end: i + 4,
    })
}

/// The answer to `query` (whose first question is `q`): `Some(ip)` an A
/// record, `None` no record (NOERROR with no answer, or with `nxdomain`
/// the name does not exist).
pub fn answer(query: &[u8], q: &Question, a: Option<Ipv4Addr>, nxdomain: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.end + 16);
    out.extend_from_slice(&query[..2]); // id
                                        // QR, the query's opcode (0) and RD, RA; AA for our own names.
    let rd = query[2] & 0x01;
    out.push(0x80 | 0x04 | rd);
    out.push(0x80 | if nxdomain { 3 } else { 0 });
    out.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    out.extend_from_slice(&u16::from(a.is_some()).to_be_bytes()); // ANCOUNT
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    out.extend_from_slice(&query[12..q.end]);
    if let Some(ip) = a {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// A standard query (recursion desired) for `name`, class IN: what a stub
/// resolver sends (for tests and probes).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        q.push(l.len().min(63) as u8);
        q.extend_from_slice(&l.as_bytes()[..l.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// Virtual addresses for mesh names: stable per name (a hash of it into
/// the range, the next free one on a collision), both ways.
#[derive(Debug)]
pub struct Vips {
    base: u32,
    size: u32,
    by_name: HashMap<String, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, String>,
}

impl Vips {
    pub fn new(net: Ipv4Addr, prefix: u8) -> Vips {
        let size = 1u32 << (32 - u32::from(prefix.clamp(8, 30)));
        Vips {
            base: u32::from(net) & !(size - 1),
            size,
            by_name: HashMap::new(),
            by_ip: HashMap::new(),
        }
    }

    /// The address of `name` (allocated on first use); `None` when the
    /// range is full.
    pub fn of(&mut self, name: &str) -> Option<Ipv4Addr> {
        if let Some(ip) = self.by_name.get(name) {
            return Some(*ip);
        }
        if self.by_ip.len() as u32 >= self.size - 2 {
            return None;
        }
        use std::hash::{BuildHasher as _, BuildHasherDefault};
        let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(name) as u32;
        // Not the range's first and last addresses (network, broadcast).
        let usable = self.size - 2;
        for k in 0..usable {
            let ip = Ipv4Addr::from(self.base + 1 + (h.wrapping_add(k) % usable));
            if let std::collections::hash_map::Entry::Vacant(e) = self.by_ip.entry(ip) {
                e.insert(name.to_string());
                self.by_name.insert(name.to_string(), ip);
                return Some(ip);
            }
        }
        None
    }

    /// The mesh name of a virtual address given out before.
    pub fn name(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_ip.get(&ip).map(String::as_str)
    }
}

/// The first resolver of /etc/resolv.conf that is not `own` (port 53).
pub fn upstream(own: std::net::SocketAddr) -> Option<std::net::SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .find(|a| *a != own)
}

/// Answers DNS over UDP on `sock` until the node stops: mesh names from
/// `vips`, the rest relayed to `upstream` (none: SERVFAIL by silence).
pub async fn serve(
    sock: tokio::net::UdpSocket,
    vips: std::sync::Arc<std::sync::Mutex<Vips>>,
    upstream: Option<std::net::SocketAddr>,
) {
    let sock = std::sync::Arc::new(sock);
    // Relays in flight at once (each waits up to 2 s for its resolver).
    let relays = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let query = &buf[..n];
        let Some(q) = question(query) else {
            continue;
        };
        if q.name == "dmsc" || q.name.ends_with(".dmsc") {
            let valid = crate::ingress::parse_host(&q.name).is_ok();
            let ip = (valid && q.qtype == TYPE_A && q.qclass == CLASS_IN)
                .then(|| vips.lock().unwrap_or_else(|p| p.into_inner()).of(&q.name))
                .flatten();
            // A mesh name with no A record asked (AAAA, ...): no records,
            // not NXDOMAIN (which would fail the A lookup too).
            let _ = sock.send_to(&answer(query, &q, ip, !valid), from).await;
            continue;
        }
        let (Some(up), Ok(permit)) = (upstream, relays.clone().try_acquire_owned()) else {
            continue;
        };
        let (sock, query) = (sock.clone(), query.to_vec());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(relay) =
                tokio::net::UdpSocket::bind(if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
                    .await
            else {
                return;
            };
            if relay.send_to(&query, up).await.is_err() {
                return;
            }
            let mut back = vec![0u8; 4096];
            if let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), relay.recv(&mut back)).await
            {
                let _ = sock.send_to(&back[..n], from).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` of type `qtype`, id 0x1234, RD set.
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        super::query(0x1234, name, qtype)
    }

    #[test]
    fn a_query_is_read_and_answered_with_one_a_record() {
        let q = query("Billing.ACME.dmsc", TYPE_A);
        let parsed = question(&q).expect("question");
        assert_eq!(
            (parsed.name.as_str(), parsed.qtype),
            ("billing.acme.dmsc", 1)
        );
        let a = answer(&q, &parsed, Some(Ipv4Addr::new(198, 19, 0, 7)), false);
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert_eq!(a[2] & 0x80, 0x80, "a response");
        assert_eq!(a[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one answer");
        assert_eq!(&a[a.len() - 4..], &[198, 19, 0, 7]);
        let nx = answer(&q, &parsed, None, true);
        assert_eq!(nx[3] & 0x0f, 3, "NXDOMAIN");
        assert_eq!(u16::from_be_bytes([nx[6], nx[7]]), 0);
    }

    #[test]
    fn malformed_or_foreign_datagrams_are_not_questions() {
        let good = query("a.acme.dmsc", TYPE_A);
        assert!(question(&good[..11]).is_none());
        for cut in 12..good.len() {
            assert!(question(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut response = good.clone();
        response[2] |= 0x80;
        assert!(question(&response).is_none());
        let mut long = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 64];
        long.extend_from_slice(&[b'a'; 64]);
        assert!(question(&long).is_none());
        // Random bytes never panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5000 {
            let len = (x % 80) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> (i % 8)) as u8
                })
                .collect();
            let _ = question(&bytes);
        }
    }

    #[test]
    fn virtual_addresses_are_stable_distinct_and_inside_the_range() {
        let mut v = Vips::new(Ipv4Addr::new(198, 19, 0, 0), 16);
        let a = v.of("billing.acme.dmsc").expect("a");
        assert_eq!(v.of("billing.acme.dmsc"), Some(a));
        let b = v.of("search.acme.dmsc").expect("b");
        assert_ne!(a, b);
        assert_eq!(v.name(a), Some("billing.acme.dmsc"));
        for ip in [a, b] {
            assert_eq!(ip.octets()[..2], [198, 19]);
        }
        // A /30 has two usable addresses: a third name gets none.
        let mut small = Vips::new(Ipv4Addr::new(10, 0, 0, 0), 30);
        assert!(small.of("a.t.dmsc").is_some() && small.of("b.t.dmsc").is_some());
        assert_eq!(small.of("c.t.dmsc"), None);
    }
}
