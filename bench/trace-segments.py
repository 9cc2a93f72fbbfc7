#!/usr/bin/env python3
"""Where one lightly loaded delegation's time goes, from the system calls of
the two nodes (`perf trace`, one request at a time).

    bench/trace-segments.py TRACE INGRESS_PID HOME_PID

Each request runs: the ingress node reads it from the client (`recvfrom`),
sends it over the overlay (`sendmsg`), the home node receives it
(`recvmmsg`), writes it to the agent (`sendto`), reads the answer
(`recvfrom`), sends it back (`sendmsg`), the ingress node receives it
(`recvmmsg`) and writes it to the client (`writev`). The segments between
those calls are the nodes' work (and the scheduler's wake-ups) on the
critical path; prints the median and p90 of each over all requests.
Tracing costs every system call something, so the segments come out about
twice as long as without it: read their shares, not their values.
"""
import os
import re
import statistics
import sys

LINE = re.compile(r'^\s*([0-9.]+) \(\s*([0-9.]+) ms\): [^/]*/(\d+) (\w+)\(.*\)\s+= (-?\d+)')


def main():
    path, ingress, home = sys.argv[1], sys.argv[2], sys.argv[3]
    tids = {}
    for pid, side in ((ingress, 'in'), (home, 'home')):
        try:
            for t in os.listdir(f'/proc/{pid}/task'):
                tids[t] = side
        except OSError:
            pass
    calls = []
    for line in open(path, errors='replace'):
        m = LINE.match(line)
        if not m:
            continue
        start, dur, tid, name, ret = float(m.group(1)), float(m.group(2)), m.group(3), m.group(4), int(m.group(5))
        if ret <= 0:
            continue
        side = tids.get(tid)
        if side is None:
            continue
        calls.append((start, start + dur, side, name))
    calls.sort()
    steps = [
        ('in', 'recvfrom', 'end'),
        ('in', 'sendmsg', 'start'),
        ('home', 'recvmmsg', 'end'),
        ('home', 'sendto', 'start'),
        ('home', 'recvfrom', 'end'),
        ('home', 'sendmsg', 'start'),
        ('in', 'recvmmsg', 'end'),
        ('in', 'writev', 'start'),
    ]
    names = [
        'ingress node: request read -> sent on the overlay',
        'overlay: sent -> home node has it',
        'home node: received -> written to the agent',
        'agent (and its wake-ups): written -> answer read',
        'home node: answer read -> sent on the overlay',
        'overlay: sent -> ingress node has it',
        'ingress node: received -> written to the client',
    ]
    segs = [[] for _ in names]
    totals = []
    i = 0
    while i < len(calls):
        if (calls[i][2], calls[i][3]) != ('in', 'recvfrom'):
            i += 1
            continue
        times, j, ok = [calls[i][1]], i + 1, True
        for side, name, edge in steps[1:]:
            while j < len(calls) and (calls[j][2], calls[j][3]) != (side, name):
                if (calls[j][2], calls[j][3]) == ('in', 'recvfrom'):
                    ok = False
                    break
                j += 1
            if not ok or j >= len(calls):
                ok = False
                break
            times.append(calls[j][1] if edge == 'end' else calls[j][0])
            j += 1
        if ok:
            for k in range(len(names)):
                segs[k].append((times[k + 1] - times[k]) * 1000)
            totals.append((times[-1] - times[0]) * 1000)
            i = j
        else:
            i += 1
    if not totals:
        print('no whole request found in the trace')
        return
    print(f'{len(totals)} requests; microseconds, median / p90')
    for name, v in zip(names, segs):
        v.sort()
        print(f'{statistics.median(v):8.1f} {v[int(len(v) * 0.9)]:8.1f}  {name}')
    totals.sort()
    print(f'{statistics.median(totals):8.1f} {totals[int(len(totals) * 0.9)]:8.1f}  in all, request read -> answer written')


if __name__ == '__main__':
    main()
