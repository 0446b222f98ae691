"""Shared fixtures. Unit tests that train or cache use ``tmp_home`` (a throw-away FTBOOK_HOME);
chapter and book tests use the real one, so the book build reuses the executions the tests made."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_home(tmp_path, monkeypatch):
    home = tmp_path / "ftbook-home"
    monkeypatch.setenv("FTBOOK_HOME", str(home))
    monkeypatch.delenv("FTBOOK_RECORDS", raising=False)
    monkeypatch.delenv("FTBOOK_EXEC_CACHE", raising=False)
    return home


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # No test may reach the Hugging Face hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
