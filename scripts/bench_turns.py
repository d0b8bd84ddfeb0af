#!/usr/bin/env python3
"""First-token time of each turn of one conversation: `kollava serve` against llama.cpp's
`llama-server`, on the same GGUF pair, one server at a time, interleaved.

    python3 scripts/bench_turns.py [--turns 3] [--rounds 3] [--only kollava|llama] [--out FILE]

Standard library only. Each server gets the same conversation through its OpenAI-compatible
`POST /v1/chat/completions` with `stream: true`: turn 1 is the image (a base64 PNG data URL)
and a question, turns 2..N are short text follow-ups, and every request carries the whole
history (the earlier user messages and the answers that server gave), as API clients send it.
The first-token time is from sending the request to the first SSE chunk with a non-empty
`delta.content`; when a server streams no content at all (random weights can answer EOS
first), the first chunk with any delta is used instead and the turn is marked `fallback`.
With `--warmup N` each server first answers N requests about another image (default none:
llama-server runs an empty warm-up of its own at start, and kollava's turn 1 was the same with
and without one; a warm-up can also give turn 1 a partial prefix hit, the template's first tokens).

Per round the servers start in alternating order (A B, B A, ...); each is started, polled on
`/health`, given the conversation, and stopped before the other starts. kollava runs with
RAYON_NUM_THREADS=T (and `--threads T` if its `serve` has the flag); llama-server with
`-t T -c 4096 --no-jinja --chat-template vicuna` (llama-server applies Jinja templates by
default, and with Jinja on `--chat-template vicuna` would be read as a literal Jinja text
instead of the built-in vicuna template; the bench GGUF has no template of its own) and its
defaults otherwise: prompt cache on, 4 slots, each capped at the model's 2048-token training
context (about 40 turns of this conversation). Prints a Markdown table of per-turn medians and writes every raw
number, answers and server timings included, to --out.
"""
import argparse
import base64
import glob
import http.client
import json
import os
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLLOW_UPS = [
    "What colors do you see?",
    "How many shapes are there?",
    "Which shape is the largest?",
    "Where is the circle?",
    "Summarize your answer in one sentence.",
]


# Other processes' CPU use (in cores) above which a run is flagged as disturbed.
BUSY = 0.2


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pids=()):
    """(all CPUs' busy ticks, all CPUs' ticks, ticks used by `pids` and by this process), from
    Linux's /proc; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        own = 0
        for pid in (*pids, os.getpid()):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own += int(fields[11]) + int(fields[12])  # utime, stime
        return sum(v) - v[3] - v[4], sum(v), own  # total minus idle and iowait
    except (OSError, ValueError, IndexError):
        return None


def other_cores(before, after):
    """Cores kept busy by other processes between two cpu_ticks() samples of the same pids."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, own = after[0] - before[0], after[2] - before[2]
    return max(busy - own, 0) / ((after[1] - before[1]) / (os.cpu_count() or 1))


def png_data_url(path):
    with open(path, "rb") as f:
        data = f.read()
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def gradient_png(w=96, h=96):
    """A small RGB gradient as PNG bytes (the warm-up image, unlike any test image)."""
    rows = b"".join(b"\x00" + bytes(v for x in range(w) for v in (x * 255 // w, y * 255 // h, 128))
                    for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


class Server:
    """One server process; its output goes to a log file, the last lines of which are shown
    when it fails."""

    def __init__(self, name, cmd, port, env, log_path):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.log_file = open(log_path, "wb")
        log(f"  $ {shlex.join(cmd)}")
        # Its own process group: Ctrl-C in the terminal reaches us, and we stop it ourselves.
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.started = time.perf_counter()

    def tail(self, n=30):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return "(no log)"

    def wait_healthy(self, timeout):
        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} while "
                                   f"starting; last lines of {self.log_path}:\n{self.tail()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not healthy after {timeout} s; last lines of "
                           f"{self.log_path}:\n{self.tail()}")

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log_file.close()


def chat(port, messages, max_tokens, timeout):
    """One streamed request. Returns first-token time, total time, the answer and what the
    server reported (usage, llama-server's timings)."""
    body = json.dumps({"model": "bench", "messages": messages, "stream": True,
                       "max_tokens": max_tokens, "temperature": 0,
                       "stream_options": {"include_usage": True}}).encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.connect()
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                      "Accept": "text/event-stream"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read().decode(errors='replace')[:2000]}")
    first_content = first_delta = None
    text, usage, timings, finish, chunks = [], None, None, None, 0
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        now = time.perf_counter()
        ev = json.loads(data)
        if "error" in ev:
            raise RuntimeError(f"stream error: {ev['error']}")
        chunks += 1
        usage = ev.get("usage") or usage
        timings = ev.get("timings") or timings
        for ch in ev.get("choices") or []:
            delta = ch.get("delta") or {}
            if delta and first_delta is None:
                first_delta = now
            content = delta.get("content")
            if content:
                if first_content is None:
                    first_content = now
                text.append(content)
            finish = ch.get("finish_reason") or finish
    total = time.perf_counter() - t0
    c.close()
    if first_delta is None:
        raise RuntimeError(f"no delta in {chunks} chunks")
    fallback = first_content is None
    first = first_delta if fallback else first_content
    return {"first_token_ms": (first - t0) * 1e3, "total_ms": total * 1e3, "fallback": fallback,
            "answer": "".join(text), "finish_reason": finish, "usage": usage, "timings": timings}


def conversation(port, args, image_url):
    """Warm-up, then the turns; every request carries the whole history."""
    warm = []
    for i in range(args.warmup):
        m = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                + base64.b64encode(gradient_png()).decode()}},
            {"type": "text", "text": f"Warm-up {i + 1}: what is this?"}]}]
        try:
            w = chat(port, m, 2, args.request_timeout)
        except (RuntimeError, OSError, ValueError) as e:
            raise RuntimeError(f"warm-up request {i + 1}: {e}") from e
        warm.append(w["total_ms"])
    history = [{"role": "system", "content": args.system}] if args.system else []
    turns = []
    for t in range(args.turns):
        if t == 0:
            content = [{"type": "image_url", "image_url": {"url": image_url}},
                       {"type": "text", "text": args.question}]
        else:
            content = FOLLOW_UPS[(t - 1) % len(FOLLOW_UPS)]
        history.append({"role": "user", "content": content})
        try:
            r = chat(port, history, args.max_tokens, args.request_timeout)
        except (RuntimeError, OSError, ValueError) as e:
            raise RuntimeError(f"turn {t + 1}: {e}") from e
        r["question"] = args.question if t == 0 else content
        history.append({"role": "assistant", "content": r["answer"]})
        turns.append(r)
        tok, cached = prompt_tokens(r)
        log(f"    turn {t + 1}: first token {r['first_token_ms']:.0f} ms, total {r['total_ms']:.0f} ms"
            + (f", {tok} prompt tokens" if tok is not None else "")
            + (f" ({cached} cached)" if cached is not None else "")
            + (" [no content: first delta]" if r["fallback"] else ""))
    return {"warmup_ms": warm, "turns": turns}


def prompt_tokens(r):
    """(prompt tokens, how many of them came from the server's cache), None where not told."""
    u = r.get("usage") or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None:
        cached = (r.get("timings") or {}).get("cache_n")
    return u.get("prompt_tokens"), cached


def find_models(d):
    mmproj = sorted(glob.glob(os.path.join(d, "mmproj*.gguf")))
    models = sorted(p for p in glob.glob(os.path.join(d, "*.gguf")) if p not in mmproj)
    if len(mmproj) != 1 or len(models) != 1:
        sys.exit(f"{d}: expected one mmproj*.gguf and one other *.gguf, found {mmproj + models}")
    return models[0], mmproj[0]


def server_cmds(args):
    model, mmproj = find_models(args.model_dir)
    threads = str(args.threads)
    kollava = [args.kollava, "serve", "--model", args.model_dir]
    kenv = dict(os.environ, RAYON_NUM_THREADS=threads)
    if "kollava" in args.sides:
        h = subprocess.run([args.kollava, "serve", "--help"], capture_output=True, text=True)
        if h.returncode != 0:
            sys.exit(f"{args.kollava} serve --help failed:\n{h.stdout}{h.stderr}")
        if "--threads" in h.stdout:
            kollava += ["--threads", threads]
    kollava += shlex.split(args.kollava_args)
    llama = [os.path.join(args.llama_bin, "llama-server"), "-m", model, "--mmproj", mmproj,
             "-t", threads, "-c", str(args.ctx), "--no-jinja", "--chat-template", "vicuna",
             *shlex.split(args.llama_args)]
    return {"kollava": (kollava, kenv), "llama": (llama, dict(os.environ))}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kollava", default=os.path.join(ROOT, "target/release/kollava"))
    ap.add_argument("--llama-bin", default=os.path.join(ROOT, "target/peers/llama-build/bin"),
                    help="directory holding llama-server")
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "target/peers/gguf-q4km"),
                    help="one model *.gguf and its mmproj*.gguf")
    ap.add_argument("--image", default=os.path.join(ROOT, "examples/shapes.png"))
    ap.add_argument("--question", default="Describe the image in detail.")
    ap.add_argument("--system", default="", help="a leading system message (default: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=0,
                    help="warm-up requests (about another image) before the conversation")
    ap.add_argument("--ctx", type=int, default=4096, help="llama-server -c")
    ap.add_argument("--only", choices=["kollava", "llama"])
    ap.add_argument("--kollava-args", default="", help="more `kollava serve` flags (one string)")
    ap.add_argument("--llama-args", default="", help="more llama-server flags (one string)")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=900)
    ap.add_argument("--out", default=os.path.join(ROOT, "target/peers/bench-turns.json"))
    args = ap.parse_args()
    if args.turns < 1 or args.rounds < 1:
        sys.exit("--turns and --rounds must be at least 1")
    args.sides = [args.only] if args.only else ["kollava", "llama"]
    cmds = server_cmds(args)
    if "llama" in args.sides and not os.access(cmds["llama"][0][0], os.X_OK):
        sys.exit(f"no llama-server in {args.llama_bin} (scripts/bench-peers.sh builds it)")
    image_url = png_data_url(args.image)
    log_dir = os.path.splitext(args.out)[0] + "-logs"
    os.makedirs(log_dir, exist_ok=True)

    # SIGTERM ends us like Ctrl-C does, through the finally below that stops the server.
    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started ignoring it
    raw = {s: [] for s in args.sides}
    server = None
    try:
        for rnd in range(args.rounds):
            order = args.sides if rnd % 2 == 0 else args.sides[::-1]
            for side in order:
                cmd, env = cmds[side]
                port = free_port()
                log(f"[round {rnd + 1}/{args.rounds}] {side} on port {port}")
                t0 = cpu_ticks()
                time.sleep(1)
                busy = other_cores(t0, cpu_ticks())
                if busy is not None and busy > BUSY:
                    log(f"    note: {busy:.1f} cores busy before starting: other work on the machine")
                t_start = time.perf_counter()
                server = Server(side, cmd + ["--port", str(port)], port, env,
                                os.path.join(log_dir, f"{side}-round{rnd + 1}.log"))
                ready_s = server.wait_healthy(args.start_timeout)
                log(f"    healthy after {ready_s:.1f} s")
                t_conv = time.perf_counter()
                ticks = cpu_ticks([server.proc.pid])
                try:
                    run = conversation(port, args, image_url)
                except (RuntimeError, OSError, ValueError) as e:
                    raise RuntimeError(f"{side}: {e}\nlast lines of {server.log_path}:\n{server.tail()}")
                others = other_cores(ticks, cpu_ticks([server.proc.pid]))
                if others is not None and others > BUSY:
                    log(f"    note: other processes kept {others:.1f} cores busy during the conversation")
                run.update(round=rnd + 1, order=order.index(side), startup_s=ready_s,
                           conversation_s=time.perf_counter() - t_conv,
                           other_cores_before=busy, other_cores_during=others)
                server.stop()
                server = None
                run["wall_s"] = time.perf_counter() - t_start
                log(f"    conversation {run['conversation_s']:.1f} s, with start and stop {run['wall_s']:.1f} s")
                raw[side].append(run)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if server is not None:
            server.stop()

    summary = []
    for t in range(args.turns):
        row = {"turn": t + 1}
        for s in args.sides:
            runs = [r["turns"][t] for r in raw[s]]
            row[s] = {"first_token_ms": median([x["first_token_ms"] for x in runs]),
                      "total_ms": median([x["total_ms"] for x in runs]),
                      "prompt_tokens": median([prompt_tokens(x)[0] for x in runs
                                               if prompt_tokens(x)[0] is not None]),
                      "cached_tokens": median([prompt_tokens(x)[1] for x in runs
                                               if prompt_tokens(x)[1] is not None]),
                      "fallback_runs": sum(x["fallback"] for x in runs)}
        summary.append(row)
    for s in args.sides:
        t1 = summary[0][s]["first_token_ms"]
        for row in summary:
            row[s]["of_turn1"] = row[s]["first_token_ms"] / t1
    for row in summary:
        if len(args.sides) == 2:
            row["ratio_kollava_llama"] = row["kollava"]["first_token_ms"] / row["llama"]["first_token_ms"]
    walls = {s: {"conversation_s": median([r["conversation_s"] for r in raw[s]]),
                 "with_start_stop_s": median([r["wall_s"] for r in raw[s]])} for s in args.sides}
    meta = {"kollava_cmd": cmds["kollava"][0], "llama_cmd": cmds["llama"][0], "image": args.image,
            "question": args.question, "system": args.system, "follow_ups": FOLLOW_UPS,
            "threads": args.threads, "turns": args.turns, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "warmup": args.warmup, "cpu_count": os.cpu_count()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "median": summary, "wall": walls, "raw": raw}, f, indent=1)
    log(f"wrote {args.out} (server logs in {log_dir})")

    def fmt(x, spec):
        return "-" if x != x else format(x, spec)  # NaN: no figure
    names = {"kollava": "kollava", "llama": "llama.cpp"}
    head = ["turn"]
    for s in args.sides:
        head += [f"{names[s]} prompt tok (cached)", f"{names[s]} first token ms", f"{names[s]} vs turn 1"]
    if len(args.sides) == 2:
        head.append("kollava/llama.cpp")
    print(f"\nMedian of {args.rounds} round(s), {args.threads} threads, {args.max_tokens} max tokens, "
          f"image {os.path.basename(args.image)}, model {os.path.basename(find_models(args.model_dir)[0])}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in summary:
        cells = [str(row["turn"])]
        for s in args.sides:
            m = row[s]
            mark = " *" if m["fallback_runs"] else ""
            cells += [f"{fmt(m['prompt_tokens'], '.0f')} ({fmt(m['cached_tokens'], '.0f')})",
                      fmt(m["first_token_ms"], ".0f") + mark,
                      fmt(m["of_turn1"], ".2f") + "x"]
        if len(args.sides) == 2:
            cells.append(f"**{row['ratio_kollava_llama']:.2f}x**")
        print("| " + " | ".join(cells) + " |")
    print()
    for s in args.sides:
        print(f"{names[s]}: whole conversation {walls[s]['conversation_s']:.1f} s "
              f"({walls[s]['with_start_stop_s']:.1f} s with start-up and stop), median")
    disturbed = [f"{names[s]} round {r['round']}" for s in args.sides for r in raw[s]
                 if (r["other_cores_during"] or 0) > BUSY or (r["other_cores_before"] or 0) > BUSY]
    if disturbed:
        print(f"warning: other processes used over {BUSY} cores around or during: {', '.join(disturbed)} "
              "(other_cores_* in the JSON); rerun on a quiet machine")
    if any(row[s]["fallback_runs"] for row in summary for s in args.sides):
        print("* no content was streamed in some runs: their time is that of the first chunk with any delta")


if __name__ == "__main__":
    main()
