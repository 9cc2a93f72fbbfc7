#!/usr/bin/env python3
"""Where a profile's CPU goes, by owner.

    perf script --no-inline -i PROFILE > samples.txt
    bench/perf-owners.py samples.txt [OWNER]

Each sample is charged to the nearest frame, from the leaf up, of a crate
that owns the work; generic crates (core, alloc, std, bytes, http, serde,
the allocator, tokio's I/O and timer plumbing, the kernel, libc) are charged
to their caller, so a `memmove` or a `malloc` counts for the code that asked
for it. The kernel's share under each owner is shown beside it. With OWNER
(e.g. `dmsc_node::forward::h1`), also lists that owner's frames and leaves.
"""
import collections
import re
import sys

GENERIC = {
    'core', 'alloc', 'std', 'bytes', 'http', 'hashbrown', 'serde', 'serde_core',
    'serde_json', 'futures_util', 'futures_core', 'pin_project_lite', 'tracing',
    'tracing_core', 'smallvec', 'itoa', 'ryu', 'base64', 'sha2', 'httparse', 'hex',
    'time', 'tinyvec', 'slab', 'tokio_util', 'http_body', 'http_body_util',
    'postcard', 'memchr',
}


def read_samples(path):
    samples, cur = [], None
    for line in open(path, errors='replace'):
        if not line.strip():
            if cur:
                samples.append(cur)
            cur = None
            continue
        if not line.startswith((' ', '\t')):
            cur = []
            continue
        if cur is None:
            continue
        parts = line.strip().split(' ', 1)
        if len(parts) < 2:
            continue
        m = re.match(r'(.*) \((.*)\)$', parts[1])
        sym, dso = (m.group(1), m.group(2)) if m else (parts[1], '')
        cur.append((re.sub(r'\+0x[0-9a-f]+$', '', sym), dso))
    if cur:
        samples.append(cur)
    return samples


def crate(sym):
    s = sym.lstrip('<&*').replace('mut ', '').replace('dyn ', '')
    m = re.match(r'([A-Za-z_][A-Za-z0-9_]*)::', s)
    return m.group(1) if m else None


def owner(sample):
    for sym, dso in sample:
        if 'kernel' in dso or 'libc' in dso or 'vdso' in dso:
            continue
        c = crate(sym)
        if c is None or c in GENERIC:
            continue
        if c == 'tokio' and any(k in sym for k in ('io::', 'net::', 'sync::', 'time::')):
            continue
        if c == 'dmsc_node':
            m = re.match(r'.*?dmsc_node::([a-z_]+)(::([a-z_0-9]+))?', sym.lstrip('<&*'))
            if m:
                sub = m.group(3)
                c = 'dmsc_node::' + m.group(1) + ('::' + sub if sub and sub[0].islower() else '')
        return c
    return 'kernel only' if sample and 'kernel' in sample[0][1] else 'unknown'


def main():
    samples = read_samples(sys.argv[1])
    total = len(samples) or 1
    shares, kernel = collections.Counter(), collections.Counter()
    for s in samples:
        o = owner(s)
        shares[o] += 1
        if s and 'kernel' in s[0][1]:
            kernel[o] += 1
    print(f'{len(samples)} samples')
    for o, n in shares.most_common(40):
        print(f'{100 * n / total:6.2f}%  {o}  (kernel {100 * kernel[o] / total:.2f}%)')
    if len(sys.argv) > 2:
        want = sys.argv[2]
        frames = collections.Counter()
        for s in samples:
            if owner(s) != want:
                continue
            own = next((sym for sym, _ in s if crate(sym) and want.split('::')[0] in sym), '?')
            frames[(own[:90], s[0][0][:70])] += 1
        print(f'-- {want}: frame <- leaf')
        for (o, leaf), n in frames.most_common(30):
            print(f'{100 * n / total:6.2f}%  {o}  <-  {leaf}')


if __name__ == '__main__':
    main()
