"""What the templates call: times in UTC with a relative time beside, durations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar.plugins.jinja import JinjaTemplateEngine


def iso(at: datetime | None) -> str:
    """ISO 8601 in UTC (`data-at`, `<time datetime>`)."""
    return "" if at is None else at.astimezone(UTC).isoformat()


def utc(at: datetime | None) -> str:
    return "—" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None) -> str:
    """`42 s`, `3 min`, `2 h 5 min`, `3 d 4 h`."""
    if seconds is None:
        return "—"
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def ago(at: datetime | None, now: datetime) -> str:
    """`3 min ago` (or `in 3 min` for a time ahead of `now`)."""
    if at is None:
        return ""
    seconds = (now - at).total_seconds()
    if abs(seconds) < 5:
        return "just now"
    return f"{duration(seconds)} ago" if seconds > 0 else f"in {duration(seconds)}"


def short(value: Any, keep: int = 8) -> str:
    """The start of an id, for narrow columns (the full one is in the link's title)."""
    text = str(value)
    return text if len(text) <= keep else text[:keep] + "…"


def register(engine: JinjaTemplateEngine) -> None:
    engine.engine.filters.update(iso=iso, utc=utc, duration=duration, short=short)
    engine.engine.globals.update(ago=ago)
