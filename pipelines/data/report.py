"""What happened to every video that was not simply decoded: skipped or repaired, and why.

A :class:`DataReport` is a plain object (the data doctor fills it directly). Inside a Ray job, the
decode tasks send their records to one :class:`DataReport` running as a Ray actor
(:func:`remote_report`), which the driver reads at the end of the run. Records are keyed by path, so
a bad video seen again in every epoch is counted once.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class VideoIssue:
    path: str
    status: str  # "skipped" or "repaired"
    reason: str


class DataReport:
    def __init__(self) -> None:
        self._issues: dict[str, VideoIssue] = {}
        self._ok_paths: set[str] = set()

    def add(self, records: list[dict]) -> None:
        """Record ``{"path", "status", "reason"}`` dicts (status ``ok`` records count usable videos)."""
        for record in records:
            if record["status"] == "ok":
                self._ok_paths.add(record["path"])
            else:
                self._issues[record["path"]] = VideoIssue(record["path"], record["status"], record["reason"])

    def issues(self) -> list[VideoIssue]:
        return sorted(self._issues.values(), key=lambda issue: issue.path)

    def skipped(self) -> list[VideoIssue]:
        return [issue for issue in self.issues() if issue.status == "skipped"]

    def repaired(self) -> list[VideoIssue]:
        return [issue for issue in self.issues() if issue.status == "repaired"]

    def counts(self) -> dict[str, int]:
        counts = Counter(issue.status for issue in self._issues.values())
        return {"ok": len(self._ok_paths - set(self._issues)), "repaired": counts.get("repaired", 0),
                "skipped": counts.get("skipped", 0)}

    def to_dict(self) -> dict:
        return {"counts": self.counts(), "issues": [asdict(issue) for issue in self.issues()]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def summary(self) -> str:
        """A short human-readable account, for the end of a run."""
        counts = self.counts()
        lines = [f"videos: {counts['ok']} ok, {counts['repaired']} repaired, {counts['skipped']} skipped"]
        for issue in self.issues():
            lines.append(f"  {issue.status:8s} {issue.path}: {issue.reason}")
        return "\n".join(lines)


def remote_report(name: str | None = None):
    """Start a :class:`DataReport` as a Ray actor (optionally named, so other jobs can find it)."""
    import ray

    actor = ray.remote(num_cpus=0)(DataReport)
    return actor.options(name=name).remote() if name else actor.remote()
