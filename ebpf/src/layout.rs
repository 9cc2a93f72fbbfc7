//! The programs' map layouts (`bpf/intercept.bpf.c`), as arrays of u32:
//! IPv4 addresses in network order (as the kernel's `user_ip4`), ports in
//! host order.

use std::net::{Ipv4Addr, SocketAddrV4};

/// An address as the programs store it (network order in memory).
pub(crate) fn ip(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn from_ip(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// `dests` and `orig_by_peer` keys: `{ ip, port }`.
pub(crate) fn addr(a: SocketAddrV4) -> [u32; 2] {
    [ip(*a.ip()), u32::from(a.port())]
}

/// A `bindings` value: `{ binding, listener ip, listener port, flags }`;
/// flag bit 0: only the destination ports in the `ports` map.
pub(crate) fn binding(id: u32, listener: SocketAddrV4, port_filter: bool) -> [u32; 4] {
    [
        id,
        ip(*listener.ip()),
        u32::from(listener.port()),
        u32::from(port_filter),
    ]
}

/// Where a redirected connection was going, and who made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orig {
    pub dst: SocketAddrV4,
    /// The binding of the cgroup it came from.
    pub binding: u32,
    /// The bound cgroup's id (the inode of its directory).
    pub cgroup: u64,
    pub uid: u32,
    pub pid: u32,
}

/// An `orig_by_*` value: `{ ip, port, binding, cgroup lo, cgroup hi, uid, pid, 0 }`.
pub(crate) fn orig(v: [u32; 8]) -> Orig {
    Orig {
        dst: SocketAddrV4::new(from_ip(v[0]), v[1] as u16),
        binding: v[2],
        cgroup: u64::from(v[3]) | (u64::from(v[4]) << 32),
        uid: v[5],
        pid: v[6],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_network_order_in_memory_and_ports_host_order() {
        let a: SocketAddrV4 = "10.1.2.3:8080".parse().expect("addr");
        let k = addr(a);
        assert_eq!(k[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(k[1], 8080);
        let o = orig([k[0], 8080, 7, 0x1234, 0x1, 1000, 42, 0]);
        assert_eq!(
            o,
            Orig {
                dst: a,
                binding: 7,
                cgroup: 0x1_0000_1234,
                uid: 1000,
                pid: 42
            }
        );
    }
}
