"""A real browser for the web page's tests: Debian's headless Chromium (/usr/bin/chromium) driven by Playwright.

Playwright for Python carries its driver (a node build) inside the wheel, so `pip install playwright` brings
everything but a browser, and the system's Chromium is launched by its path (`playwright install`, which would
download a browser build, is never run). Chromium starts once per test session (`launch`); each test gets a fresh
context (no cookies, a fresh profile) and a `Pages` that saves a full-page screenshot of each page it visits into
`build/screenshots/<test>/` (or `$INGESTD_SCREENSHOTS/<test>/`; gitignored) and keeps each page's HTML for the
PHI checks. `accessibility_problems` checks a page with the browser's own tooling: the accessibility tree (CDP
`Accessibility.getFullAXTree`) and computed styles.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "Pages",
    "accessibility_problems",
    "chromium_missing",
    "launch",
    "screenshot_root",
]

CHROMIUM = Path("/usr/bin/chromium")
# Headless as root on a closed network: no sandbox (root), no GPU, and none of Chromium's own connections (QUIC,
# component updates, sync, background fetches), which the network here refuses and which would only slow it down.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_REPO = Path(__file__).resolve().parent.parent
# Roles whose element a person operates: each needs an accessible name.
_NAMED_ROLES = {"button", "link", "textbox", "combobox", "listbox", "checkbox", "radio", "searchbox", "spinbutton"}


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


def screenshot_root() -> Path:
    """Where screenshots go: $INGESTD_SCREENSHOTS, or build/screenshots of the checkout."""
    return Path(os.environ.get("INGESTD_SCREENSHOTS") or _REPO / "build" / "screenshots")


@contextmanager
def launch() -> Iterator[Browser]:
    """Headless Chromium with a fresh user-data directory, closed (and the directory removed) at the end."""
    profile = Path(tempfile.mkdtemp(prefix="ingestd-chromium-"))
    playwright: Playwright = sync_playwright().start()
    try:
        # Playwright gives each launch a fresh user-data directory of its own (and removes it); HOME points at a
        # fresh directory too, so that nothing Chromium keeps beside its profile lands in the user's home.
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, env={**os.environ, "HOME": str(profile)}
        )
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()
        shutil.rmtree(profile, ignore_errors=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "page"


@dataclass
class Pages:
    """One test's browser context and page; `visit` and `shot` save a screenshot and the HTML of what is shown."""

    context: BrowserContext
    page: Page
    folder: Path
    html: dict[str, str] = field(default_factory=dict)  # screenshot name -> the page's HTML then

    @classmethod
    def open(cls, browser: Browser, test_name: str) -> Pages:
        folder = screenshot_root() / _slug(test_name)
        shutil.rmtree(folder, ignore_errors=True)  # only this run's pictures
        folder.mkdir(parents=True)
        context = browser.new_context(viewport={"width": 1200, "height": 800}, locale="en-GB")
        context.set_default_timeout(15_000)
        return cls(context, context.new_page(), folder)

    def visit(self, url: str, name: str) -> Page:
        """Open `url` and record the page as `name`."""
        self.page.goto(url)
        self.shot(name)
        return self.page

    def shot(self, name: str, page: Page | None = None) -> Path:
        """A full-page screenshot of what `page` (by default the test's page) shows now, and its HTML."""
        page = page or self.page
        path = self.folder / f"{len(list(self.folder.glob('*.png'))) + 1:02d}-{_slug(name)}.png"
        page.screenshot(path=str(path), full_page=True)
        self.html[path.stem] = page.content()
        return path

    def keep(self, name: str) -> None:
        """Keep the HTML of what the page shows now (for the PHI checks) without a screenshot."""
        self.html[f"{len(self.html) + 1:02d}-{_slug(name)}-html-only"] = self.page.content()

    def close(self) -> None:
        self.context.close()


_CONTRAST_JS = """
() => {
  const parse = (text) => {
    const m = text.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return [0, 0, 0, 0];
    const parts = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return [parts[0], parts[1], parts[2], parts.length > 3 ? parts[3] : 1];
  };
  const over = (top, below) => {
    const a = top[3];
    return [0, 1, 2].map((i) => top[i] * a + below[i] * (1 - a)).concat([1]);
  };
  const background = (element) => {
    const layers = [];
    for (let node = element; node && node.nodeType === 1; node = node.parentElement) {
      const colour = parse(getComputedStyle(node).backgroundColor);
      if (colour[3] > 0) layers.push(colour);
      if (colour[3] >= 1) break;
    }
    let result = [255, 255, 255, 1];
    for (const layer of layers.reverse()) result = over(layer, result);
    return result;
  };
  const luminance = (rgb) => {
    const [r, g, b] = rgb.slice(0, 3).map((v) => {
      const c = v / 255;
      return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const found = [];
  for (const element of document.body.querySelectorAll("*")) {
    const text = Array.from(element.childNodes)
      .filter((node) => node.nodeType === 3)
      .map((node) => node.textContent.trim())
      .join(" ")
      .trim();
    if (!text) continue;
    const style = getComputedStyle(element);
    if (style.visibility === "hidden" || style.display === "none" || element.getClientRects().length === 0) continue;
    const back = background(element);
    const fore = over(parse(style.color), back);
    const [light, dark] = [luminance(fore), luminance(back)].sort((x, y) => y - x);
    found.push({
      tag: element.tagName.toLowerCase(),
      cls: element.className || "",
      text: text.slice(0, 40),
      ratio: (light + 0.05) / (dark + 0.05),
      colour: style.color,
      background: "rgb(" + back.slice(0, 3).map(Math.round).join(", ") + ")",
    });
  }
  return found;
}
"""


def contrast(page: Page) -> list[dict[str, Any]]:
    """Each visible element with text of its own: its WCAG contrast ratio against the background it stands on."""
    found: list[dict[str, Any]] = page.evaluate(_CONTRAST_JS)
    return found


def _unnamed_controls(page: Page) -> list[str]:
    """Controls without an accessible name, in the browser's own accessibility tree."""
    cdp = page.context.new_cdp_session(page)
    try:
        nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    finally:
        cdp.detach()
    unnamed = []
    for node in nodes:
        role = str((node.get("role") or {}).get("value") or "")
        if node.get("ignored") or role.lower() not in _NAMED_ROLES:
            continue
        if not str((node.get("name") or {}).get("value") or "").strip():
            unnamed.append(f"a {role} without an accessible name (DOM node {node.get('backendDOMNodeId')})")
    return unnamed


def accessibility_problems(page: Page, minimum_contrast: float = 4.5) -> list[str]:
    """What fails the basics on the page shown: a `lang`, exactly one h1, a name for every control (button, link,
    form field) and text contrast of at least `minimum_contrast`:1 (WCAG 2 AA for normal text)."""
    problems = []
    if not page.evaluate("() => document.documentElement.lang"):
        problems.append("the page has no lang")
    headings = page.locator("h1").count()
    if headings != 1:
        problems.append(f"the page has {headings} h1 elements, not one")
    problems.extend(_unnamed_controls(page))
    for item in contrast(page):
        if item["ratio"] < minimum_contrast:
            problems.append(
                f"contrast {item['ratio']:.2f}:1 of <{item['tag']} class={item['cls']!r}> {item['text']!r}"
                f" ({item['colour']} on {item['background']})"
            )
    return problems
