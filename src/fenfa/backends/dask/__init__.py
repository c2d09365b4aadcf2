"""The dask backend: batches run as tasks on a ``dask.distributed`` cluster.

fenfa does not schedule across machines itself: it hands each batch to a
Dask scheduler as *one* dask task, so the window, the adaptive chunk size,
retries, ``on_error`` and ordering stay where they are for every backend (in
:mod:`fenfa.window`), and Dask does what it is good at: placing work on
workers, moving data between them, noticing when one dies.

Data flow::

    caller thread (Run)                 dask client loop          dask worker (process, anywhere)
    ───────────────────                 ────────────────          ───────────────────────────────
    submit(batch)
      pickle items (bytes) ──► client.submit(run_remote, ...) ──► run_remote:
      function: pickled once per call;                              unpickle fn (cached by key)
        inline when small, scattered                                run_batch(...) under a worker
        once per call when large                                    mark (current_worker())
      share() handles: scattered once                               return pickled pieces
        per pool, referenced by id
                                  future done ──► Dask-Callback-Thread: _done(future)
                                                    fetch result, unpickle pieces,
                                                    job.deliver(batch, pieces) (a queue put)

The modules, lowest first (each imports only those above it):

- :mod:`.wire`: the bytes both sides agree on (items with handles by id, pieces back);
- :mod:`.remote`: the worker side, one batch in one dask task;
- :mod:`.cluster`: the client, the scheduler address, a local cluster;
- :mod:`.sending`: what a call sends, and what it scatters once;
- :mod:`.dispatch`: :class:`DaskBackend`, batches out and pieces back, cancel, shutdown.
"""

from __future__ import annotations

from .dispatch import DaskBackend

__all__ = ["DaskBackend"]
