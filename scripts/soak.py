#!/usr/bin/env python3
"""A soak of `kollava serve`: CLIENTS concurrent clients for MINUTES minutes, each looping
over whole answers with an image, streamed answers, streams hung up midway and streams read
slowly, against the bundled demo model (or --model). Counts failed requests (anything but a
200 with a well-formed answer, or for slow readers the server's own "left it unread" end)
and samples the server's resident memory every 10 s. Standard library only.

    scripts/soak.py [--clients 64] [--minutes 10] [--model DIR] [--bin target/release/kollava]

Prints one JSON line: requests and failures per kind, and RSS (MiB) after warm-up and at
the end.
"""
import argparse
import asyncio
import base64
import json
import os
import random
import re
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = [os.path.join(ROOT, "tests/fixtures/images", f)
          for f in ("wide_rgb.png", "tall_rgb.png", "square_rgb.png")]


def body(stream, max_tokens, image):
    with open(image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return json.dumps({
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "이 그림을 설명해 주세요."},
            {"type": "image_url", "image_url": {"url": url}}]}],
        "stream": stream, "max_tokens": max_tokens, "temperature": 0.7,
        "seed": random.randrange(1 << 30),
    }).encode()


async def request(port, payload):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload))
    w.write(payload)
    await w.drain()
    return r, w


async def whole(port):
    r, w = await request(port, body(False, 32, random.choice(IMAGES)))
    data = await r.read()
    w.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and b'"choices"' in rest


async def streamed(port):
    r, w = await request(port, body(True, 48, random.choice(IMAGES)))
    data = await r.read()
    w.close()
    return data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data and b"finish_reason\":\"" in data


async def hang_up(port):
    r, w = await request(port, body(True, 200, random.choice(IMAGES)))
    first = await r.read(200)
    w.close()
    return first.startswith(b"HTTP/1.1 200")


async def slow_reader(port):
    r, w = await request(port, body(True, 400, random.choice(IMAGES)))
    got = b""
    try:
        while True:
            piece = await r.read(64)
            if not piece:
                break
            got += piece
            await asyncio.sleep(0.05)
    finally:
        w.close()
    ok_end = b"data: [DONE]" in got
    return got.startswith(b"HTTP/1.1 200") and ok_end


KINDS = {"whole": whole, "stream": streamed, "hang_up": hang_up, "slow_reader": slow_reader}


async def client(port, deadline, counts):
    while time.monotonic() < deadline:
        kind = random.choices(list(KINDS), weights=[4, 4, 1, 1])[0]
        try:
            ok = await asyncio.wait_for(KINDS[kind](port), timeout=300)
        except Exception as e:  # noqa: BLE001 - any error is a failed request
            ok = False
            counts.setdefault("errors", []).append(f"{kind}: {e!r}"[:200])
        counts[kind][0] += 1
        counts[kind][1] += 0 if ok else 1


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    return int(m.group(1)) / 1024


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--model", default=None)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/kollava"))
    args = ap.parse_args()
    cmd = [args.bin, "serve", "--port", "0", "--max-queue", str(args.clients * 2)]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    port = None
    for line in server.stderr:
        m = re.search(r"on http://[\d.]+:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        raise SystemExit("the server did not start")
    counts = {k: [0, 0] for k in KINDS}
    start = time.monotonic()
    deadline = start + args.minutes * 60
    samples = []

    async def sample():
        while time.monotonic() < deadline:
            await asyncio.sleep(10)
            samples.append((round(time.monotonic() - start), round(rss_mib(server.pid))))

    await asyncio.gather(sample(), *(client(port, deadline, counts) for _ in range(args.clients)))
    server.terminate()
    server.wait(timeout=60)
    warm = [m for t, m in samples if t >= 60] or [m for _, m in samples]
    print(json.dumps({
        "clients": args.clients, "minutes": args.minutes,
        "requests": {k: v[0] for k, v in counts.items() if k in KINDS},
        "failed": {k: v[1] for k, v in counts.items() if k in KINDS},
        "errors": counts.get("errors", [])[:5],
        "rss_mib_after_warmup": warm[0] if warm else None,
        "rss_mib_max_after_warmup": max(warm) if warm else None,
        "rss_mib_end": samples[-1][1] if samples else None,
    }))


if __name__ == "__main__":
    asyncio.run(main())
