"""Child processes of the multi-process tests: a free localhost port, and a fixture that
kills every child a test started (so a failed test never leaves a coordinator running)."""

from __future__ import annotations

import socket
import subprocess

import pytest

CHILDREN: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def reap_children():
    """No child outlives its test."""
    yield
    while CHILDREN:
        proc = CHILDREN.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
