#!/usr/bin/env python3
"""The training load of scripts/release-pgo.sh: delegations through a
running ingress node, as agents send them (keep-alive connections, a mix of
request kinds), on the plain ingress and on the mTLS ingress with a caller
certificate enrolled by join token. Bounded: a fixed number of requests per
connection, and a timeout on every one. Exits 1 when the mesh does not
answer as it should (so a broken build is not trained on errors)."""
import argparse
import http.client
import json
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
    body, method, expect = None, 'POST', (200,)
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
        body = iter([b'a' * 700, b'b' * 300, b'c' * 24])
        conn.request(method, '/', body=body, headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
        return resp.status in expect
    elif kind == 'unknown-agent':
        headers['Host'] = f'nosuch.{tenant}.dmsc'
        body, expect = b'x' * 64, (404,)
    conn.request(method, '/', body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status in expect


def worker(make, count, tenant, agent, seed, result):
    plan = [k for w, k in KINDS for _ in range(w)]
    ok = bad = 0
    conn = make()
    for n in range(count):
        kind = plan[(n * 7 + seed) % len(plan)]
        try:
            if one(conn, kind, n, tenant, agent):
                ok += 1
            else:
                bad += 1
        except (OSError, http.client.HTTPException):
            bad += 1
            conn.close()
            conn = make()
    conn.close()
    result.append((ok, bad))


def drive(make, label, args):
    result, threads = [], []
    for i in range(args.connections):
        t = threading.Thread(target=worker, args=(make, args.requests, args.tenant, args.agent, i, result))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    ok = sum(r[0] for r in result)
    bad = sum(r[1] for r in result)
    print(f'{label}: {ok} as expected, {bad} not', file=sys.stderr)
    return bad <= (ok + bad) // 20


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
    p.add_argument('--requests', type=int, default=4000)
    args = p.parse_args()

    host, port = args.plain.rsplit(':', 1)
    plain = lambda: http.client.HTTPConnection(host, int(port), timeout=10)  # noqa: E731
    deadline = time.time() + 30
    while True:  # the remote agent is known once gossip has carried it
        try:
            c = plain()
            if one(c, 'post-1k', 0, args.tenant, args.agent):
                break
        except (OSError, http.client.HTTPException):
            pass
        if time.time() > deadline:
            print('the ingress never delegated to the agent', file=sys.stderr)
            return 1
        time.sleep(0.2)

    token = subprocess.run(
        [args.node_bin, 'token', 'create', '--tenant', args.tenant, '--agent', 'caller',
         '--admin', args.admin, '--admin-token', args.admin_token],
        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    ctx = ssl.create_default_context(cafile=args.ca)
    thost, tport = args.tls.rsplit(':', 1)
    c = http.client.HTTPSConnection(thost, int(tport), context=ctx, timeout=10)
    c.request('POST', '/v1/enroll', body=json.dumps({'token': token}))
    r = c.getresponse()
    enrolled = json.loads(r.read())
    if r.status != 200:
        print(f'enrollment answered {r.status}: {enrolled}', file=sys.stderr)
        return 1
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
