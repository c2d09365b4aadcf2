"""A scrape-like pipeline: pages fetched on threads, parsed on processes, bounded throughout.

The guide's advice: tasks that wait (IO) suit threads, tasks that compute
suit processes; and when work flows from producers to consumers, pass it
through Queues ("producer-consumer"), minding the join() that deadlocks
and the imap that reads a generator ahead without limit.

Here a local web server (127.0.0.1, no internet needed) serves generated
pages; stage 1 fetches them on threads, stage 2 parses them on processes,
and the caller adds up. There are no queues: each stage is a lazy
`fenfa.imap` over the one before, and pulls only when it has room, so the
URL generator is never more than the stages' windows ahead of the caller,
however many pages there are.

Run: python examples/scrape_pipeline.py [--pages 200] [--window 8] [--progress]
"""

from __future__ import annotations

import argparse
import re
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fenfa

PAGES = 200  # how many pages the site has (set from --pages)


class Site(BaseHTTPRequestHandler):
    """/page/N: a title, ten numbers, and links to pages N // 2 and N * N % PAGES."""

    def do_GET(self) -> None:
        n = int(self.path.rsplit("/", 1)[-1])
        numbers = "".join(f"<li>{n * k % 97}</li>" for k in range(10))
        links = "".join(f'<a href="/page/{m}">{m}</a>' for m in (n // 2, n * n % PAGES))
        body = f"<html><h1>page {n}</h1><ul>{numbers}</ul>{links}</html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # no line per request


def fetch(url: str) -> str:
    """Stage 1 (waits on the network): one opener per worker thread, kept in its state."""
    state = fenfa.current_worker().state
    if "opener" not in state:
        # No proxies: an http_proxy in the environment must not catch 127.0.0.1.
        state["opener"] = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with state["opener"].open(url, timeout=30) as response:
        return str(response.read().decode())


def parse(html: str) -> tuple[int, int, list[int]]:
    """Stage 2 (computes): the page number, the sum of its numbers, where it links."""
    page = int(re.findall(r"<h1>page (\d+)</h1>", html)[0])
    total = sum(int(x) for x in re.findall(r"<li>(\d+)</li>", html))
    return page, total, [int(x) for x in re.findall(r'href="/page/(\d+)"', html)]


def main() -> None:
    global PAGES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=PAGES)
    parser.add_argument("--window", type=int, default=8, help="each stage's read-ahead")
    parser.add_argument("--progress", action="store_true", help="a progress bar on stderr")
    args = parser.parse_args()
    PAGES = args.pages

    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    serving = threading.Thread(target=server.serve_forever, name="site")
    serving.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        pulled = 0

        def urls() -> Iterator[str]:
            nonlocal pulled
            for n in range(PAGES):
                pulled += 1
                yield f"{base}/page/{n}"

        pages = fenfa.imap(fetch, urls(), backend="thread", window=args.window)
        records = fenfa.imap(
            parse, pages, backend="process", window=args.window, progress=args.progress
        )
        seen: Counter[int] = Counter()
        inbound: Counter[int] = Counter()
        total = ahead = 0
        for done, (page, page_total, links) in enumerate(records, 1):
            seen[page] += 1
            total += page_total
            inbound.update(links)
            ahead = max(ahead, pulled - done)
    finally:
        server.shutdown()
        server.server_close()
        serving.join()

    print(f"site: {PAGES} pages at {base}")
    print(f"parsed {sum(seen.values())} pages, each exactly once: {set(seen.values()) == {1}}")
    print(f"sum of all numbers: {total}")
    page, count = inbound.most_common(1)[0]
    print(f"most linked page: /page/{page} ({count} links)")
    print(f"the URL generator was at most {ahead} pages ahead of the caller", end=" ")
    print(f"(two stages, window {args.window} each)")


if __name__ == "__main__":
    main()
