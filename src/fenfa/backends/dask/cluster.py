"""Where the dask backend's work goes: a scheduler's client, and the local cluster.

A pool (and ``fenfa run --backend dask``) reaches a cluster through one
``distributed.Client``: at ``address``, else at Dask's own setting
(``DASK_SCHEDULER_ADDRESS``, or ``dask.config.set``), as a bare
``distributed.Client()`` would; a pool with neither starts a
``LocalCluster`` of its own and closes it after the client. An address
that answers nothing is :class:`~fenfa.errors.BackendUnavailable` within
Dask's connect timeout, naming the address and the setting that sets the
wait, never a hang or a traceback from distributed's IO loop.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import dask.config
import dask.utils
import distributed

from ...errors import BackendUnavailable

# How long closing the client and a local cluster may take before giving up.
CLOSE_TIMEOUT_SECONDS = 10.0
# The most a dask server's first message (its handshake: a few hundred bytes
# of versions and options) may announce; anything larger is not dask talking.
HANDSHAKE_BYTES = 1 << 20


def local_cluster(workers: int, **options: Any) -> Any:
    """The ``LocalCluster`` a dask pool starts without an address (``options`` added).

    Processes, one thread each: the process backend's model, on Dask; on
    127.0.0.1, no dashboard (the scheduler's HTTP server, for health and
    metrics, is there anyway: on any free port, never clashing on 8787).
    """
    return distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        **options,
    )


def configured_address() -> str | None:
    """Dask's own ``scheduler-address`` setting (``DASK_SCHEDULER_ADDRESS``), if any."""
    return dask.config.get("scheduler-address", None) or None


def _check_reachable(address: str, wait: Any) -> None:
    """Raise OSError unless a dask server answers at a ``tcp://host:port`` address.

    Checked with a plain socket before a Client is made: a Client that cannot
    connect leaves distributed's IO-loop thread running behind its error, and
    one that reaches something else (a proxy, a web server) reads its reply
    as a message length (an HTTP reply asks for exabytes: a MemoryError) and
    then spends seconds closing. A dask server speaks first, its handshake:
    one message, led by its length in 8 bytes. (The scheduler logs, at
    INFO, a connection closed before the handshake completed.)
    """
    if not address.startswith("tcp://"):
        return
    host, _, port = address[len("tcp://") :].rpartition(":")
    seconds = dask.utils.parse_timedelta(wait, default="s")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds) as probe:
        header = b""
        while len(header) < 8:
            chunk = probe.recv(8 - len(header))
            if not chunk:
                raise OSError("the connection was closed without a dask handshake")
            header += chunk
    size = int.from_bytes(header, sys.byteorder)
    if not 0 < size <= HANDSHAKE_BYTES:
        raise OSError(f"what answered is not a dask server (it began with {header!r})")


def connect(address: str, *, check: bool = True) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address``; BackendUnavailable if none answers.

    ``check``: look first with a plain socket (not for a cluster just started here).
    """
    # How long to try to reach the scheduler: dask's own setting
    # (distributed.comm.timeouts.connect, 30 s unless configured, e.g. by
    # DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s).
    wait = dask.config.get("distributed.comm.timeouts.connect")
    try:
        if check:
            _check_reachable(address, wait)
        return distributed.Client(address, set_as_default=False, timeout=wait)
    except (OSError, TimeoutError) as exc:
        raise BackendUnavailable(
            f"no dask scheduler answered at {address!r} within {wait} "
            f"({type(exc).__name__}: {exc}); the wait is dask's setting "
            "distributed.comm.timeouts.connect (DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT)"
        ) from exc


class Connection:
    """A pool's client, and the local cluster it started when it had no address."""

    def __init__(self, address: str | None, workers: int) -> None:
        self.cluster: Any = None
        if address is None:
            address = configured_address()
        if address is None:
            self.cluster = local_cluster(workers)
            address = self.cluster.scheduler_address
        try:
            self.client: Any = connect(address, check=self.cluster is None)
        except BaseException:
            if self.cluster is not None:
                self.cluster.close()
            raise
        #: The scheduler's address: another pool may connect to the same cluster.
        self.address: str = str(address)

    @property
    def threads(self) -> int:
        """The cluster's worker threads, now (at least 1)."""
        return max(1, int(sum(self.client.nthreads().values())))

    def close(self) -> None:
        try:
            self.client.close(timeout=CLOSE_TIMEOUT_SECONDS)
        finally:
            if self.cluster is not None:
                self.cluster.close(timeout=CLOSE_TIMEOUT_SECONDS)
