from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import Spawner, TcpServer


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.cleanup()


@pytest.fixture
def tcp_server() -> Iterator[TcpServer]:
    server = TcpServer("127.0.0.1")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tcp_server6() -> Iterator[TcpServer]:
    server = TcpServer("::1")
    try:
        yield server
    finally:
        server.close()
