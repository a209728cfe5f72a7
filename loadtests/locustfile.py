"""Locust scenarios against a quotagate deployment (run by run_locust.py, which writes the
tenants and paths to QG_SCENARIO and checks the outcome): its own stack in front of the demo
upstream, or any deployment (``--host``, tenants from a file).

- ``QpsTenant``: many tenants on mixed plans, each sending above its QPS limit;
- ``QuotaBurner``: one tenant burning through its monthly quota into a pack, then overage;
- ``WatchStorm``: realtime sockets opening watches past the environment's cap;
- ``AiChat``: AI chats over SSE (50 calls each), read to the end.

Refusals (429) are expected outcomes, not failures. Every outcome is counted per second, tenant
and result in OUTCOMES and written to ``$QG_OUT/outcomes.json`` when the run stops, with the
most watches the clients held open at once (``watch_peak``).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import cast

import websocket
from locust import HttpUser, User, between, constant_pacing, events, task

SCENARIO = json.loads(os.environ.get("QG_SCENARIO", "{}"))
OUT = Path(os.environ.get("QG_OUT", "."))
#: (second since start, tenant, outcome) -> count
OUTCOMES: Counter[tuple[int, str, str]] = Counter()
_LOCK = threading.Lock()
_START = time.time()
PATHS = {"qps": "/functions/hello", "burner": "/database/query",
         "chat": "/ai/chat?events=5&delay_ms=10", "live": "/?event_ms=1000",
         **SCENARIO.get("paths", {})}
#: Events a chat's stream holds (the demo upstream's 5 + [DONE]); None: any, read to the end.
CHAT_EVENTS = SCENARIO.get("chat_events")
#: Watches the clients hold open now, and the most at once. A watch counts from its
#: INIT_EVENT (after the store admitted it) until its close is sent (before the store lets
#: it go), so this never exceeds the store's count.
WATCHES = {"open": 0, "peak": 0}


def watches(change: int) -> None:
    with _LOCK:
        WATCHES["open"] += change
        WATCHES["peak"] = max(WATCHES["peak"], WATCHES["open"])


def count(tenant: str, outcome: str, n: int = 1) -> None:
    with _LOCK:
        OUTCOMES[(int(time.time() - _START), tenant, outcome)] += n


@events.test_stop.add_listener
def _write(**_: object) -> None:
    rows = [{"second": s, "tenant": t, "outcome": o, "count": n}
            for (s, t, o), n in sorted(OUTCOMES.items())]
    (OUT / "outcomes.json").write_text(json.dumps(rows))
    (OUT / "watches.json").write_text(json.dumps({"peak": WATCHES["peak"]}))


def _get(user: HttpUser, tenant: str, path: str, **kw: object) -> int:
    extra = cast(dict[str, str], kw.pop("headers", {}))
    with user.client.get(path, headers={"X-CloudBase-Env": tenant, **extra},
                         name=f"{tenant} {path.split('?')[0]}", catch_response=True,
                         **kw) as resp:
        if resp.status_code in (200, 429):
            resp.success()  # a refusal is the gateway doing its job
        count(tenant, {200: "admitted", 429: "refused"}.get(resp.status_code, "error"))
        return resp.status_code


class QpsTenant(HttpUser):
    """A tenant's client sending about twice its QPS limit."""

    weight = 6
    wait_time = constant_pacing(0.05)

    _next = 0

    def on_start(self) -> None:
        # Round robin: every tenant gets clients (each offers ~20 requests/s).
        tenants = SCENARIO.get("qps_tenants", ["t1"])
        self.tenant = tenants[QpsTenant._next % len(tenants)]
        QpsTenant._next += 1

    @task
    def call(self) -> None:
        _get(self, self.tenant, PATHS["qps"])


class QuotaBurner(HttpUser):
    """One tenant spending its calls: plan quota, then its pack, then pay-as-you-go."""

    weight = 2
    wait_time = between(0.005, 0.02)

    @task
    def call(self) -> None:
        _get(self, SCENARIO.get("burner", "burner"), PATHS["burner"])


class AiChat(HttpUser):
    """AI chats over SSE: 50 calls each, streamed to the end."""

    weight = 1
    wait_time = between(0.2, 0.5)

    @task
    def chat(self) -> None:
        tenant = SCENARIO.get("chat", "chat")
        with self.client.post(PATHS["chat"],
                              headers={"X-CloudBase-Env": tenant, "Accept": "text/event-stream"},
                              name=f"{tenant} /ai/chat", stream=True,
                              catch_response=True) as resp:
            if resp.status_code == 200:
                try:
                    events_seen = sum(1 for line in resp.iter_lines()
                                      if line.startswith(b"data:"))
                except Exception:  # a stream broken mid-read is an error
                    events_seen = 0
                whole = events_seen > 0 and CHAT_EVENTS in (None, events_seen)
                count(tenant, "admitted" if whole else "error")
                resp.success()
            elif resp.status_code == 429:
                count(tenant, "refused")
                resp.success()
            else:
                count(tenant, "error")


class WatchStorm(User):
    """Realtime clients opening watches on one socket each, past the environment's cap, and
    closing them after a while."""

    weight = 1
    wait_time = between(0.1, 0.3)

    def on_start(self) -> None:
        host = (self.host or "").replace("https://", "wss://").replace("http://", "ws://")
        self.tenant = SCENARIO.get("live", "live")
        self.ws = websocket.create_connection(f"{host.rstrip('/')}{PATHS['live']}", timeout=10,
                                              header=[f"X-CloudBase-Env: {self.tenant}"])
        self.open: list[str] = []
        self.n = 0

    def on_stop(self) -> None:
        watches(-len(self.open))
        self.ws.close()

    @task
    def storm(self) -> None:
        try:
            self._storm()
        except Exception:  # a broken socket: an error, and its watches are gone
            count(self.tenant, "error")
            watches(-len(self.open))
            self.open = []
            raise

    def _storm(self) -> None:
        self.n += 1
        wid = f"w{id(self)}-{self.n}"
        started = time.perf_counter()
        self.ws.send(json.dumps({"watchId": wid, "requestId": wid, "msgType": "INIT_WATCH",
                                 "msgData": {"collName": "todos", "query": "{}"}}))
        while True:
            frame = json.loads(self.ws.recv())
            if frame.get("requestId") == wid:
                break
        ok = frame["msgType"] == "INIT_EVENT"
        events.request.fire(request_type="WS", name=f"{self.tenant} INIT_WATCH",
                            response_time=(time.perf_counter() - started) * 1000,
                            response_length=0, exception=None, context={})
        count(self.tenant, "watch-admitted" if ok else "watch-refused")
        if ok:
            self.open.append(wid)
            watches(+1)
        if self.open and random.random() < 0.3:  # some watches close, making room
            closing = self.open.pop(0)
            watches(-1)
            self.ws.send(json.dumps({"watchId": closing, "requestId": "c" + closing,
                                     "msgType": "CLOSE_WATCH", "msgData": {}}))
