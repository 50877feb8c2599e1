"""Which reader follows a session's events path: `open_feed`.

Most events paths are JSON-lines files (`FileTail` with the common parser). The
agents that keep their own formats get their own reader: Gemini CLI's chat files
(gemini.py), aider's chat history markdown (aider.py), opencode's SQLite event log
(opencode.py, named `<db>#session=<id>`). Each has `path`, `source`,
`poll(now) -> (events, malformed)` and `close()`.

Chooses only; never reads anything itself.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from otelwatch.model import Event
from otelwatch.sources.aider import HISTORY_NAME, HistoryParser
from otelwatch.sources.gemini import parse_chat_line
from otelwatch.sources.opencode import OpencodeFeed, split_path
from otelwatch.sources.tail import FileTail

__all__ = ["EventFeed", "open_feed"]


class EventFeed(Protocol):
    path: str
    source: str

    def poll(self, now: float) -> tuple[list[Event], int]: ...

    def close(self) -> None: ...


def open_feed(agent: str, path: str, source: str, *, owners: Collection[int] | None = None,
              own: bool = False) -> FileTail | OpencodeFeed:
    """The reader of `path` for a session of `agent` (events tagged with `source`). `owners`:
    the users who may own what is read (DESIGN "Users are walls"); `own`: its events are
    the session's own."""
    if agent == "opencode" and split_path(path) is not None:
        return OpencodeFeed(path, source=source, owners=owners, own=own)
    if source == "transcript" and agent == "gemini" and path.endswith(".jsonl"):
        return FileTail(path, source=source, parser=parse_chat_line, owners=owners, own=own)
    if agent == "aider" and (path.endswith(".md") or path.endswith(HISTORY_NAME)):
        return FileTail(path, source=source, json_only=False, parser=HistoryParser().parse, owners=owners, own=own)
    return FileTail(path, source=source, owners=owners, own=own)
