"""A real browser (headless Chromium, Debian package `chromium`) opens the live view during a run over a video file.

`python -m tests.test_serve_browser docs/images/serve.png` makes the screenshot shown in the docs the same way.
"""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import pytest

from tests import runtime_fixtures as rf
from tests.serve_helpers import ServedRun
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
        dom_text = chromium(run.url, tmp_path / "profile", "--dump-dom")
        screenshot(run.url, tmp_path / "shot.png", tmp_path / "profile")
    dom = _Dom()
    dom.feed(dom_text)
    counts = status["counts"]
    assert counts["anomalies"] > 0 and dom.text["state"] == "finished"
    assert int(dom.text["c-images"]) == counts["images"] == 150
    assert int(dom.text["c-anomalies"]) == counts["anomalies"]
    assert float(dom.text["score"]) == pytest.approx(status["last"]["normalized_score"], abs=1e-3)
    assert dom.text["decision"] in ("OK", "ANOMALY")
    frames = [img for img in dom.imgs if img.get("id") == "frame"]
    assert frames and frames[0]["src"].startswith("blob:") and int(frames[0]["data-seq"]) >= 1  # a frame is shown
    assert dom.gallery_items == len(status["gallery"]) >= 1
    assert dom.text["model"].count(status["model"]["sha256"][:12]) == 1
    # The hostile name is text in the page, not an element: no <img> other than the frame and the gallery's.
    assert dom.text["source"] == str(clip) and name in dom.text["where"]
    assert all("onerror" not in img for img in dom.imgs) and len(dom.imgs) == 1 + dom.gallery_items
    shot = cv2.imread(str(tmp_path / "shot.png"))
    assert shot.shape[:2] == (900, 1280) and shot.std() > 10  # a rendered page, not a blank one


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
