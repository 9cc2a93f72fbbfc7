#!/usr/bin/env python3
"""The training load of scripts/release-pgo.sh: delegations through a
running ingress node, as agents send them (keep-alive connections, a mix of
request kinds), on the plain ingress and on the mTLS ingress with a caller
certificate enrolled by join token. Bounded: a fixed number of requests per
connection, a timeout on every one, a deadline per ingress, and a stop after
20 failures in a row. Exits 1 when the mesh does not answer as it should
(so a broken build is not trained on errors)."""
import argparse
import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import time

KINDS = [  # (weight, name)
    (5, 'post-1k'),
    (1, 'post-16k'),
    (2, 'a2a-0.3'),
    (1, 'a2a-1.0'),
    (1, 'get'),
    (1, 'chunked'),
    (1, 'unknown-agent'),
]


def a2a(method, text, n):
    message = {'role': 'user', 'messageId': f'm-{n}', 'parts': [{'kind': 'text', 'text': text}]}
    return json.dumps({'jsonrpc': '2.0', 'id': n, 'method': method, 'params': {'message': message}}).encode()


def one(conn, kind, n, tenant, agent):
    host = f'{agent}.{tenant}.dmsc'
    headers = {'Host': host}
    body, method, expect, chunked = None, 'POST', (200,), False
    if kind == 'post-1k':
        body = b'x' * 1024
    elif kind == 'post-16k':
        body = b'y' * 16384
    elif kind == 'a2a-0.3':
        body = a2a('message/send', 'summarize the quarterly numbers', n)
        headers['Content-Type'] = 'application/json'
    elif kind == 'a2a-1.0':
        body = a2a('SendMessage', 'what is the weather in Rome', n)
        headers['Content-Type'] = 'application/json'
        headers['A2A-Version'] = '1.0'
    elif kind == 'get':
        method = 'GET'
    elif kind == 'chunked':
        body, chunked = iter([b'a' * 700, b'b' * 300, b'c' * 24]), True
    elif kind == 'unknown-agent':
        headers['Host'] = f'nosuch.{tenant}.dmsc'
        body, expect = b'x' * 64, (404,)
    conn.request(method, '/', body=body, headers=headers, encode_chunked=chunked)
    resp = conn.getresponse()
    data = resp.read()
    # the agent's answer, through the mesh (the backend always says something)
    return resp.status in expect and (resp.status != 200 or len(data) > 0)


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def probe(conn, tenant, agent):
    """One 1 KiB POST: (delegated?, what was answered)."""
    conn.request('POST', '/', body=b'x' * 1024, headers={'Host': f'{agent}.{tenant}.dmsc'})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status == 200 and len(data) > 0, f'{resp.status} {data[:300]!r}'


def worker(make, count, tenant, agent, seed, deadline, result):
    plan = [k for w, k in KINDS for _ in range(w)]
    ok = bad = in_a_row = 0
    conn = make()
    for n in range(count):
        if time.time() > deadline or in_a_row >= 20:
            bad += count - n  # not sent: counted against the run
            break
        kind = plan[(n * 7 + seed) % len(plan)]
        try:
            if one(conn, kind, n, tenant, agent):
                ok += 1
                in_a_row = 0
            else:
                bad += 1
                in_a_row += 1
        except (OSError, http.client.HTTPException):
            bad += 1
            in_a_row += 1
            conn.close()
            conn = make()
    conn.close()
    result.append((ok, bad))


def drive(make, label, args):
    result, threads = [], []
    deadline = time.time() + args.seconds
    for i in range(args.connections):
        t = threading.Thread(target=worker, args=(make, args.requests, args.tenant, args.agent, i, deadline, result))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    ok = sum(r[0] for r in result)
    bad = sum(r[1] for r in result)
    print(f'{label}: {ok} as expected, {bad} not', file=sys.stderr)
    # Loopback, a warm mesh: anything but the expected answers is a fault
    # (a profile trained on errors would optimize the wrong paths).
    return len(result) == args.connections and ok > 0 and bad <= ok // 1000


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--plain', required=True)
    p.add_argument('--tls', required=True)
    p.add_argument('--admin', required=True)
    p.add_argument('--admin-token', required=True)
    p.add_argument('--ca', required=True)
    p.add_argument('--node-bin', required=True)
    p.add_argument('--tenant', required=True)
    p.add_argument('--agent', required=True)
    p.add_argument('--work', required=True)
    p.add_argument('--connections', type=int, default=4)
    p.add_argument('--requests', type=int, default=4000, help='per connection')
    p.add_argument('--watch', type=int, nargs='*', default=[],
                   help='PIDs of the mesh: their exit ends the wait for the first delegation')
    p.add_argument('--seconds', type=float, default=300, help='at most, per ingress')
    args = p.parse_args()

    host, port = args.plain.rsplit(':', 1)
    plain = lambda: http.client.HTTPConnection(host, int(port), timeout=10)  # noqa: E731
    start = time.time()
    last = 'no answer yet'
    while True:  # the remote agent is known once gossip has carried it
        c = plain()
        try:
            ok, last = probe(c, args.tenant, args.agent)
            if ok:
                break
        except (OSError, http.client.HTTPException) as e:
            last = f'{type(e).__name__}: {e}'
        finally:
            c.close()
        gone = [pid for pid in args.watch if not alive(pid)]
        if gone:
            print(f'process {gone} exited before the first delegation; last: {last}', file=sys.stderr)
            return 1
        if time.time() > start + 90:
            print(f'the ingress never delegated to the agent in 90 s; last: {last}', file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f'first delegation after {time.time() - start:.1f} s', file=sys.stderr)

    made = subprocess.run(
        [args.node_bin, 'token', 'create', '--tenant', args.tenant, '--agent', 'caller',
         '--admin', args.admin, '--admin-token', args.admin_token],
        stdout=subprocess.PIPE, text=True, timeout=30)  # its errors go to our stderr
    if made.returncode != 0 or not made.stdout.strip():
        print(f'token create failed (exit {made.returncode})', file=sys.stderr)
        return 1
    token = made.stdout.strip().splitlines()[-1]
    ctx = ssl.create_default_context(cafile=args.ca)
    thost, tport = args.tls.rsplit(':', 1)
    c = http.client.HTTPSConnection(thost, int(tport), context=ctx, timeout=10)
    c.request('POST', '/v1/enroll', body=json.dumps({'token': token}))
    r = c.getresponse()
    raw = r.read()
    if r.status != 200:
        print(f'enrollment answered {r.status}: {raw[:500]!r}', file=sys.stderr)
        return 1
    enrolled = json.loads(raw)
    with open(f'{args.work}/caller.pem', 'w') as f:
        f.write(enrolled['certificate_chain'])
    with open(f'{args.work}/caller.key', 'w') as f:
        f.write(enrolled['private_key'])
    ctx.load_cert_chain(f'{args.work}/caller.pem', f'{args.work}/caller.key')
    tls = lambda: http.client.HTTPSConnection(thost, int(tport), context=ctx, timeout=10)  # noqa: E731

    good = drive(plain, 'plain ingress', args)
    good = drive(tls, 'mTLS ingress', args) and good
    return 0 if good else 1


if __name__ == '__main__':
    sys.exit(main())
