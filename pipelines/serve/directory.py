"""The ``StreamDirectory`` deployment: which streams exist, who serves them, how far their windows got.

Ingress replicas report their streams here (changed ones within a fraction of a second, all of them
every few seconds, with a heartbeat). It is what makes an ingress replica's death survivable:

* a push client that reconnects lands on a (new) replica, which finds the stream's record, continues
  its frame and event numbering and -- if a window was in progress -- restarts that window with an
  explicit ``window_restarted`` event;
* pull streams whose owner stopped heart-beating are handed to another replica (``orphans`` in the
  reply to :meth:`sync`), which reopens the source;
* listings, deletions and the server-wide budget work across ingress replicas.

It holds no model state and no frames, only small records, and it can itself be restarted: the next
full report of every ingress replica rebuilds it.
"""

from __future__ import annotations

import time
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

    def _alive(self, owner: str, now: float) -> bool:
        return now - self.heartbeats.get(owner, 0.0) <= self.stale_after_s

    async def sync(self, owner: str, records: list[dict[str, Any]], removed: list[str]) -> dict[str, Any]:
        """An ingress replica's report; the reply tells it what to delete and which orphans exist."""
        now = time.time()
        self.heartbeats[owner] = now
        for record in records:
            current = self.records.get(record["stream_id"])
            if current is not None and current.get("owner") != owner and self._alive(current["owner"], now) \
                    and current.get("updated", 0) > record.get("updated", 0):
                continue  # another live replica took the stream over since
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
        orphans = [r for r in self.records.values()
                   if r.get("kind") == "pull" and r["owner"] != owner and not self._alive(r["owner"], now)
                   and not r.get("closed")]
        return {"delete": deletes, "orphans": orphans, "budget": self.budget, "budget_version": self.budget_version}

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
