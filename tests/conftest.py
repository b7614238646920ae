from __future__ import annotations

import socket

import pytest
from huggingface_hub import constants as hf_constants

# Nothing in the suite may reach past this machine: an accidental Hub call goes to a closed local port.
CLOSED_ENDPOINT = "http://127.0.0.1:9"


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path_factory, monkeypatch):
    """A private HF home, no token, online mode, and the closed endpoint, for every test."""
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "H0MINI_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    _point_hub_at(monkeypatch, CLOSED_ENDPOINT)
    return cache


@pytest.fixture
def point_hub_at(monkeypatch):
    return lambda endpoint: _point_hub_at(monkeypatch, endpoint)


@pytest.fixture(autouse=True)
def no_outside_network(monkeypatch):
    """Refuse connections to anything but loopback."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")):
            raise ConnectionRefusedError(f"tests may not reach {host}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
