"""Look at the built docs site as a reader does: screenshots in headless Chromium.

Docs tooling (issue 8). Serves `site/` (built by `make docs`) on localhost, opens pages
in headless Chromium at a laptop's width (1366 px), saves a full-page screenshot of
each, and checks in the live page what a static HTML check cannot:

- every Mermaid diagram was drawn (an `<svg>` in place of its source text);
- every image loaded (a non-zero natural width);
- no table is wider than the column it sits in (no horizontal scroll).

    python tools/screenshot_docs.py                       # home, M3 page, M2 notebook
    python tools/screenshot_docs.py --out /tmp/shots m1_basic/ notebooks/m3_paged_kv/

Needs Chromium (Debian: `apt-get install chromium`) and the `playwright` Python package
(`pip install playwright`; it drives the installed Chromium, no browser download). The
browser runs with the network off: a page that needs the internet shows it here.
Prints one line per page and writes `report.json` next to the screenshots; exits 1 if
a check fails.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAGES = ["", "m3_paged_kv/", "notebooks/m2_batching/"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

# Runs in the page: what a reader would see go wrong.
_CHECKS_JS = """() => {
  const diagrams = [...document.querySelectorAll('.mermaid')];
  const images = [...document.querySelectorAll('article img')];
  const tables = [...document.querySelectorAll('article table')];
  // the theme wraps a table in a box that scrolls sideways when the table is too wide
  const wide = tables.filter(t => {
    const box = t.closest('.md-typeset__scrollwrap') || t.parentElement;
    return box.scrollWidth > box.clientWidth + 1 || t.getBoundingClientRect().right >
           document.querySelector('article').getBoundingClientRect().right + 1;
  });
  return {
    diagrams: diagrams.length,
    // drawn: the theme replaces the source text by a picture (in a closed shadow root)
    diagrams_drawn: diagrams.filter(d => !/flowchart|graph|-->/.test(d.textContent) &&
                                    d.getBoundingClientRect().height > 40).length,
    images: images.length,
    images_broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    tables: tables.length,
    tables_too_wide: wide.map(t => t.innerText.split('\\n')[0].slice(0, 80)),
    page_width: document.documentElement.scrollWidth,
  };
}"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no line per request
        pass


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def check_pages(site: Path, pages: list[str], out: Path, width: int,
                chromium: str) -> list[dict]:
    from playwright.sync_api import sync_playwright

    server, base = serve(site)
    results = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": width, "height": 900})
            # offline: only our own server answers
            context.route("**/*", lambda route: route.continue_()
                          if route.request.url.startswith(base) else route.abort())
            for page_path in pages:
                page = context.new_page()
                page.goto(base + page_path, wait_until="networkidle")
                page.wait_for_timeout(1500)  # diagrams draw after load
                found = page.evaluate(_CHECKS_JS)
                name = (page_path.strip("/").replace("/", "-") or "home") + ".png"
                page.screenshot(path=str(out / name), full_page=True)
                found.update(page=page_path or "/", screenshot=name,
                             ok=(found["diagrams_drawn"] == found["diagrams"]
                                 and not found["images_broken"]
                                 and not found["tables_too_wide"]
                                 and found["page_width"] <= width))
                results.append(found)
                page.close()
            browser.close()
    finally:
        server.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/screenshot_docs.py",
                                description="Screenshot built docs pages in headless "
                                            "Chromium and check diagrams, images and tables.")
    p.add_argument("pages", nargs="*", default=DEFAULT_PAGES,
                   help="page paths under the site (default: home, m3_paged_kv/, "
                        "notebooks/m2_batching/)")
    p.add_argument("--site", type=Path, default=REPO_ROOT / "site",
                   help="the built site (default: site/, from `make docs`)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "site-shots",
                   help="where the screenshots and report.json go (default: site-shots/)")
    p.add_argument("--width", type=int, default=1366, help="window width in px (1366)")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary")
    args = p.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"error: no built site in {args.site}: run `make docs` first", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"error: no Chromium at {args.chromium} (apt-get install chromium)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = check_pages(args.site, args.pages, args.out, args.width, args.chromium)
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['page']:<28} diagrams {r['diagrams_drawn']}/"
              f"{r['diagrams']} drawn, {r['images'] - len(r['images_broken'])}/{r['images']} "
              f"images, {len(r['tables_too_wide'])}/{r['tables']} tables too wide, page "
              f"{r['page_width']} px -> {args.out / r['screenshot']}")
        for what in ("images_broken", "tables_too_wide"):
            for item in r[what]:
                print(f"     {what}: {item}")
    (args.out / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
