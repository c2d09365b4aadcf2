"""Issue 8, section 2: fenfa in a real Jupyter kernel.

The kernel is started by nbclient / jupyter_client with this interpreter
(ipykernel's own kernel spec), runs ``examples/notebook.ipynb`` as shipped
(outputs stripped), and the tests read the cells' outputs as a user would
see them. The interrupt test sends the kernel a real interrupt (SIGINT).
"""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"


def text_of(cell: Any, stream: str) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == stream)


@pytest.fixture(scope="module")
def executed() -> Any:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
        "the shipped notebook has its outputs stripped"
    )
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3")
    client.execute()
    return [c for c in notebook.cells if c.cell_type == "code"]


@pytest.mark.timeout(300)
def test_cell_functions_and_classes_run_under_every_start_method(executed: Any) -> None:
    out = text_of(executed[2], "stdout")
    for method in ("fork", "forkserver", "spawn"):
        assert f"{method} [285, 2470, 8555] [5, 25]" in out, out


@pytest.mark.timeout(300)
def test_worker_prints_and_logs_show_in_the_cell(executed: Any) -> None:
    out, err = text_of(executed[2], "stdout"), text_of(executed[2], "stderr")
    assert out.count("task 10 ran in pid") == 3  # once per start method
    assert err.count("INFO notebook [worker ") == 9
    assert "crunched 30" in err


@pytest.mark.timeout(300)
def test_a_redefined_function_is_picked_up(executed: Any) -> None:
    (result,) = [o for o in executed[3].outputs if o.output_type == "execute_result"]
    assert result["data"]["text/plain"] == "[-1, -2, -3]"


@pytest.mark.timeout(300)
def test_progress_draws_a_bar_without_widget_warnings(executed: Any) -> None:
    err = text_of(executed[4], "stderr")
    assert "10000/10000" in err
    assert "IProgress" not in err
    assert "Warning" not in err


@pytest.mark.timeout(300)
def test_insights_render_inline_as_the_timeline(executed: Any) -> None:
    (result,) = [o for o in executed[5].outputs if o.output_type == "execute_result"]
    page = result["data"]["text/html"]
    assert page.count('class="lane"') == 2
    assert "<svg" in page
    assert "20 tasks" in page


SLOW_CELL = """
import os, time, fenfa

def stuck(i):
    print(f"started {os.getpid()}", flush=True)
    time.sleep(60)
    return i

fenfa.map(stuck, range(4), backend="process", workers=2, chunksize=1)
"""


@pytest.mark.timeout(120)
def test_interrupting_the_kernel_stops_a_long_map_within_a_second() -> None:
    manager, client = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    try:
        msg_id = client.execute(SLOW_CELL)
        pids: set[int] = set()
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            try:
                message = client.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == (
                "stream"
            ):
                for line in message["content"]["text"].splitlines():
                    if line.startswith("started "):
                        pids.add(int(line.split()[1]))
        assert len(pids) == 2, "both workers started their stuck task"
        sent = time.monotonic()
        manager.interrupt_kernel()
        # The cell's own reply: the shell channel may first carry another
        # (a kernel_info_reply the client asked for while starting).
        while True:
            reply = client.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        took = time.monotonic() - sent
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert took < 1.0, f"KeyboardInterrupt after {took:.2f} s"
        # The workers that ran the stuck tasks were killed (their replacements idle).
        deadline = time.monotonic() + 5
        while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not alive, f"workers still running their tasks: {alive}"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
