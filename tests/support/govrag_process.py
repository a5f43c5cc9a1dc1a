"""This checkout's `govrag` command in a process of its own, as a user runs it: its exit code, stdout and stderr."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from authz.dev_issuer import DevIssuer
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]


def govrag_env(**settings: str) -> dict[str, str]:
    """This process's environment without its GOVRAG_* variables, with these settings instead (data_dir="..." for
    GOVRAG_DATA_DIR)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GOVRAG_")}
    env.update({f"GOVRAG_{name.upper()}": value for name, value in settings.items()})
    return env


def run_govrag(argv: Sequence[str], *, env: Mapping[str, str] | None = None, prefix: Sequence[str] = (),
               timeout: float = 600, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`govrag argv` with `env` (this process's when None), run through the command `prefix`, until it exits; more
    than `timeout` seconds raises subprocess.TimeoutExpired. `root`: the checkout it runs from (another install)."""
    return subprocess.run([*prefix, sys.executable, "-m", "api.cli", *argv], cwd=root, env=env,  # noqa: S603
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_refusal(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    """The exit code and the line a start was refused with (its last, after the log lines of the steps before); no
    traceback, and uvicorn never started."""
    assert "Traceback" not in result.stderr and "Started server process" not in result.stderr, result.stderr[-3000:]
    return result.returncode, result.stderr.splitlines()[-1]


def start_govrag(argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`govrag argv` with `env` (this process's when None) started, its stdout and stderr added to `log`; the caller
    stops it."""
    with log.open("ab") as output:
        return subprocess.Popen([sys.executable, "-m", "api.cli", *argv], cwd=ROOT, env=env,  # noqa: S603
                                stdout=output, stderr=subprocess.STDOUT)


def wait_serving(process: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 180) -> None:
    """Returns once the `govrag serve` `process` answers `url`/healthz; fails with the end of its `log` if it exits
    first, or after `timeout` seconds (killed then, so no failure leaves it running)."""

    def answers() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, timeout, f"govrag serve to answer at {url}", every=0.3)
    except BaseException:
        process.kill()
        process.wait()
        raise


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now, for a `govrag serve` to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_govrag(process: subprocess.Popen[bytes], stop: signal.Signals = signal.SIGINT, timeout: float = 120) -> int:
    """Ctrl-C for `process` (or the signal `stop`: SIGTERM, as systemd, docker or Kubernetes stop it), and its exit
    code once it stopped; killed if it has not after `timeout` seconds (its code then the kill's, -9)."""
    process.send_signal(stop)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def desk_editor(base: str, data_dir: Path, admin: str) -> dict[str, str]:
    """The headers of `stella`, made an editor of a new department `desk` by `admin` (one of GOVRAG_ADMINS) through
    the `govrag serve` answering at `base`, on the dev issuer whose key is in `data_dir`."""
    issuer = DevIssuer.load_or_create(data_dir / "dev-issuer", "govrag-dev-issuer", "govrag")
    as_admin = {"Authorization": f"Bearer {issuer.issue(admin, [])}"}
    assert httpx.post(f"{base}/v1/admin/departments", json={"name": "desk"}, headers=as_admin).status_code == 201
    assert httpx.post(f"{base}/v1/admin/role-assignments", headers=as_admin, json={
        "subject": "stella", "role": "editor", "department": "desk"}).status_code == 201
    return {"Authorization": f"Bearer {issuer.issue('stella', [])}"}
