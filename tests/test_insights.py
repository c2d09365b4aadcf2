"""Issue 7, section 2: per-task records, the summary, and the HTML timeline."""

from __future__ import annotations

import os
import shutil
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import fenfa


def square(x: int) -> int:
    return x * x


def fail_on_3(x: int) -> int:
    if x == 3:
        raise KeyError(x)
    return x


def slow_fail_on_3(x: int) -> int:
    time.sleep(0.005)  # a task long enough to draw: the workload, not a synchronisation
    return fail_on_3(x)


class _Flaky:
    """Fails the first attempt of task 2 only (thread backend: shared state)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, x: int) -> int:
        with self.lock:
            first = x not in self.seen
            self.seen.add(x)
        if x == 2 and first:
            raise RuntimeError("first attempt")
        return x


def test_every_task_gets_one_record_on_every_backend(backend: str) -> None:
    with fenfa.Pool(backend, 2, insights=True) as pool:
        assert pool.map(square, range(50)) == [x * x for x in range(50)]
        records = pool.insights.records()
    assert sorted(r.index for r in records) == list(range(50))
    for record in records:
        assert record.backend == backend
        assert record.started <= record.ended
        assert record.submitted is not None
        assert record.submitted <= record.started + 1e-6
        assert record.attempt == 1
        assert record.error is None
        assert record.call == 1
        if backend == "process":
            assert record.pid != os.getpid()
            assert record.process_name.startswith("fenfa-process-")
        elif backend == "dask":
            assert record.pid != os.getpid()
        else:
            assert record.pid == os.getpid()
    if backend == "dask":  # a dask worker is known by its address
        assert all(str(r.worker).startswith("tcp://127.0.0.1:") for r in records)
        assert len({r.worker for r in records}) <= 2
    else:
        assert {r.worker for r in records} <= {0, 1}
    assert sum(r.batched for r in records if r.input != "(batched)") == 50


def test_records_say_which_task_failed_and_which_attempt(backend: str) -> None:
    with fenfa.Pool(backend, 2, insights=True) as pool:
        pool.map(fail_on_3, range(6), on_error="return")
    (failed,) = [r for r in pool.insights.records() if r.error]
    assert failed.index == 3
    assert failed.error == "KeyError"
    assert failed.input == "3"


def test_a_retried_task_has_a_record_per_attempt() -> None:
    with fenfa.Pool("thread", 2, insights=True) as pool:
        assert pool.map(_Flaky(), range(5), retries=1, chunksize=1) == list(range(5))
    attempts = sorted((r.attempt, r.error) for r in pool.insights.records() if r.index == 2)
    assert attempts == [(1, "RuntimeError"), (2, None)]


def test_insights_are_off_by_default_and_per_call_on_default_pools() -> None:
    with fenfa.Pool("thread", 2) as pool:
        pool.map(square, range(10))
        assert pool.insights.records() == []
        pool.map(square, range(10), insights=True)
        assert len(pool.insights.records()) == 10
    fenfa.map(square, range(7), backend="thread", insights=True)
    first = fenfa.last_insights()
    assert first is not None
    assert len(first.records()) == 7
    fenfa.map(square, range(3), backend="thread", insights=True)
    second = fenfa.last_insights()
    assert second is not first
    assert len(second.records()) == 3  # each call records on its own
    mine = fenfa.Insights()
    fenfa.map(square, range(4), backend="serial", insights=mine)
    fenfa.map(square, range(4), backend="serial", insights=mine)
    assert {r.call for r in mine.records()} == {1, 2}


def test_the_summary_counts_per_worker_and_knows_auto_s_decision() -> None:
    fenfa.map(fail_on_3, range(20), insights=True, on_error="return")
    insights = fenfa.last_insights()
    assert insights is not None
    summary = insights.summary()
    assert summary.tasks == 20
    assert summary.failed == 1
    assert sum(line.tasks for line in summary.workers) == 20
    assert summary.decision is not None
    text = str(summary)
    assert "20 tasks, 1 failed" in text
    assert f"auto chose {summary.decision.backend}" in text
    assert "busy" in text
    assert summary.slowest


def test_insights_refuse_what_they_cannot_use() -> None:
    with pytest.raises(ValueError, match=r"insights must be True, False or a fenfa\.Insights"):
        fenfa.map(square, range(3), insights="yes")


# -- the HTML timeline ---------------------------------------------------------


class _Timeline(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.lanes: list[str] = []
        self.bars: list[dict[str, str | None]] = []
        self.titles = 0
        self.scripts = 0
        self.links = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "g" and attributes.get("class") == "lane":
            self.lanes.append(attributes.get("data-worker") or "")
        if tag == "rect" and attributes.get("class") in ("task", "agg"):
            self.bars.append(attributes)
        if tag == "title":
            self.titles += 1
        if tag == "script":
            self.scripts += 1
        if tag in ("link", "img") or any(v and "http" in v for k, v in attrs if k != "xmlns"):
            self.links += 1


def parse(path: Path) -> _Timeline:
    parser = _Timeline()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_ten_tasks_draw_one_lane_per_worker_and_one_bar_per_task(tmp_path: Path) -> None:
    with fenfa.Pool("process", 2, insights=True) as pool:
        pool.map(slow_fail_on_3, range(10), on_error="return", chunksize=1)
        out = pool.insights.to_html(tmp_path / "timeline.html")
    page = parse(Path(out))
    workers = {(r.pid, r.thread_name) for r in pool.insights.records()}
    assert len(page.lanes) == len(workers)
    assert page.scripts == 0
    assert page.links == 0  # self-contained: no network
    assert [bar["class"] for bar in page.bars] == ["task"] * 10
    assert sum(int(bar["data-tasks"] or 0) for bar in page.bars) == 10
    text = Path(out).read_text()
    assert "failed: KeyError" in text  # the failed task's hover title
    assert "input 7" in text


def test_a_hundred_thousand_tasks_aggregate_into_a_drawable_file(tmp_path: Path) -> None:
    with fenfa.Pool("thread", 2, insights=True) as pool:
        pool.map(square, range(100_000))
        out = pool.insights.to_html(tmp_path / "big.html")
    page = parse(Path(out))
    assert sum(int(bar["data-tasks"] or 0) for bar in page.bars) == 100_000
    assert len(page.bars) <= 2 * 1000  # at most one shape per pixel per lane
    assert os.path.getsize(out) < 2_000_000


def test_the_page_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    insights = fenfa.Insights()
    fenfa.map(square, range(5), backend="serial", insights=insights)
    with pytest.raises(OSError):
        insights.to_html(tmp_path / "missing-directory" / "t.html")
    assert not list(tmp_path.rglob("*.tmp-*"))


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine")
@pytest.mark.timeout(120)
def test_a_real_browser_renders_the_lanes_and_titles(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    with fenfa.Pool("thread", 2, insights=True) as pool:
        pool.map(square, range(20), chunksize=1)
        out = pool.insights.to_html(tmp_path / "t.html")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=BROWSER,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page: Any = browser.new_page()
            page.goto(Path(out).as_uri())
            lanes = page.locator("g.lane").count()
            box = page.locator("svg").first.bounding_box()
            first_title = page.locator("rect.task title").first.text_content()
        finally:
            browser.close()
    assert lanes == len({r.thread_name for r in pool.insights.records()})
    assert box is not None
    assert box["width"] > 1000
    assert first_title.startswith("task ")
