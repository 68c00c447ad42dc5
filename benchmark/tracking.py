"""Weights & Biases that never costs a run: with the server unreachable (a cluster's compute node, a laptop on
a train), a run logs offline and says how to upload it later, instead of failing after wandb's two-minute wait.

Reachability is decided twice: by a TCP connection to ``WANDB_BASE_URL`` (a few seconds at most), and, for a
server that answers the connection but not the run, by ``wandb.init`` with a short ``init_timeout``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 5.0
INIT_TIMEOUT_S = 30.0  # wandb's own default is 90 s, and its resume check retries on top of it


def server() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def unreachable(timeout: float = CONNECT_TIMEOUT_S) -> Optional[str]:
    """Why the W&B server cannot be reached, or None when a TCP connection to it opens."""
    url = urlsplit(server())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{server()} is unreachable ({e.strerror or type(e).__name__})"
    return None


def resolve(mode: str) -> tuple[str, Optional[str]]:
    """The mode to log in and, where ``online`` had to become ``offline``, why."""
    if mode != "online":
        return mode, None
    why = unreachable()
    return ("offline", why) if why else ("online", None)


def start(make: Callable[[str], object], mode: str) -> tuple[object, Optional[str]]:
    """``make(mode)`` builds a W&B run, or a logger whose run starts on ``.experiment``; returns it started and,
    where ``online`` was asked for and it logs offline, a line that says why and how to upload it."""
    import wandb

    mode, why = resolve(mode)
    os.environ.setdefault("WANDB_INIT_TIMEOUT", str(INIT_TIMEOUT_S))  # read by wandb.init; a user's value wins
    if mode == "online":
        try:
            made = make(mode)
            _run(made)
            return made, None
        except (wandb.Error, TimeoutError) as e:  # CommError (no answer), AuthenticationError (a rejected key)
            wandb.teardown()  # the failed run's service still holds the run's id
            why = f"{server()} did not start the run ({type(e).__name__}: {str(e).splitlines()[0]})"
            mode = "offline"
    made = make(mode)
    if why is None:
        return made, None
    return made, offline_note(why, Path(_run(made).dir).parent)


def offline_note(why: str, folder) -> str:
    return f"W&B offline: {why}; upload later with `wandb sync {folder}`"


def _run(made):
    return getattr(made, "experiment", made)
