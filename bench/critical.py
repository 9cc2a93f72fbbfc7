#!/usr/bin/env python3
"""Where the critical path's CPU goes: a profile cut by hop phase.

    perf record -C 0 -F 10000 -e cycles -e sched:sched_switch \
        -e 'syscalls:sys_enter_send*' -e syscalls:sys_enter_writev \
        -e syscalls:sys_enter_write --call-graph dwarf,8192 -- sleep 4
    perf script -F comm,tid,time,event,trace,ip,sym,dso > profile.txt
    bench/critical.py profile.txt PID=LABEL... [OWNER]
    (without PID=LABEL, e.g. after the processes ended: by thread name)

bench/hops.py splits each server thread's runs on the shared CPU into its
reaction (switched in until its first send: the request or answer passed on
to the next hop, on the critical path) and the work after that send. This
script charges the CPU samples of the same recording to those two phases
(and to runs that send nothing), by owner as bench/perf-owners.py counts
them: what the critical path is made of, not what the whole CPU does.
With OWNER, also that owner's frames in the reaction phase.
"""
import collections
import importlib.util
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location('perf_owners', os.path.join(HERE, 'perf-owners.py'))
perf_owners = importlib.util.module_from_spec(spec)
spec.loader.exec_module(perf_owners)
spec = importlib.util.spec_from_file_location('hops', os.path.join(HERE, 'hops.py'))
hops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hops)

HEADER = re.compile(r'^\s*(\S.*?)\s+(\d+)\s+(\d+\.\d+):\s+(\S+?):?\s(.*)$')
FRAME = re.compile(r'^\s+[0-9a-f]+\s+(.*)$')


def events(path):
    """(tid, time, event, rest, frames) for every event of the script."""
    cur = None
    for line in open(path, errors='replace'):
        if not line.strip():
            if cur:
                yield cur
            cur = None
            continue
        if not line.startswith((' ', '\t')):
            if cur:
                yield cur
            m = HEADER.match(line)
            cur = (int(m.group(2)), float(m.group(3)), m.group(4), m.group(5), []) if m else None
            continue
        if cur is None:
            continue
        m = FRAME.match(line)
        if not m:
            continue
        f = re.match(r'(.*) \((.*)\)$', m.group(1))
        sym, dso = (f.group(1), f.group(2)) if f else (m.group(1), '')
        cur[4].append((re.sub(r'\+0x[0-9a-f]+$', '', sym), dso))
    if cur:
        yield cur


def main():
    path = sys.argv[1]
    labels, want = {}, None
    for arg in sys.argv[2:]:
        if '=' in arg:
            pid, label = arg.split('=', 1)
            labels[int(pid)] = label
        else:
            want = arg
    names = {}
    phase = collections.defaultdict(collections.Counter)  # (label, phase) -> owner -> samples
    frames = collections.Counter()
    kernel = collections.Counter()  # (label, phase) -> samples in the kernel
    current, run, sent = None, [], None

    def close():
        if current is None or not names.get(current):
            return
        label = names[current].split('/')[0]
        for t, s in run:
            p = 'no send' if sent is None else ('reaction' if t < sent else 'after send')
            o = perf_owners.owner(s)
            phase[(label, p)][o] += 1
            if s and 'kernel' in s[0][1]:
                kernel[(label, p)] += 1
            if want and p == 'reaction' and o == want:
                own = next((sym for sym, _ in s if want.split('::')[0] in sym), '?')
                frames[(own[:90], s[0][0][:70] if s else '?')] += 1

    for tid, t, event, rest, stack in events(path):
        if event.startswith('sched:sched_switch'):
            m = hops.SWITCH.search(rest)
            if not m:
                continue
            close()
            nxt = int(m.group(2))
            if nxt not in names:
                names[nxt] = hops.owner(nxt, labels) if nxt else None
                if nxt and names[nxt] is None and not labels:
                    # Read after the fact: every thread by its name.
                    c = re.search(r'next_comm=(.*?) next_pid=', rest)
                    names[nxt] = c.group(1) if c else None
            current, run, sent = nxt, [], None
        elif tid != current:
            continue
        elif event.startswith(('syscalls:sys_enter_send', 'syscalls:sys_enter_write')):
            if sent is None:
                sent = t
        elif not event.startswith(('sched:', 'syscalls:')):
            run.append((t, stack))
    close()
    for key in sorted(phase):
        c = phase[key]
        total = sum(c.values())
        print(f'== {key[0]}, {key[1]}: {total} samples, {100 * kernel[key] / total:.0f}% in the kernel')
        for o, n in c.most_common(15):
            print(f'  {100 * n / total:5.1f}%  {o}')
    if want:
        print(f'-- {want} in the reaction phase: frame <- leaf')
        total = sum(frames.values()) or 1
        for (o, leaf), n in frames.most_common(40):
            print(f'{100 * n / total:6.1f}%  {o}  <-  {leaf}')


if __name__ == '__main__':
    main()
