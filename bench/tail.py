#!/usr/bin/env python3
"""A path's server-side latency per request, and what its slowest ran into.

    bench/tail.py trace.txt FRONT_PID

Reads the trace bench/compare.sh records with DMSC_BENCH_HOPS=1 (every
scheduler switch on the servers' CPU, their sends and `recvfrom`s). A
request starts when the front server (nginx's front worker, the dmsc
ingress; FRONT_PID or a child of it) first reads a client connection after
its last answer there, and ends when it writes the answer (`writev`).
Prints the distribution of that time and, for the slowest 1 % and for the
requests around the median, what ran on the CPU meanwhile and how many
other requests were in flight: whether a tail comes from queueing behind
other requests, from other work on the CPU, or from the path itself.
Run while the processes live (thread ids are matched through /proc).
"""
import collections
import importlib.util
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location('hops', os.path.join(HERE, 'hops.py'))
hops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hops)

SWITCH = re.compile(r'next_comm=(.*?) next_pid=(\d+)')
FD = re.compile(r'fd: 0x([0-9a-f]+)')


def read(path, front_pid):
    runs, reqs, reading, front = [], [], {}, {}
    cur = None
    for line in open(path, errors='replace'):
        p = line.split(None, 3)
        if len(p) < 3:
            continue
        try:
            tid, t = int(p[0]), float(p[1].rstrip(':'))
        except ValueError:
            continue
        event, rest = p[2].rstrip(':'), (p[3] if len(p) > 3 else '')
        if event == 'sched:sched_switch':
            m = SWITCH.search(rest)
            if not m:
                continue
            if cur:
                runs.append((cur[0], cur[1], t))
            cur = (m.group(1), t)
            continue
        if tid not in front:
            front[tid] = hops.owner(tid, {front_pid: 'front'}) is not None
        if not front[tid]:
            continue
        m = FD.search(rest)
        if not m:
            continue
        conn = (tid, int(m.group(1), 16))
        if event == 'syscalls:sys_enter_recvfrom':
            reading.setdefault(conn, t)
        elif event == 'syscalls:sys_enter_writev' and conn in reading:
            reqs.append((reading.pop(conn), t))
    return runs, reqs


def during(runs, start, end):
    """CPU time (us) by thread name within [start, end]."""
    c = collections.Counter()
    for name, s, e in runs:
        if e > start and s < end:
            c[name] += (min(e, end) - max(s, start)) * 1e6
    return c


def main():
    runs, reqs = read(sys.argv[1], int(sys.argv[2]))
    if not reqs:
        print('no requests found for that front server')
        return
    lat = sorted(e - s for s, e in reqs)
    n = len(lat)
    q = [lat[min(n - 1, int(n * f))] * 1e6 for f in (0.5, 0.9, 0.99, 0.999)]
    print(f'{n} requests, server side: p50 {q[0]:.0f} us, p90 {q[1]:.0f}, p99 {q[2]:.0f}, p99.9 {q[3]:.0f}')
    by_time = sorted(reqs, key=lambda r: r[0] - r[1])
    k = max(1, n // 100)
    groups = [('slowest 1 %', by_time[:k]), ('around the median', by_time[n // 2 - k // 2:n // 2 + k // 2 + 1])]
    for label, group in groups:
        cpu = collections.Counter()
        for s, e in group:
            cpu.update(during(runs, s, e))
        others = sum(sum(1 for s2, e2 in reqs if s2 < e and e2 > s) - 1 for s, e in group)
        mean = sum(e - s for s, e in group) / len(group) * 1e6
        print(f'{label} ({len(group)}, mean {mean:.0f} us): {others / len(group):.2f} other requests in flight; '
              'CPU time in them by thread: '
              + ', '.join(f'{name} {v / len(group):.0f} us' for name, v in cpu.most_common(6)))


if __name__ == '__main__':
    main()
