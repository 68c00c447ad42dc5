"""W&B never costs a run: with the server unreachable (a closed loopback port) or silent (a loopback port that
accepts connections and never answers), a study's runs log offline within a bounded delay, the console says so
in one line with the command that uploads them later, and the study finishes with its leaderboard."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from benchmark import tracking
from benchmark.records import read_record
from helpers import free_port, progress_lines, write_study
from test_study import offline_run, run_study

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "k" * 40  # any 40 characters: wandb checks the key's form before it talks to the server


@pytest.fixture
def silent_server():
    """A loopback port that accepts connections and never answers them."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_closed_port_is_unreachable_and_a_listening_one_is_not(monkeypatch, silent_server):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    why = tracking.unreachable()
    assert why is not None and "127.0.0.1" in why and "unreachable" in why
    assert tracking.resolve("online") == ("offline", why)
    assert tracking.resolve("disabled") == ("disabled", None)  # only online is ever probed
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent_server}")
    assert tracking.unreachable() is None and tracking.resolve("online") == ("online", None)


def test_with_the_server_unreachable_a_study_logs_offline_and_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = write_study(tmp_path, "cut_off", ["no_info"], [0])
    start = time.perf_counter()
    code = run_study(path, tmp_path / "results", tmp_path / "runs")  # online: the key is set
    took = time.perf_counter() - start
    out = capsys.readouterr().out
    assert code == 0, out
    notes = [line for line in progress_lines(out) if "W&B offline" in line]
    assert len(notes) == 1 and "unreachable" in notes[0] and "wandb sync" in notes[0], out
    assert "Traceback" not in out and "leaderboard written" in out
    record = read_record(tmp_path / "results" / "runs" / "cut_off" / "digits_binary-no_info-s0.json")
    assert record["status"] == "finished" and record["wandb_offline"] is None  # the study decided, before it
    assert offline_run(tmp_path / "runs" / "cut_off" / "digits_binary-no_info-s0").is_dir()
    assert offline_run(tmp_path / "runs" / "cut_off").is_dir()  # the leaderboard's table, offline too
    assert took < 120, f"{took:.0f} s: the fallback must not wait out wandb's retries"


def test_a_server_that_never_answers_costs_a_bounded_wait_and_the_run(tmp_path, monkeypatch, capsys,
                                                                      silent_server):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent_server}")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    path = write_study(tmp_path, "silent", ["no_info"], [0])
    start = time.perf_counter()
    code = run_study(path, tmp_path / "results", tmp_path / "runs", "--wandb", "online")
    took = time.perf_counter() - start
    out = capsys.readouterr().out
    assert code == 0, out
    record = read_record(tmp_path / "results" / "runs" / "silent" / "digits_binary-no_info-s0.json")
    assert record["status"] == "finished", record["reason"]
    note = record["wandb_offline"]
    assert note and "did not start the run" in note and "wandb sync" in note, note
    finished = [line for line in progress_lines(out) if "digits_binary-no_info-s0: finished" in line]
    assert len(finished) == 1 and "W&B offline" in finished[0], out
    synced = note.split("wandb sync ")[1].rstrip("`")
    assert synced == str(offline_run(tmp_path / "runs" / "silent" / "digits_binary-no_info-s0"))
    assert "Traceback" not in out and "leaderboard written" in out
    assert took < 150, f"{took:.0f} s for two W&B runs that each wait at most their init timeout"
