#!/usr/bin/env python3
"""Rerun issue 10's attacks on a local kabao while a well-behaved phone pings.

Each attack gets its own `kabao serve` on 127.0.0.1 (loopback only), runs for a bounded time
(--seconds, default 20), and the phone sends one ping every 50 ms throughout, on its own
keep-alive connection, with its own client JWT. Printed per attack: the phone's p50/p99/max
latency and its statuses, the attacker's statuses, and kabao's resident memory before, at the
peak and after.

The phone pings 20 times a second, more than API.md's default per-user limit (5/s, burst 50),
so the server runs with --rate-limit-requests-per-user-per-s 25: every 429 the phone gets is one
it did not earn.

    cargo build --release && python3 scripts/abuse/abuse.py [--seconds 20] [attack ...]

Attacks: slow_bodies, idle, held_bodies, admin_flood, user_churn (default: all; user_churn then
waits 150–240 s more for the idle users' state to be freed and reads RSS again). Python 3.11 stdlib only.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import multiprocessing
import os
import resource
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

ADMIN = "abuse-admin-token"
SECRET = "abuse-client-secret"
HOST = "127.0.0.1"


def jwt(sub: str) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": sub, "iat": now, "exp": now + 3600}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{claims}".encode(), hashlib.sha256).digest()
    return f"{head}.{claims}.{b64(sig)}"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Server:
    def __init__(self, binary: str, extra_args=()):
        env = dict(os.environ, RUST_LOG="warn")
        # The default (embedded) store, in a data directory of its own, removed afterwards.
        self.data_dir = tempfile.mkdtemp(prefix="kabao-abuse-")
        self.proc = subprocess.Popen(
            [binary, "serve", "--listen", f"{HOST}:0", "--admin-token", ADMIN, "--client-secret", SECRET,
             "--rate-limit-requests-per-user-per-s", "25", "--data-dir", self.data_dir, *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        for line in self.proc.stdout:
            if "listening on http://" in line:
                self.port = int(line.strip().rsplit(":", 1)[1])
                break
        else:
            raise SystemExit("kabao did not start")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def request(method: str, path: str, token: str, body: bytes) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nhost: {HOST}\r\nauthorization: Bearer {token}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


async def read_reply(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


def ping_body(user: str, lat: float = 22.5431) -> bytes:
    return json.dumps({"user_id": user, "lat": lat, "lon": 114.0579}).encode()


async def phone(port: int, stop: asyncio.Event, latencies: list, statuses: dict):
    token = jwt("good-phone")
    conn = None
    while not stop.is_set():
        started = time.perf_counter()
        try:
            if conn is None:
                conn = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
            reader, writer = conn
            writer.write(request("POST", "/v1/pings", token, ping_body("good-phone")))
            await writer.drain()
            status = await asyncio.wait_for(read_reply(reader), 5)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            status = f"error:{type(e).__name__}"
            conn = None
        latencies.append((time.perf_counter() - started) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        await asyncio.sleep(max(0, 0.05 - (time.perf_counter() - started)))


async def hold(port: int, head: bytes, trickle: bytes, interval: float, stop: asyncio.Event, statuses: dict):
    """One attacking connection: sends `head`, then `trickle` every `interval` until stopped or
    answered; counts the answer (or `closed`)."""
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        statuses["connect_failed"] = statuses.get("connect_failed", 0) + 1
        return
    try:
        writer.write(head)
        await writer.drain()
        reply = asyncio.ensure_future(read_reply(reader))
        while not stop.is_set() and not reply.done():
            if trickle:
                writer.write(trickle)
                await writer.drain()
            await asyncio.wait([reply], timeout=interval)
        status = reply.result() if reply.done() and not reply.exception() else ("closed" if reply.done() else "held")
        reply.cancel()
    except (OSError, asyncio.IncompleteReadError):
        status = "closed"
    statuses[status] = statuses.get(status, 0) + 1
    writer.close()


async def slow_bodies(port, stop, statuses):
    head = (f"POST /v1/pings HTTP/1.1\r\nhost: {HOST}\r\nauthorization: Bearer {jwt('attacker')}\r\n"
            f"content-length: 100000\r\n\r\n").encode()
    while not stop.is_set():
        await asyncio.gather(*(hold(port, head, b" ", 1.0, stop, statuses) for _ in range(1100)))


async def idle(port, stop, statuses):
    # Half silent, half a request head that never ends.
    conns = [hold(port, b"" if i % 2 else b"GET /healthz HTTP/1.1\r\nhost: x\r\n", b"", 1.0, stop, statuses)
             for i in range(10_000)]
    await asyncio.gather(*conns)


async def held_bodies(port, stop, statuses):
    size = 1 << 20
    body = b"{" + b" " * (size - 2)  # one byte short of the declared length
    head = (f"POST /v1/pings HTTP/1.1\r\nhost: {HOST}\r\nauthorization: Bearer {ADMIN}\r\n"
            f"content-length: {size}\r\n\r\n").encode()
    await asyncio.gather(*(hold(port, head + body, b"", 1.0, stop, statuses) for _ in range(1000)))


async def admin_flood(port, stop, statuses):
    batch = json.dumps({"pings": [{"user_id": f"gw-{i}", "lat": 22.6, "lon": 114.0} for i in range(10_000)]}).encode()
    message = request("POST", "/v1/pings", ADMIN, batch)

    async def one():
        reader, writer = await asyncio.open_connection(HOST, port)
        while not stop.is_set():
            writer.write(message)
            await writer.drain()
            try:
                status = await read_reply(reader)
            except (OSError, asyncio.IncompleteReadError):
                status = "closed"
                reader, writer = await asyncio.open_connection(HOST, port)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(one() for _ in range(32)))


async def user_churn(port, stop, statuses):
    """Fresh user ids as fast as 4 admin connections send them, each user one ping inside the
    fence of a dwell campaign (one open stay, never a coupon): the trigger state the server must
    free again once `state_ttl_s` makes it irrelevant (`run` waits for that afterwards)."""
    campaign = json.dumps({"id": "churn", "coupon": {"title": "stay"}, "trigger": {"on": "dwell", "dwell_s": 3600},
                           "fences": [{"id": "f", "type": "circle", "center": [114.0579, 22.5431], "radius_m": 5000}]})
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request("POST", "/v1/campaigns", ADMIN, campaign.encode()))
    await writer.drain()
    statuses[f"campaign {await read_reply(reader)}"] = 1
    writer.close()
    next_user = iter(range(10**9))

    async def one():
        reader, writer = await asyncio.open_connection(HOST, port)
        while not stop.is_set():
            pings = [{"user_id": f"churn-{next(next_user)}", "lat": 22.5431, "lon": 114.0579} for _ in range(500)]
            writer.write(request("POST", "/v1/pings", ADMIN, json.dumps({"pings": pings}).encode()))
            await writer.drain()
            status = await read_reply(reader)
            statuses[status] = statuses.get(status, 0) + 1
        statuses["users sent"] = next(next_user)

    await asyncio.gather(*(one() for _ in range(4)))


ATTACKS = {"slow_bodies": slow_bodies, "idle": idle, "held_bodies": held_bodies, "admin_flood": admin_flood,
           "user_churn": user_churn}
# Server flags an attack needs besides the defaults: user_churn's states become irrelevant after
# max_ping_age_s + state_ttl_s + 60 s = 80 s, and are freed by the next minute's sweep.
SERVER_ARGS = {"user_churn": ["--max-ping-age-s", "10", "--state-ttl-s", "10"]}


def tracked_users(port: int) -> int:
    import urllib.request
    req = urllib.request.Request(f"http://{HOST}:{port}/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    for line in urllib.request.urlopen(req, timeout=5).read().decode().splitlines():
        if line.startswith("kabao_tracked_users "):
            return int(float(line.split()[1]))
    return -1


def phone_process(port: int, seconds: float, results):
    """The phone in its own process, so the attacker's work in this one cannot delay it."""
    async def main():
        stop = asyncio.Event()
        latencies, statuses = [], {}
        task = asyncio.create_task(phone(port, stop, latencies, statuses))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait([task], timeout=10)
        results.put((latencies, statuses))
    asyncio.run(main())


def summary(latencies):
    if len(latencies) < 2:
        return f"only {len(latencies)} pings"
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return f"p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms, max {max(latencies):.1f} ms"


async def run(name: str, binary: str, seconds: float):
    server = Server(binary, SERVER_ARGS.get(name, ()))
    try:
        port, pid = server.port, server.proc.pid
        before = rss_mb(pid)
        stop = asyncio.Event()
        attack_statuses = {}
        results = multiprocessing.Queue()
        phone_proc = multiprocessing.Process(target=phone_process, args=(port, seconds, results))
        phone_proc.start()
        attack_task = asyncio.create_task(ATTACKS[name](port, stop, attack_statuses))
        peak = before
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            peak = max(peak, rss_mb(pid))
        stop.set()
        latencies, phone_statuses = await asyncio.get_running_loop().run_in_executor(None, results.get)
        phone_proc.join()
        await asyncio.wait([attack_task], timeout=10)
        after = rss_mb(pid)
        unearned = sum(n for s, n in phone_statuses.items() if s != 200)
        print(f"{name}: phone {summary(latencies)}; statuses {phone_statuses} ({unearned} not 200); "
              f"attacker {dict(sorted(attack_statuses.items(), key=str))}; "
              f"RSS {before:.0f} → peak {peak:.0f} → {after:.0f} MB", flush=True)
        if name == "user_churn":
            # The gauge is set by the engine's sweep, once a minute: wait past the states' keep
            # time (80 s) and a full pass of the store's sweep (64 s, a map a second), then
            # (bounded) until the gauge reports none left, and read RSS again.
            waited, tracked = 0, tracked_users(port)
            while waited < 150 or (tracked != 0 and waited < 240):
                await asyncio.sleep(5)
                waited += 5
                tracked = tracked_users(port)
                if waited % 30 == 0:
                    print(f"  {waited} s idle: tracked users {tracked}, RSS {rss_mb(pid):.0f} MB", flush=True)
            print(f"  after {waited} s idle: tracked users {tracked}, RSS {rss_mb(pid):.0f} MB", flush=True)
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attacks", nargs="*", choices=[*ATTACKS, []], default=[])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--binary", default="target/release/kabao")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for name in args.attacks or list(ATTACKS):
        asyncio.run(run(name, args.binary, args.seconds))


if __name__ == "__main__":
    sys.exit(main())
