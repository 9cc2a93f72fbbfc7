// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// Transparent interception for dmsc: outbound TCP connects of processes in
// a bound cgroup v2 group, to selected destinations, are rewritten to the
// node's interception listener; the original destination is kept so that
// the node can route the connection as if the agent had called it.
//
// Flow (IPv4, and IPv4 as ::ffff:a.b.c.d on dual-stack sockets):
//   cgroup/connect4|6    the client's connect(): match binding and
//                        destination, remember the original by socket
//                        cookie, rewrite the destination to the listener.
//   sockops              ACTIVE_ESTABLISHED on the client socket: copy the
//                        original to a map keyed by the client's own
//                        address (ip, port), the one key the node's accepted
//                        socket shares with it (its peer address).
//   cgroup/getpeername4|6  the client asks whom it is connected to: the
//                        original destination, so the redirect stays
//                        invisible.
//
// Map layouts are arrays of u32 (mirrored in src/layout.rs); addresses are
// IPv4 in network order, ports in host order.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_DEPTH 16

// bindings: cgroup id -> { binding id, listener ip (network order),
// listener port (host order), flags (bit 0: only the ports in `ports`) }
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 256);
    __type(key, __u64);
    __type(value, __u32[4]);
} bindings SEC(".maps");

// dests: { ip (network order), port (host order; 0 = any) } -> { target, flags }
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u32[2]);
    __type(value, __u32[2]);
} dests SEC(".maps");

struct vip_key {
    __u32 prefixlen;
    __u32 ip;
};

// vips: the virtual ranges of `.dmsc` names (any port).
struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, 16);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct vip_key);
    __type(value, __u32);
} vips SEC(".maps");

// ports: { binding id, port } -> 1: the only destination ports of a
// binding whose flags have bit 0 set.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u32[2]);
    __type(value, __u32);
} ports SEC(".maps");

// config[0]: the node's own cgroup id (never redirected).
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} config SEC(".maps");

// An original destination: { ip, port, binding, cgroup lo, cgroup hi,
// uid, pid, 0 }.
typedef __u32 orig_t[8];

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, orig_t);
} orig_by_cookie SEC(".maps");

// { client ip (network order), client port (host order) } -> orig
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, __u32[2]);
    __type(value, orig_t);
} orig_by_peer SEC(".maps");

// stats: 0 redirected, 1 not recorded (map full: let through), 2 peer
// entries written.
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 i)
{
    __u64 *c = bpf_map_lookup_elem(&stats, &i);
    if (c)
        *c += 1;
}

// The common part of connect4 and connect6: if the caller is bound and
// `ip:port` (IPv4, network order / host order) is selected, remember the
// original and return the binding (whose listener to rewrite to).
static __always_inline __u32 *redirect(void *ctx, __u32 ip, __u32 port)
{
    __u32 zero = 0;
    __u64 *node = bpf_map_lookup_elem(&config, &zero);
    __u64 me = bpf_get_current_cgroup_id();
    if (node && *node == me)
        return 0;
    // The deepest bound cgroup among the caller's ancestors (itself included).
    __u32 *b = 0;
    __u64 bound = 0;
#pragma unroll
    for (int l = 1; l <= MAX_DEPTH; l++) {
        __u64 id = bpf_get_current_ancestor_cgroup_id(l);
        if (!id)
            break;
        __u32 *hit = bpf_map_lookup_elem(&bindings, &id);
        if (hit) {
            b = hit;
            bound = id;
        }
    }
    if (!b)
        return 0;
    if (ip == b[1] && port == b[2])
        return 0; // the listener itself
    __u32 key[2] = {ip, port};
    __u32 *d = bpf_map_lookup_elem(&dests, &key);
    if (!d) {
        key[1] = 0;
        d = bpf_map_lookup_elem(&dests, &key);
    }
    if (!d) {
        struct vip_key vk = {.prefixlen = 32, .ip = ip};
        if (!bpf_map_lookup_elem(&vips, &vk))
            return 0;
    }
    if (b[3] & 1) {
        __u32 pk[2] = {b[0], port};
        if (!bpf_map_lookup_elem(&ports, &pk))
            return 0; // not one of the binding's ports
    }
    __u64 ug = bpf_get_current_uid_gid();
    __u64 pt = bpf_get_current_pid_tgid();
    orig_t o = {ip, port, b[0], (__u32)bound, (__u32)(bound >> 32), (__u32)ug, (__u32)(pt >> 32), 0};
    __u64 cookie = bpf_get_socket_cookie(ctx);
    if (bpf_map_update_elem(&orig_by_cookie, &cookie, &o, BPF_ANY)) {
        count(1);
        return 0;
    }
    count(0);
    return b;
}

SEC("cgroup/connect4")
int dmsc_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    __u32 *b = redirect(ctx, ctx->user_ip4, bpf_ntohs((__u16)ctx->user_port));
    if (b) {
        ctx->user_ip4 = b[1];
        ctx->user_port = bpf_htons((__u16)b[2]);
    }
    return 1;
}

static __always_inline int v4_mapped(__u32 a0, __u32 a1, __u32 a2)
{
    return a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff);
}

// A dual-stack socket (AF_INET6) connecting to an IPv4 address as
// ::ffff:a.b.c.d, as grpc and many runtimes do, arrives here rather than
// at connect4. Only such addresses are redirected (the listener is IPv4);
// real IPv6 destinations pass untouched.
SEC("cgroup/connect6")
int dmsc_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    if (!v4_mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2]))
        return 1;
    __u32 *b = redirect(ctx, ctx->user_ip6[3], bpf_ntohs((__u16)ctx->user_port));
    if (b) {
        ctx->user_ip6[3] = b[1];
        ctx->user_port = bpf_htons((__u16)b[2]);
    }
    return 1;
}

// Established: file the original under the client's own address, and ask
// for state callbacks. Closed: drop what is left of it (an entry the node
// never took, because the client went away before the node accepted,
// must not be there for whoever binds the same local address next).
SEC("sockops")
int dmsc_sockops(struct bpf_sock_ops *s)
{
    __u32 op = s->op;
    if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB)
        return 1;
    if (op == BPF_SOCK_OPS_STATE_CB && s->args[1] != BPF_TCP_CLOSE)
        return 1;
    // Every field read up front, each by its own load (volatile): clang
    // would otherwise fold the two branches' loads into one through a
    // computed context pointer, which the verifier refuses.
    __u32 family = s->family;
    __u32 l4 = *(volatile __u32 *)&s->local_ip4;
    __u32 a0 = *(volatile __u32 *)&s->local_ip6[0];
    __u32 a1 = *(volatile __u32 *)&s->local_ip6[1];
    __u32 a2 = *(volatile __u32 *)&s->local_ip6[2];
    __u32 a3 = *(volatile __u32 *)&s->local_ip6[3];
    __u32 local;
    if (family == 2 /* AF_INET */)
        local = l4;
    else if (family == 10 /* AF_INET6 */ && v4_mapped(a0, a1, a2))
        local = a3;
    else
        return 1;
    __u64 cookie = bpf_get_socket_cookie(s);
    __u32 *o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
    if (!o)
        return 1;
    __u32 key[2] = {local, s->local_port};
    if (op == BPF_SOCK_OPS_STATE_CB) {
        bpf_map_delete_elem(&orig_by_peer, &key);
        bpf_map_delete_elem(&orig_by_cookie, &cookie);
        return 1;
    }
    if (!bpf_map_update_elem(&orig_by_peer, &key, o, BPF_ANY))
        count(2);
    bpf_sock_ops_cb_flags_set(s, BPF_SOCK_OPS_STATE_CB_FLAG);
    return 1;
}

SEC("cgroup/getpeername4")
int dmsc_getpeername4(struct bpf_sock_addr *ctx)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    __u32 *o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
    if (!o)
        return 1;
    ctx->user_ip4 = o[0];
    ctx->user_port = bpf_htons((__u16)o[1]);
    return 1;
}

SEC("cgroup/getpeername6")
int dmsc_getpeername6(struct bpf_sock_addr *ctx)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    __u32 *o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
    if (!o)
        return 1;
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
    ctx->user_ip6[3] = o[0];
    ctx->user_port = bpf_htons((__u16)o[1]);
    return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
