"""Cutting a live stream into recognition windows, and choosing which frames the model sees.

Training showed the model ``T`` frames spread evenly over a clip, so a window of ``D`` seconds feeds it
one frame every ``D / T`` seconds of *stream time*, in arrival order (the demo model is trained in
natural order for exactly this). A window ends after ``T`` frames, when the exit rule fires (then no
frame of it reaches the model any more: the saving of early exit), or when its ``D`` seconds are over;
the next window starts with the first frame at or after ``start + D``. With ``D = 0`` windows are ``T``
consecutive frames.

Stream time is the frame's media timestamp (pull sources, MPEG-TS chunks, timestamped images) or its
arrival time; :class:`StreamClock` keeps it monotonic across reconnects and timestamp resets.

All of this is plain bookkeeping -- no I/O, no model -- so it is tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowSpec:
    frames: int
    """At most this many frames reach the model per window."""
    seconds: float
    """Window duration in stream time; 0 = ``frames`` consecutive frames."""

    @property
    def interval(self) -> float:
        """Stream time between two frames the model sees."""
        return self.seconds / self.frames if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"frames": self.frames, "seconds": self.seconds}


@dataclass(frozen=True)
class Admission:
    """A frame the model should see: step ``slot`` (0-based) of window ``window``."""

    window: int
    slot: int


class Windower:
    """Decides, frame by frame, which frames are fed to the model and in which window.

    ``admit(t)`` is called for every arriving frame (stream time ``t``) and returns an
    :class:`Admission` or None (not sampled, or the window is already decided). ``close(window)``
    records that the window's result is known (exit rule fired), so the rest of its frames are skipped.
    """

    # A frame slightly early still takes the slot -- the frame nearest the slot's time, i.e. up to half
    # a source frame early (and never more than a quarter interval): timestamps of a 25 fps source do
    # not fall on a 0.25 s grid, and waiting for the next frame would skew the sampling late.
    EARLY_TOLERANCE = 0.25

    def __init__(self, spec: WindowSpec, first_window: int = 0) -> None:
        if spec.frames <= 0:
            raise ValueError("a window needs at least one frame")
        self.spec = spec
        self.window = first_window - 1  # no window yet
        self.started = False
        self.start = 0.0
        self.slots = 0  # frames admitted in the current window
        self.seen = 0  # frames offered in the current window (frame-count windows)
        self.next_due = 0.0
        self.closed = False
        self.last_t: float | None = None
        self.frame_gap = 0.0  # running estimate of the source's frame interval

    def _open(self, t: float) -> None:
        self.window += 1
        self.started = True
        self.start = t
        self.slots = 0
        self.seen = 0
        self.next_due = t
        self.closed = False

    def admit(self, t: float, previous: float | None = None) -> Admission | None:
        """``previous``: stream time of the source's frame just before this one, when that frame was
        not offered (a source reader that leaves out the frames before ``wanted_from`` itself): it
        keeps the estimate of the source's frame interval, which decides how early a frame may be."""
        spec = self.spec
        if spec.seconds <= 0:
            return self._admit_by_count(t)
        last = self.last_t if previous is None else previous
        if last is not None and t > last and t - last < 0.5 * spec.interval:
            # Only gaps well inside a slot interval say how often the source has frames: longer ones
            # are frames a client left out (it sends from ``wanted_from`` on) or a stalled source.
            gap = t - last
            self.frame_gap = gap if self.frame_gap == 0 else 0.9 * self.frame_gap + 0.1 * gap
        self.last_t = t
        if not self.started:
            self._open(t)
        elif t >= self.start + spec.seconds:
            # Windows tile stream time; after a long gap (a stalled source) re-anchor on this frame
            # rather than running through empty windows.
            following = self.start + spec.seconds
            self._open(following if t < following + spec.seconds else t)
        if self.closed or self.slots >= spec.frames:
            return None
        interval = spec.interval
        if t < self.next_due - self._early():
            return None
        admission = Admission(self.window, self.slots)
        self.slots += 1
        # Stay on the grid of the window (an on-time frame keeps the 0.25 s rhythm however the
        # source's timestamps fall), but a late frame pushes the next slot at least half an interval
        # away, so jitter never feeds the model two near-identical frames.
        self.next_due = max(self.next_due + interval, t + 0.5 * interval)
        return admission

    def wanted_from(self) -> float | None:
        """Stream time of the earliest frame the model will use next. Frames before it are offered only
        to be skipped, so a client that knows this may leave them out (``next_pts`` in the events):
        between two sampled frames, and after an exit until the next window. None when every frame
        counts (frame-count windows) or no window has started."""
        spec = self.spec
        if spec.seconds <= 0 or not self.started:
            return None
        if self.closed or self.slots >= spec.frames:
            return self.start + spec.seconds
        return self.next_due - self._early()

    def _early(self) -> float:
        """How early a frame may be and still take the next slot (see ``EARLY_TOLERANCE``)."""
        early = self.EARLY_TOLERANCE * self.spec.interval
        if self.frame_gap > 0:
            early = min(early, 0.5 * self.frame_gap + 1e-9)
        return early

    def _admit_by_count(self, t: float) -> Admission | None:
        if not self.started or self.seen >= self.spec.frames:
            self._open(t)
        self.seen += 1
        if self.closed:
            return None
        admission = Admission(self.window, self.slots)
        self.slots += 1
        return admission

    def close(self, window: int) -> None:
        """The result of ``window`` is known: feed none of its remaining frames."""
        if window == self.window:
            self.closed = True


class StreamClock:
    """Media timestamps -> monotonic stream time in seconds.

    Sources restart their timestamps (a reconnect, an MPEG-TS discontinuity, a looping file), jump, or
    have none. The clock keeps an offset so stream time never goes back and never jumps by more than
    ``max_gap`` seconds; frames without a timestamp advance it by one nominal frame interval.
    """

    def __init__(self, fps: float = 25.0, max_gap: float = 5.0) -> None:
        self.fps = fps if fps and fps > 0 else 25.0
        self.max_gap = max_gap
        self.offset: float | None = None
        self.last: float | None = None

    def __call__(self, media_time: float | None) -> float:
        step = 1.0 / self.fps
        if media_time is None or not math.isfinite(media_time):
            self.last = 0.0 if self.last is None else self.last + step
            return self.last
        if self.offset is None:
            self.offset = -media_time
        t = media_time + self.offset
        if self.last is not None and (t <= self.last - 1e-6 or t > self.last + self.max_gap):
            # Discontinuity: continue one frame after the last one.
            self.offset = self.last + step - media_time
            t = self.last + step
        self.last = t
        return t

    def continue_from(self, last: float) -> None:
        """Resume after stream time ``last`` (a stream another replica was serving)."""
        self.last = last
        self.offset = None
