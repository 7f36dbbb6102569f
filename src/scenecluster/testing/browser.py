"""Headless Chromium over the DevTools protocol: open a local page, collect its errors, measure, screenshot.

Tests use it to look at the report the way a person would: a real browser parses the page and runs its scripts,
so a console error, an uncaught exception, a failed resource or a script injected through a scene name (an
``alert`` dialog) is caught. Debian's ``chromium`` package provides the browser; :func:`find_chromium` returns
``None`` where it is missing so callers can skip with that reason. The protocol is spoken over aiohttp's
WebSocket client (aiohttp comes with Ray's dashboard), so no browser-driver package is needed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PageVisit", "find_chromium", "visit"]


def find_chromium() -> str | None:
    """The Chromium executable, or ``None`` when none is installed (``apt-get install chromium``)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageVisit:
    """What one visit saw."""

    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads, dialogs
    values: dict[str, Any] = field(default_factory=dict)  # results of the expressions asked for
    load_seconds: float = float("nan")  # navigation start to the load event
    ready_seconds: float = float("nan")  # navigation start to the ready expression being true
    screenshot: bytes = b""


class _Session:
    """One DevTools WebSocket: numbered commands, and the events that arrive in between."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id, self.events = ws, 0, []

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=60)).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)
            await self._dismiss(msg)

    async def _dismiss(self, msg: dict) -> None:
        """A dialog blocks the page's scripts (and any evaluation) until answered: answer it, keep the event."""
        if msg.get("method") == "Page.javascriptDialogOpening":
            self.next_id += 1
            await self.ws.send_str(
                json.dumps(
                    {
                        "id": self.next_id + 1_000_000,
                        "method": "Page.handleJavaScriptDialog",
                        "params": {"accept": True},
                    }
                )
            )

    async def wait_event(self, method: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            try:
                msg = await self.ws.receive(timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                return None
            self.events.append(json.loads(msg.data))
            await self._dismiss(self.events[-1])
        return None

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")


def _errors(events: list[dict]) -> list[str]:
    found = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            found.append("exception: " + str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            found.append("log: " + p["entry"].get("text", ""))
        elif method == "Page.javascriptDialogOpening":
            found.append(f"dialog: {p.get('type')} {p.get('message')!r}")
    return found


async def _pointer(s: _Session, kind: str, x: float, y: float) -> None:
    """Move the mouse to (x, y) CSS pixels of the viewport; ``click`` also presses and releases it there."""
    await s.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    if kind == "click":
        for event in ("mousePressed", "mouseReleased"):
            await s.send("Input.dispatchMouseEvent", type=event, x=x, y=y, button="left", clickCount=1)
    await asyncio.sleep(0.4)  # let the page redraw (a tooltip, a recoloured plot)


async def _visit(
    port: int, url: str, width: int, height: int, ready: str, expressions: dict, full_page: bool, pointer: list
):
    import aiohttp

    async with aiohttp.ClientSession() as http:
        targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(t for t in targets if t.get("type") == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            s = _Session(ws)
            for domain in ("Page", "Runtime", "Log"):
                await s.send(f"{domain}.enable")
            mobile = width < 700
            await s.send(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile
            )
            visit = PageVisit()
            start = time.monotonic()
            await s.send("Page.navigate", url=url)
            if await s.wait_event("Page.loadEventFired", 60) is not None:
                visit.load_seconds = time.monotonic() - start
            while time.monotonic() - start < 60:
                if await s.evaluate(ready):
                    visit.ready_seconds = time.monotonic() - start
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # let late errors arrive
            visit.values = {k: await s.evaluate(v) for k, v in expressions.items()}
            await asyncio.sleep(0.5)  # lazy images scrolled into view by an expression decode before the screenshot
            for kind, (x, y) in pointer:
                await _pointer(s, kind, x, y)
            shot: dict[str, Any] = {"format": "png"}
            if full_page:
                size = (await s.send("Page.getLayoutMetrics"))["cssContentSize"]
                shot.update(
                    captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": width, "height": min(size["height"], 16000), "scale": 1},
                )
            visit.screenshot = base64.b64decode((await s.send("Page.captureScreenshot", **shot))["data"])
            visit.errors = _errors(s.events)
            return visit


def visit(
    page: str | Path,
    *,
    width: int = 1280,
    height: int = 900,
    ready: str = "document.readyState === 'complete'",
    expressions: dict[str, str] | None = None,
    full_page: bool = False,
    pointer: list[tuple[str, tuple[float, float]]] | None = None,
    chromium: str | None = None,
) -> PageVisit:
    """Open the local file ``page`` in a fresh headless Chromium at ``width`` x ``height`` CSS pixels.

    ``ready`` is a JavaScript expression polled until true (the page's scripts have drawn); ``expressions`` are
    evaluated after that and returned by name; then ``pointer`` actions (``("move"|"click", (x, y))``) run before
    the screenshot.
    """
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium executable: apt-get install chromium")
    # Chromium's helper processes (zygote, crashpad) can still be writing the profile when the browser exits:
    # the whole process group is stopped below, and a profile file that appears late never fails the visit.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--disable-extensions",
            "about:blank",
        ]
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            port = _devtools_port(proc)
            url = Path(page).resolve().as_uri()
            return asyncio.run(_visit(port, url, width, height, ready, expressions or {}, full_page, pointer or []))
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the browser and every helper it started (they share its new session's process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.2)  # helpers leave shortly after the browser itself


def _devtools_port(proc: subprocess.Popen) -> int:
    """Chromium prints ``DevTools listening on ws://127.0.0.1:PORT/...`` on stderr once it is up."""
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if match:
            # keep reading stderr so a chatty browser never blocks on a full pipe
            threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
            return int(match.group(1))
    raise RuntimeError("chromium did not start: " + "".join(lines[-10:]) + os.linesep)
