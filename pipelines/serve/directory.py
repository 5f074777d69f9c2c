"""The ``StreamDirectory`` deployment: which streams exist, who serves them, how far their windows got.

Ingress replicas report their streams here (changed ones within a fraction of a second, all of them
every few seconds, with a heartbeat). It is what makes an ingress replica's death survivable:

* a push client that reconnects lands on a (new) replica, which finds the stream's record, continues
  its frame and event numbering and -- if a window was in progress -- restarts that window with an
  explicit ``window_restarted`` event;
* pull streams whose owner stopped heart-beating are handed to another replica (``orphans`` in the
  reply to :meth:`sync`), which reopens the source;
* listings, deletions, changes and the server-wide budget work across ingress replicas;
* with several ingress replicas (``ingress_replicas``) a client's HTTP request lands on any of them:
  a server-sent-events request for a stream another replica serves is relayed through here -- the
  owner forwards that stream's events while someone watches it (:meth:`watch`, :meth:`relay`).

It holds no model state and no frames, only small records, and it can itself be restarted: the next
full report of every ingress replica rebuilds it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from ray import serve


@serve.deployment(name="StreamDirectory", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=1000)
class StreamDirectory:
    def __init__(self, stale_after_s: float = 5.0, forget_after_s: float = 300.0) -> None:
        self.stale_after_s = stale_after_s
        self.forget_after_s = forget_after_s
        self.records: dict[str, dict[str, Any]] = {}
        self.heartbeats: dict[str, float] = {}
        self.delete_requests: set[str] = set()
        self.budget: str | None = None
        self.budget_version = 0
        self.patch_requests: dict[str, dict[str, Any]] = {}
        # Relayed events: stream id -> when its last watcher asked (time.time()), the seq the events
        # are forwarded after (the lowest any watcher asked for), the events forwarded (seq, type, JSON
        # text), and a wake-up for the watchers waiting on them.
        self.watched: dict[str, float] = {}
        self.watch_from: dict[str, int] = {}
        self.relayed: dict[str, deque[tuple[int, str, str]]] = {}
        self.relay_ended: set[str] = set()
        self.arrivals: dict[str, asyncio.Event] = {}

    WATCH_EXPIRES_S = 15.0
    """A stream's events stop being forwarded when nobody has watched it for this long."""
    RELAY_RING = 512

    def _alive(self, owner: str, now: float) -> bool:
        return now - self.heartbeats.get(owner, 0.0) <= self.stale_after_s

    async def sync(self, owner: str, records: list[dict[str, Any]], removed: list[str]) -> dict[str, Any]:
        """An ingress replica's report; the reply tells it what to delete and which orphans exist."""
        now = time.time()
        self.heartbeats[owner] = now
        lost = []
        for record in records:
            current = self.records.get(record["stream_id"])
            if current is not None and current.get("owner") != owner and self._alive(current["owner"], now):
                # Another live replica took the stream over (``claim``: a reconnecting client, or an
                # adopted pull stream whose owner missed its heartbeats). A stream changes hands only
                # through a claim, so this report is stale however recently it was made: an overloaded
                # owner's next report, made after the adoption, must not take the stream back, or two
                # replicas would serve it (and read the same source) in turn.
                lost.append(record["stream_id"])
                continue
            self.records[record["stream_id"]] = dict(record, owner=owner)
        for stream_id in removed:
            current = self.records.get(stream_id)
            if current is not None and current.get("owner") == owner:
                del self.records[stream_id]
                self.delete_requests.discard(stream_id)
        # Forget streams nobody has served for a long time (a push client that never came back).
        for stream_id, record in list(self.records.items()):
            if not self._alive(record["owner"], now) and now - record.get("updated", 0) > self.forget_after_s:
                del self.records[stream_id]
        deletes = [s for s in self.delete_requests if self.records.get(s, {}).get("owner") == owner]
        patches = {s: self.patch_requests.pop(s) for s in list(self.patch_requests)
                   if self.records.get(s, {}).get("owner") == owner}
        orphans = [r for r in self.records.values()
                   if r.get("kind") == "pull" and r["owner"] != owner and not self._alive(r["owner"], now)
                   and not r.get("closed")]
        return {"delete": deletes, "patch": patches, "lost": lost, "orphans": orphans,
                "watched": self._watched_by(owner, now), "budget": self.budget,
                "budget_version": self.budget_version}

    # ------------------------------------------------------------------------ relayed events
    def _watched_by(self, owner: str, now: float) -> dict[str, int]:
        """The streams of ``owner`` somebody watches, with the seq their events are wanted after."""
        for stream_id, asked in list(self.watched.items()):
            if now - asked > self.WATCH_EXPIRES_S:
                self._unwatch(stream_id)
        return {s: self.watch_from.get(s, 0) for s in self.watched
                if self.records.get(s, {}).get("owner") == owner and s not in self.relay_ended}

    def _unwatch(self, stream_id: str) -> None:
        for table in (self.watched, self.watch_from, self.relayed, self.arrivals):
            table.pop(stream_id, None)
        self.relay_ended.discard(stream_id)

    async def relay(self, owner: str, events: dict[str, list[tuple[int, str, str]]],
                    ended: list[str], starts: dict[str, int] | None = None) -> dict[str, int]:
        """An owner forwards the new events of watched streams (``ended``: streams whose events ended;
        ``starts``: the seq each stream's forwarding began after); the reply is what it should forward
        from now on (as in the reply to :meth:`sync`)."""
        for stream_id, batch in events.items():
            if stream_id not in self.watched:
                continue
            if starts is not None and starts.get(stream_id, 0) > self.watch_from.get(stream_id, 0):
                continue  # forwarded from a later seq than now wanted: the owner starts again (watch)
            ring = self.relayed.setdefault(stream_id, deque(maxlen=self.RELAY_RING))
            last = ring[-1][0] if ring else -1
            ring.extend(e for e in batch if e[0] > last)
        for stream_id in ended:
            if stream_id in self.watched:
                self.relay_ended.add(stream_id)
        for stream_id in set(events) | set(ended):
            arrival = self.arrivals.get(stream_id)
            if arrival is not None:
                arrival.set()
        self.heartbeats[owner] = time.time()
        return self._watched_by(owner, time.time())

    async def watch(self, stream_id: str, after: int, wait_s: float = 10.0) -> dict[str, Any] | None:
        """A non-owner replica's server-sent-events request: the stream's relayed events after ``after``,
        waiting up to ``wait_s`` for some; None if there is no such stream. ``ended``: no more will come."""
        record = self.records.get(stream_id)
        if record is None and stream_id not in self.relay_ended:
            return None
        now = time.time()
        if stream_id not in self.watched:
            self.watch_from[stream_id] = after
        elif after < self.watch_from.get(stream_id, 0) and stream_id not in self.relay_ended:
            # A watcher that wants earlier events than are forwarded (a client replaying from the start
            # while another watches live): the owner forwards again from here, so every watcher gets
            # its events in order; until then the ring is empty.
            self.watch_from[stream_id] = after
            self.relayed.pop(stream_id, None)
        self.watched[stream_id] = now
        deadline = now + wait_s
        while True:
            ring = self.relayed.get(stream_id, ())
            events = [e for e in ring if e[0] > after]
            ended = stream_id in self.relay_ended or record is None or bool(record.get("closed"))
            if events or ended or time.time() >= deadline:
                return {"events": events, "ended": ended and not events,
                        "owner": (record or {}).get("owner"), "owner_alive": record is not None
                        and self._alive(record["owner"], time.time())}
            arrival = self.arrivals.setdefault(stream_id, asyncio.Event())
            arrival.clear()
            try:
                await asyncio.wait_for(arrival.wait(), timeout=max(0.01, deadline - time.time()))
            except asyncio.TimeoutError:
                pass
            self.watched[stream_id] = time.time()
            record = self.records.get(stream_id)

    async def claim(self, stream_id: str, owner: str) -> dict[str, Any] | None:
        """Take a stream over (a reconnecting client, an orphan); returns its previous record, if any.
        Atomic: a replica's methods run one at a time between awaits, and this one has none."""
        record = self.records.get(stream_id)
        if record is None:
            return None
        now = time.time()
        if record.get("owner") != owner and self._alive(record["owner"], now) and record.get("kind") == "pull":
            return {"claimed_by": record["owner"], **record}
        previous = dict(record)
        record["owner"] = owner
        record["updated"] = now
        return previous

    async def get(self, stream_id: str) -> dict[str, Any] | None:
        record = self.records.get(stream_id)
        if record is None:
            return None
        return dict(record, owner_alive=self._alive(record["owner"], time.time()))

    async def all(self) -> list[dict[str, Any]]:
        now = time.time()
        return [dict(r, owner_alive=self._alive(r["owner"], now)) for r in self.records.values()]

    async def request_patch(self, stream_id: str, fields: dict[str, Any]) -> bool:
        """A change for the stream's owner, applied at its next sync."""
        if stream_id not in self.records:
            return False
        self.patch_requests.setdefault(stream_id, {}).update(fields)
        return True

    async def request_delete(self, stream_id: str) -> bool:
        if stream_id not in self.records:
            return False
        self.delete_requests.add(stream_id)
        return True

    async def set_budget(self, budget: str | None) -> int:
        """The server-wide budget; returns its version (replicas apply only versions newer than theirs)."""
        self.budget = budget
        self.budget_version += 1
        return self.budget_version

    async def get_budget(self) -> str | None:
        return self.budget
