"""Hub access while a teacher is built: fail fast and in one line when the Hugging Face hub cannot be reached,
instead of the libraries' own retries (tens of seconds and lines of warnings before their error)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator


def offline_note(why: str) -> str:
    return (f"not in the local hub cache and {why}: fetch it where there is network, or pass a local directory; "
            "then set HF_HUB_OFFLINE=1")


offline_reason = ""  # why the hub is off while a teacher is built (`_offline_unless_reachable`), for timm's message


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub (or the HTTPS proxy in the environment), given up after ``timeout`` seconds,
    name resolution included; the libraries' own attempts retry for tens of seconds before failing."""
    import socket
    import threading
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urlsplit(proxy if proxy and hub_endpoint().startswith("https:") else hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(ok)


@contextlib.contextmanager
def _offline_unless_reachable() -> Iterator[str]:
    """Yields why the hub is off ("" when it is reachable); while off, huggingface_hub (which transformers, timm
    and open_clip download through) reads only its local cache instead of retrying."""
    import huggingface_hub.constants as hub

    global offline_reason
    if hub.HF_HUB_OFFLINE:
        why, forced = "HF_HUB_OFFLINE is set", False
    elif hub_reachable():
        why, forced = "", False
    else:
        why, forced = f"{hub_endpoint()} is unreachable", True
    hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE or forced
    offline_reason = why
    try:
        yield why
    finally:
        offline_reason = ""
        if forced:
            hub.HF_HUB_OFFLINE = False


@contextlib.contextmanager
def _offline_unless_reachable_quiet() -> Iterator[str]:
    """`_offline_unless_reachable`, without timm's "Loading pretrained weights from Hugging Face hub" line when the
    hub is off: the one line that matters then is the failure (or nothing)."""
    with _offline_unless_reachable() as offline:
        timm_log = logging.getLogger("timm")
        level = timm_log.level
        if offline:
            timm_log.setLevel(logging.WARNING)
        try:
            yield offline
        finally:
            timm_log.setLevel(level)
