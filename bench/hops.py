#!/usr/bin/env python3
"""Where a light request's time goes on the servers' CPU, hop by hop.

    perf record -C 0 -e sched:sched_switch -e 'syscalls:sys_enter_send*' \
        -e syscalls:sys_enter_writev -e syscalls:sys_enter_write -- sleep 5
    perf script -F tid,time,event,trace > trace.txt
    bench/hops.py trace.txt REQUESTS PID=LABEL...

Every server of a path is pinned to one CPU (bench/compare.sh), so that
CPU's scheduler switches are the whole story: each time a thread runs,
from being switched in to being switched out, is one run. For each thread
of the labelled processes this prints, per request: how many runs, the CPU
time, and, for runs that sent something (a `send*`/`write*` system call:
the request or the answer going on to the next hop), the median time from
being switched in to the first send (the hop's reaction, on the critical
path) and from the first send to being switched out (work after it, which
the next hop waits for when it does not preempt). Threads are named
`LABEL/comm`; TIDs are matched to labels through /proc when the trace is
read, so run this while the processes live (compare.sh does).
"""
import collections
import re
import statistics
import sys

SWITCH = re.compile(r'prev_pid=(\d+) .*next_pid=(\d+)')


def owner(tid, labels):
    """The label of the process `tid` belongs to, and its thread name."""
    try:
        tgid = None
        with open(f'/proc/{tid}/status') as f:
            for line in f:
                if line.startswith('Tgid:'):
                    tgid = int(line.split()[1])
        with open(f'/proc/{tid}/comm') as f:
            comm = f.read().strip()
    except OSError:
        return None
    for pid in (tgid, parent(tgid)):
        if pid in labels:
            return f'{labels[pid]}/{comm}'
    return None


def parent(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    labels = {}
    for arg in sys.argv[3:]:
        pid, label = arg.split('=', 1)
        labels[int(pid)] = label
    names = {}
    current, since, first_send, call = None, None, None, None
    runs = collections.Counter()
    cpu = collections.Counter()
    react = collections.defaultdict(list)
    after = collections.defaultdict(list)
    for line in open(path, errors='replace'):
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            tid, t = int(parts[0]), float(parts[1].rstrip(':'))
        except ValueError:
            continue
        event = parts[2]
        if event.startswith('sched:sched_switch'):
            m = SWITCH.search(line)
            if not m:
                continue
            prev, nxt = int(m.group(1)), int(m.group(2))
            if current == prev and since is not None:
                name = names.get(prev)
                if name:
                    runs[name] += 1
                    cpu[name] += t - since
                    if first_send is not None:
                        react[(name, call)].append(first_send - since)
                        after[(name, call)].append(t - first_send)
            if nxt not in names:
                names[nxt] = owner(nxt, labels) if nxt else None
            current, since, first_send, call = nxt, t, None, None
        elif tid == current and first_send is None and event.startswith(
                ('syscalls:sys_enter_send', 'syscalls:sys_enter_write')):
            first_send, call = t, event.split('sys_enter_', 1)[1].rstrip(':')
    print(f'{requests} requests; per request, and medians over the runs by what they sent first:')
    print(f'{"thread":28} {"runs":>5} {"CPU us":>7}   {"first send":12} {"runs":>5} {"in->send us":>11} {"send->out us":>12}')
    for name in sorted(runs):
        sends = sorted(k for k in react if k[0] == name)
        head = f'{name:28} {runs[name] / requests:5.2f} {cpu[name] * 1e6 / requests:7.1f}'
        if not sends:
            print(head)
        for i, k in enumerate(sends):
            r, a = react[k], after[k]
            print(f'{head if i == 0 else "":{len(head)}}   {k[1]:12} {len(r) / requests:5.2f} '
                  f'{statistics.median(r) * 1e6:11.1f} {statistics.median(a) * 1e6:12.1f}')


if __name__ == '__main__':
    main()
