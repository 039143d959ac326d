"""A real browser (headless Chromium, Debian package `chromium`) opens the live view during a run over a video file.

`python -m tests.test_serve_browser docs/images/serve.png` makes the screenshot shown in the docs the same way.
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import pytest

from tests import runtime_fixtures as rf
from tests.serve_helpers import Camera, ServedRun, get_json
from tests.test_runtime import poisoned_torch_env
from tests.test_sources import write_video

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless browser: install the Debian package chromium (apt-get install chromium)"
)
pytest.importorskip("prometheus_client", reason="the serve extra is not installed: pip install 'adtr-deploy[serve]'")


def chromium(url: str, profile: Path, *args: str, budget_ms: int = 5000) -> str:
    """Run headless Chromium on url (offline flags: no sync, no component updates, no QUIC); returns stdout."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Dom(html.parser.HTMLParser):
    """Text by element id, every <img>, and the <li> count of the gallery, from Chromium's --dump-dom."""

    def __init__(self):
        super().__init__()
        self.text: dict[str, str] = {}
        self.imgs: list[dict] = []
        self.gallery_items = 0
        self._open: list[str | None] = []
        self._in_gallery = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
            return
        if tag == "ol" and a.get("id") == "gallery":
            self._in_gallery = True
        if tag == "li" and self._in_gallery:
            self.gallery_items += 1
        self._open.append(a.get("id"))
        if a.get("id"):
            self.text[a["id"]] = ""

    def handle_endtag(self, tag):
        if tag == "ol":
            self._in_gallery = False
        if tag != "img" and self._open:
            self._open.pop()

    def handle_data(self, data):
        for ident in self._open:
            if ident:
                self.text[ident] += data


def screenshot(url: str, path: Path, profile: Path) -> None:
    chromium(url, profile, f"--screenshot={path}", "--window-size=1280,900")


@needs_chromium
def test_a_browser_shows_frames_scores_and_anomalies_and_never_runs_a_hostile_name(tmp_path):
    name = '<img src=x onerror="alert(1)">.avi'
    clip = tmp_path / name
    write_video(clip, 150, fps=25.0, size=(120, 160))
    with ServedRun(
        "--model", rf.onnx_model(), "--source", clip, "--out", tmp_path / "out", "--serve", "127.0.0.1:0",
        "--serve-linger", "120", env=poisoned_torch_env(tmp_path),
    ) as run:  # fmt: skip
        status = run.wait_for(lambda s: s["state"] == "finished", what="the end of the video")
        # A viewer makes the last frame be drawn; wait for it here, since Chromium's virtual time may run out before
        # a loaded machine has drawn it.
        run.wait_for(lambda s: get_json(run.url + "api/status?view=1")[1]["frame"]["seq"] >= 1, what="a drawn frame")
        dom_text = chromium(run.url, tmp_path / "profile", "--dump-dom")
        screenshot(run.url, tmp_path / "shot.png", tmp_path / "profile")
    dom = _Dom()
    dom.feed(dom_text)
    counts = status["counts"]
    assert counts["anomalies"] > 0 and dom.text["state"] == "finished" and dom.text["line-state"] == "FINISHED"
    assert int(dom.text["c-images"]) == counts["images"] == 150
    assert int(dom.text["c-anomalies"]) == counts["anomalies"]
    assert float(dom.text["score"]) == pytest.approx(status["last"]["normalized_score"], abs=1e-3)
    assert dom.text["decision"] == "–"  # the run is over: no current decision is shown (the score still is)
    frames = [img for img in dom.imgs if img.get("id") == "frame"]
    assert frames and frames[0]["src"].startswith("blob:") and int(frames[0]["data-seq"]) >= 1  # a frame is shown
    assert dom.gallery_items == len(status["gallery"]) >= 1
    assert dom.text["model"].count(status["model"]["sha256"][:12]) == 1
    # The hostile name is text in the page, not an element: no <img> other than the frame and the gallery's.
    assert dom.text["source"] == str(clip) and name in dom.text["where"]
    assert all("onerror" not in img for img in dom.imgs) and len(dom.imgs) == 1 + dom.gallery_items
    shot = cv2.imread(str(tmp_path / "shot.png"))
    assert shot.shape[:2] == (900, 1280) and shot.std() > 10  # a rendered page, not a blank one


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fds 3 and 4, messages
    ending in NUL), so a test can watch a page live, change the world, and watch again; no extra packages."""

    def __init__(self, profile: Path):
        to_r, to_w = os.pipe()  # our commands -> Chromium's fd 3
        from_r, from_w = os.pipe()  # Chromium's fd 4 -> our reader

        def fds_3_and_4():
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        cmd = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1280,900", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, pass_fds=(3, 4), preexec_fn=fds_3_and_4, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_r)
        os.close(from_w)
        self._w = os.fdopen(to_w, "wb", buffering=0)
        self._r = os.fdopen(from_r, "rb", buffering=0)
        self._answers: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._id = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def _read(self) -> None:
        buf = b""
        while chunk := self._r.read(65536):
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._answers[message["id"]] = message
                        self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        ident = self._id
        message = {"id": ident, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        self._w.write(json.dumps(message).encode() + b"\0")
        with self._cond:
            assert self._cond.wait_for(lambda: ident in self._answers, timeout), f"Chromium did not answer {method}"
            answer = self._answers.pop(ident)
        assert "error" not in answer, answer
        return answer["result"]

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, self.session)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, self.session)
        return result["result"].get("value")

    def page(self) -> dict:
        """What the page shows now: the line banner, the decision badge, the picture's classes, the pill."""
        return self.js(
            "(() => { const t = (id) => { const e = document.getElementById(id); return e ? e.textContent : null; };"
            " return { line: t('line-state'), detail: t('line-detail'), banner: document.getElementById('line')"
            ".className, decision: t('decision'), pill: t('state'), frame: document.getElementById('frame')"
            ".className }; })()"
        )

    def wait(self, predicate, timeout: float, what: str) -> tuple[dict, float]:
        """(what the page shows once predicate holds, seconds it took); bounded."""
        t0 = time.monotonic()
        shown = None
        while time.monotonic() - t0 < timeout:
            shown = self.page()
            if shown and predicate(shown):
                return shown, time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"the page did not show {what} within {timeout} s; it shows {shown}")

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.send("Page.captureScreenshot", {"format": "png"}, self.session)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@needs_chromium
def test_the_page_says_no_signal_when_the_camera_dies_and_server_lost_when_the_server_stops(tmp_path):
    """A live run over a camera, watched in a real browser: OK or ALARM with a current decision; the camera is killed:
    NO SIGNAL within the stall timeout, no leftover decision, the picture shown as old; it comes back: inspecting
    again; the server stops: SERVER LOST."""
    browser = Browser(tmp_path / "profile")
    try:
        with Camera() as camera, ServedRun(
            "--model", rf.onnx_model(), "--source", camera.url, "--out", tmp_path / "out", "--serve", "127.0.0.1:0",
            "--timeout", "2", env=poisoned_torch_env(tmp_path),
        ) as run:  # fmt: skip
            browser.open(run.url)
            shown, _ = browser.wait(lambda p: p["line"] in ("OK", "ALARM"), 60, "OK or ALARM")
            shown, _ = browser.wait(lambda p: p["decision"] in ("OK", "ANOMALY"), 30, "a decision")
            assert (
                shown["pill"] in ("ok", "alarm") and "last frame" in shown["detail"] and "stale" not in shown["frame"]
            )

            camera.kill()
            shown, took = browser.wait(lambda p: p["line"] == "NO SIGNAL", 30, "NO SIGNAL")
            assert took < 2 + 3.0, f"NO SIGNAL shown {took:.1f} s after the camera died (stall timeout 2 s)"
            assert "nosignal" in shown["banner"] and shown["pill"] == "no signal"
            assert shown["decision"] == "–" and "stale" in shown["frame"]  # no leftover OK/ANOMALY, old picture
            shown, _ = browser.wait(lambda p: "source down since" in p["detail"], 10, "since when the source is down")
            assert "reconnect attempts" in shown["detail"]
            browser.screenshot(tmp_path / "no-signal.png")

            camera.start()
            browser.wait(lambda p: p["line"] in ("OK", "ALARM") and p["decision"] in ("OK", "ANOMALY"), 60, "recovery")

            assert run.stop() == 0  # SIGTERM: the server is gone
            shown, took = browser.wait(lambda p: p["line"] == "SERVER LOST", 15, "SERVER LOST")
            assert "lost" in shown["banner"] and "no answer from adtr-run since" in shown["detail"]
            assert shown["decision"] == "–" and "stale" in shown["frame"]
            browser.screenshot(tmp_path / "server-lost.png")
    finally:
        browser.close()
    shot = cv2.imread(str(tmp_path / "server-lost.png"))
    assert shot is not None and shot.std() > 10


def _docs_screenshot(target: Path) -> None:
    """The docs picture: a run in progress over a longer video, with a webhook sink listed."""
    from tests.serve_helpers import WebhookReceiver

    work = Path(tempfile.mkdtemp(prefix="adtr-serve-shot-"))
    try:
        write_video(work / "line3_camera2.avi", 3000, fps=25.0, size=(360, 480))
        shutil.copytree(rf.onnx_model().parent, work / "export")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        with WebhookReceiver() as hook, ServedRun(
            "--model", "export/model.onnx", "--source", "line3_camera2.avi", "--out", "runs/line3",
            "--serve", "127.0.0.1:0", "--sink", f"webhook:{hook.url}", env=env, cwd=work,
        ) as run:  # fmt: skip
            run.wait_for(lambda s: s["counts"]["images"] >= 400 and len(s["gallery"]) >= 6, what="a full page")
            screenshot(run.url, target, work / "profile")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    _docs_screenshot(Path(sys.argv[1]))
