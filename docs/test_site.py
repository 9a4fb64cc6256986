"""Tests the built documentation site, in files and in a real browser.

`nox -s docs` runs it after `mkdocs build --strict`; directly:

    mkdocs build --strict && python -m pytest docs/test_site.py -q -rs

Checks:

1. Every internal link (`href`, `src`) of every page of the built site points to
   a file of the site, and every `#anchor` on an internal page link to an `id`
   of its target page (no browser needed).
2. In headless Chromium (Debian's `chromium`, driven by Playwright's Python
   client; Playwright downloads no browser here): the site is served on
   127.0.0.1 (a free port, loopback only), and the home page, a method page
   and the API page of `ka.LoRA` load with their title, a code block (and on
   the API page, LoRA's signature), no console error, no uncaught page error
   and no failed request. A full-page screenshot of each goes to
   `site/_screenshots/`.

The site folder is `site/` at the repository root, or `$KA_SITE_DIR`. The
browser is `$CHROMIUM` or the first of `chromium`, `chromium-browser`,
`google-chrome` on `PATH`; without one, the browser test skips and says how to
install it (`.ci/run` does: `apt-get install -y chromium`).
"""

import functools
import html.parser
import http.server
import os
import pathlib
import posixpath
import shutil
import threading
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SITE = pathlib.Path(os.environ.get("KA_SITE_DIR", ROOT / "site"))
SCREENSHOTS = SITE / "_screenshots"

# (name, path under the site, page title, h1, text the article must show)
PAGES = [
    ("home", "", "keras_adapters", "keras_adapters", "adds parameter-efficient"),
    ("method_hut", "methods/hut/", "HUT - keras_adapters", "HUT:", "W' = W (.)"),
    (
        "api_lora",
        "api/adapters/",
        "Adapter methods - keras_adapters",
        "Adapter",
        "LoRA",
    ),
]


def _site():
    if not (SITE / "index.html").is_file():
        pytest.skip(f"no built site in {SITE}: run `mkdocs build --strict` first")
    return SITE


class _Links(html.parser.HTMLParser):
    """Collects `href`/`src` values and element `id`s of one HTML page."""

    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key == "id" and value:
                self.ids.add(value)
            if key == "name" and tag == "a" and value:
                self.ids.add(value)
            if key in ("href", "src") and value:
                self.links.append(value)


@functools.cache
def _parse(path):
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _target(site, page, link):
    """`(file, fragment)` an internal link of `page` points to; None if external."""
    parsed = urllib.parse.urlsplit(link)
    if parsed.scheme or parsed.netloc:
        return None  # http:, https:, mailto:, data:, //host
    page_url = "/" + page.relative_to(site).as_posix()
    url_path = urllib.parse.unquote(parsed.path)
    if not url_path:
        resolved = page_url
    elif url_path.startswith("/"):
        resolved = url_path
    else:
        resolved = posixpath.join(posixpath.dirname(page_url), url_path)
    resolved = posixpath.normpath(resolved)
    file = site / resolved.lstrip("/")
    if url_path.endswith("/") or file.is_dir():
        file = file / "index.html"
    return file, parsed.fragment


def test_internal_links_resolve():
    site = _site()
    pages = sorted(p for p in site.rglob("*.html") if SCREENSHOTS not in p.parents)
    assert len(pages) > 10, f"only {len(pages)} pages in {site}"
    broken, checked = [], 0
    for page in pages:
        for link in _parse(page).links:
            target = _target(site, page, link)
            if target is None:
                continue
            file, fragment = target
            checked += 1
            where = f"{page.relative_to(site)}: {link}"
            if not file.is_file():
                broken.append(f"{where} (no file {file.relative_to(site)})")
            elif fragment and file.suffix == ".html":
                if urllib.parse.unquote(fragment) not in _parse(file).ids:
                    broken.append(f"{where} (no id {fragment!r})")
    assert checked > 100, f"only {checked} internal links found; is the parser broken?"
    assert not broken, "broken internal links in the built site:\n" + "\n".join(broken)


def _chromium():
    for candidate in (
        os.environ.get("CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(
        "Chromium not found (set $CHROMIUM or install it: "
        "`apt-get update && apt-get install -y chromium`); browser test skipped"
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def served_site():
    site = _site()
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright's Python client is not installed"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            # Root (as in CI) needs --no-sandbox; the site is our own.
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield browser
        browser.close()


@pytest.mark.parametrize("name, path, title, h1, text", PAGES)
def test_page_renders_in_chromium(served_site, browser, name, path, title, h1, text):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on(
        "console",
        lambda message: (
            problems.append(f"console {message.type}: {message.text}")
            if message.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "requestfailed",
        lambda request: problems.append(
            f"request failed: {request.url} ({request.failure})"
        ),
    )
    page.on(
        "response",
        lambda response: (
            problems.append(f"HTTP {response.status}: {response.url}")
            if response.status >= 400
            else None
        ),
    )
    response = page.goto(served_site + path, wait_until="networkidle")
    assert response is not None and response.ok, f"{path}: {response}"

    assert page.title() == title, page.title()
    heading = page.locator("article h1").first.inner_text()
    assert heading.startswith(h1), f"{path}: h1 is {heading!r}"
    code = page.locator("article pre code")
    assert code.count() > 0, f"{path}: no code block"
    assert code.first.is_visible()
    assert code.first.inner_text().strip()
    assert text in page.locator("article").inner_text(), f"{path}: no {text!r}"
    if name == "api_lora":
        # mkdocstrings: the class heading, then its signature block.
        signature = page.locator("[id='keras_adapters.LoRA'] + .doc-signature")
        assert signature.count() == 1, "no signature under the LoRA heading"
        assert signature.is_visible()
        shown = "".join(signature.inner_text().split())
        for part in ("LoRA(", "rank:int", "alpha:", "use_rslora:bool", "dropout:"):
            assert part in shown, f"LoRA's signature lacks {part!r}: {shown}"

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    page.close()
    assert not problems, f"{path}:\n" + "\n".join(problems)
