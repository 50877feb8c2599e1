"""FileTail against real files: history, partial lines, truncation, rotation, huge lines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from otelwatch.events.lines import MAX_LINE_BYTES
from otelwatch.sources.tail import FileTail, NotRegularFile, open_regular

T = 1_700_000_000.0


def jl(*objs: dict) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def text(n: int) -> dict:
    return {"type": "assistant", "message": {"content": [{"type": "text", "text": f"step {n}"}]}}


def test_waits_for_a_file_that_does_not_exist_yet(tmp_path: Path) -> None:
    path = tmp_path / "later.jsonl"
    tail = FileTail(path)
    assert tail.poll(T) == ([], 0)
    path.write_bytes(jl(text(1)))
    events, bad = tail.poll(T + 1)
    # Appeared after we started watching: new, dated by the poll.
    assert [e.time for e in events] == [T + 1] and bad == 0


def test_history_dated_by_mtime_new_lines_by_now(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl({"type": "user", "message": {"content": "go"}}, text(1)))
    os.utime(path, (T - 500, T - 500))
    tail = FileTail(path)
    events, bad = tail.poll(T)
    assert bad == 0 and [e.time for e in events] == [T - 500, T - 500]
    assert events[0].turn == "open"
    with open(path, "ab") as fh:
        fh.write(jl(text(2)))
    events, _ = tail.poll(T + 1)
    assert [e.time for e in events] == [T + 1]
    assert tail.poll(T + 2) == ([], 0)


def test_partial_line_kept_until_newline(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"")
    tail = FileTail(path)
    tail.poll(T)
    whole = json.dumps(text(1)).encode()
    with open(path, "ab") as fh:
        fh.write(whole[:10])
    assert tail.poll(T + 1) == ([], 0)
    with open(path, "ab") as fh:
        fh.write(whole[10:] + b"\n")
    events, bad = tail.poll(T + 2)
    assert len(events) == 1 and bad == 0 and events[0].type == "assistant"


def test_garbage_lines_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(text(1)) + b"garbage\n\x00\x01\n\n" + b"[1]\n" + jl(text(2)))
    events, bad = FileTail(path).poll(T)
    assert len(events) == 2 and bad == 3  # the blank line is neither


def test_truncation_reads_from_start(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(text(1), text(2), text(3)))
    tail = FileTail(path)
    assert len(tail.poll(T)[0]) == 3
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(jl(text(9)))
    events, _ = tail.poll(T + 1)
    assert [e.detail for e in events] == ["step 9"] and events[0].time == T + 1


def test_rotation_drains_old_file_then_reads_new_from_start(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(text(1)))
    tail = FileTail(path)
    assert len(tail.poll(T)[0]) == 1
    with open(path, "ab") as fh:
        fh.write(jl(text(2)))  # written just before the rotation
    os.rename(path, tmp_path / "s.jsonl.1")
    path.write_bytes(jl(text(3), text(4)))
    events, _ = tail.poll(T + 1)
    assert [e.detail for e in events] == ["step 2", "step 3", "step 4"]


def test_removed_file_then_recreated(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(text(1)))
    tail = FileTail(path)
    tail.poll(T)
    path.unlink()
    assert tail.poll(T + 1) == ([], 0)
    path.write_bytes(jl(text(2)))
    events, _ = tail.poll(T + 2)
    assert [e.detail for e in events] == ["step 2"]


def test_overlong_line_skipped_without_buffering_it(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    huge = b'{"type":"assistant","pad":"' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n'
    path.write_bytes(jl(text(1)) + huge + jl(text(2)))
    tail = FileTail(path, max_read=256 << 10)  # several polls to get through it
    got, bad = [], 0
    for i in range(20):
        events, n = tail.poll(T + i)
        got += events
        bad += n
        assert len(tail._lines.partial) <= MAX_LINE_BYTES
    assert [e.detail for e in got] == ["step 1", "step 2"] and bad == 1


def test_read_budget_per_poll(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(*(text(i) for i in range(2000))))
    size = path.stat().st_size
    tail = FileTail(path, max_read=size // 4)
    first, _ = tail.poll(T)
    assert 0 < len(first) < 2000 and tail.offset <= size // 4
    total = len(first)
    for i in range(10):
        total += len(tail.poll(T + i)[0])
    assert total == 2000


def test_plain_text_mode(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    path.write_bytes(b"building\nlinking\n")
    events, bad = FileTail(path, source="exec", json_only=False).poll(T)
    assert [e.type for e in events] == ["line", "line"] and bad == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(text(1)))
    path.chmod(0)
    tail = FileTail(path)
    assert tail.poll(T) == ([], 0)
    assert tail.poll(T + 1) == ([], 0)
    assert tail.errors == 2 and "ermission" in tail.last_error


def test_unreadable_path_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Works as root too (root reads any file): a directory cannot be opened as a stream.
    path = tmp_path / "s.jsonl"
    path.mkdir()
    tail = FileTail(path)
    for i in range(3):
        assert tail.poll(T + i) == ([], 0)
    assert tail.errors == 3 and str(path) in tail.last_error
    assert sum("cannot read events file" in r.message for r in caplog.records) == 1


def test_released_tail_resumes_where_it_left_off(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(text(1)))
    tail = FileTail(path)
    assert len(tail.poll(T)[0]) == 1
    tail.release()
    with open(path, "ab") as fh:
        fh.write(jl(text(2)))
    events, _ = tail.poll(T + 1)
    assert [(e.detail, e.time) for e in events] == [("step 2", T + 1)]
    tail.release()
    os.rename(path, tmp_path / "old")  # another file at the path: read from its top
    path.write_bytes(jl(text(3)))
    assert [e.detail for e in tail.poll(T + 2)[0]] == ["step 3"]


# --------------------------------------------------------------------------- never block, never lose


def _poll_in_thread(tail: FileTail, now: float, unblock: Path | None = None) -> tuple[list, int]:
    """poll() on another thread, bounded: a poll that blocks fails the test (and is freed)."""
    import threading

    result: list[tuple[list, int]] = []
    worker = threading.Thread(target=lambda: result.append(tail.poll(now)), daemon=True)
    worker.start()
    worker.join(2.0)
    if worker.is_alive() and unblock is not None:
        fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)  # a writer frees a blocked open()
        os.close(fd)
        worker.join(2.0)
        pytest.fail(f"poll of {unblock} blocked")
    assert result, "poll did not return"
    return result[0]


def test_fifo_is_refused_without_blocking(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.fifo"
    os.mkfifo(path)
    tail = FileTail(path)
    for i in range(3):
        assert _poll_in_thread(tail, T + i, unblock=path) == ([], 0)
    assert tail.errors == 3 and "FIFO, not a regular file" in tail.last_error
    lines = [r.getMessage() for r in caplog.records if "cannot read events file" in r.getMessage()]
    assert len(lines) == 1 and str(path) in lines[0] and "FIFO" in lines[0]


def test_socket_and_device_are_refused(tmp_path: Path) -> None:
    import socket

    sock_path = tmp_path / "events.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(sock_path))
        for path, kind in ((sock_path, "socket"), (Path("/dev/zero"), "character device")):
            tail = FileTail(path)
            assert _poll_in_thread(tail, T) == ([], 0)
            assert tail.errors == 1 and f"is a {kind}" in tail.last_error


def test_file_replaced_by_a_fifo_is_drained_then_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(text(1)))
    tail = FileTail(path)
    assert len(tail.poll(T)[0]) == 1
    with open(path, "ab") as fh:
        fh.write(jl(text(2)))
    os.rename(path, tmp_path / "old")
    os.mkfifo(path)
    events, _ = _poll_in_thread(tail, T + 1, unblock=path)
    assert [e.detail for e in events] == ["step 2"] and "FIFO" in tail.last_error


def test_truncated_and_regrown_past_the_offset_is_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(*(text(i) for i in range(43))))
    tail = FileTail(path)
    assert len(tail.poll(T)[0]) == 43
    with open(path, "r+b") as fh:  # same inode, and bigger than before by the next poll
        fh.truncate(0)
        fh.write(jl(*(text(1000 + i) for i in range(50))))
    events, bad = tail.poll(T + 1)
    assert bad == 0 and [e.detail for e in events] == [f"step {1000 + i}" for i in range(50)]
    assert {e.time for e in events} == {T + 1}  # new lines, not history


def test_rewrite_with_the_same_head_is_noticed(tmp_path: Path) -> None:
    # Same first line (an agent's init line) longer than the head fingerprint: the
    # bytes just before the offset tell the rewrite apart.
    init = {"type": "system", "subtype": "init", "cwd": "/w/" + "p" * 700}
    path = tmp_path / "s.jsonl"
    path.write_bytes(jl(init, text(1)))
    tail = FileTail(path)
    assert len(tail.poll(T)[0]) == 2
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(jl(init, text(7), text(8), text(9)))
    assert [e.detail for e in tail.poll(T + 1)[0]][1:] == ["step 7", "step 8", "step 9"]


def test_appends_are_never_read_twice(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"")
    tail = FileTail(path)
    got = []
    for i in range(30):
        with open(path, "ab") as fh:
            fh.write(jl(text(i)))
        got += [e.detail for e in tail.poll(T + i)[0]]
        if i % 7 == 0:
            tail.release()
    assert got == [f"step {i}" for i in range(30)]


def test_open_regular_refuses_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "rollout.jsonl"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(NotRegularFile, match="is a FIFO, not a regular file") as err:
        open_regular(fifo)  # open() would wait here for a writer, forever
    assert time.monotonic() - start < 1.0 and isinstance(err.value, OSError)
    with pytest.raises(NotRegularFile, match="directory"):
        open_regular(tmp_path)
    good = tmp_path / "s.jsonl"
    good.write_bytes(jl(text(1), text(2)))
    with open_regular(good) as fh:  # buffered by default: readline is cheap
        assert json.loads(fh.readline(1 << 20)) == text(1)
