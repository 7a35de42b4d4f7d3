"""Look at the built docs site as a reader does: screenshots in headless Chromium.

Docs tooling (issue 8). Serves `site/` (built by `make docs`) on localhost, opens pages
in headless Chromium at a laptop's width (1366 px), saves a full-page screenshot of
each, and checks in the live page what a static HTML check cannot:

- every Mermaid diagram was drawn (an `<svg>` in place of its source text);
- every image loaded (a non-zero natural width);
- no table is wider than the column it sits in (no horizontal scroll);
- how long the page is (height in px, words a reader sees with the folds closed) and
  what its first two screens hold (headings, pictures, tables, code blocks).

With `--search WORDS` (repeatable) it also types each query into the site's search box
and records how many results the theme's search worker found, and any error it logged.

    python tools/screenshot_docs.py                       # home, M3 page, M2 notebook
    python tools/screenshot_docs.py --out /tmp/shots m1_basic/ notebooks/m3_paged_kv/
    python tools/screenshot_docs.py --search "prefix cache" --search block m6_prefix_cache/

Needs Chromium (Debian: `apt-get install chromium`) and the `playwright` Python package
(`pip install playwright`; it drives the installed Chromium, no browser download). The
browser runs with the network off: a page that needs the internet shows it here.
Prints one line per page and writes `report.json` next to the screenshots; exits 1 if
a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import re
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
  const article = document.querySelector('article');
  // what the first two screens (2 x the window's height from the top) show
  const firstScreens = () => {
    const limit = 2 * window.innerHeight;
    const seen = sel => [...article.querySelectorAll(sel)].filter(e => {
      const r = e.getBoundingClientRect();
      return r.height > 0 && r.top + window.scrollY < limit;
    });
    return {
      headings: seen('h1, h2').map(h => h.textContent.replace('¶', '').trim()),
      pictures: seen('img, .mermaid, svg[role=img]').length,
      tables: seen('table').length,
      code_blocks: seen('pre').map(p => p.innerText.trim().split('\\n')[0].slice(0, 60)),
    };
  };
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
    page_height: document.documentElement.scrollHeight,
    // the words a reader sees: closed folds hide theirs
    words: article.innerText.split(/\\s+/).filter(Boolean).length,
    words_with_folds: article.textContent.split(/\\s+/).filter(Boolean).length,
    first_screens: firstScreens(),
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


@contextlib.contextmanager
def offline_browser(site: Path, width: int, chromium: str):
    """A headless Chromium context on `site` served at localhost, offline (only our own
    server answers), and the site's base URL."""
    from playwright.sync_api import sync_playwright

    server, base = serve(site)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": width, "height": 900})
            context.route("**/*", lambda route: route.continue_()
                          if route.request.url.startswith(base) else route.abort())
            yield context, base
            browser.close()
    finally:
        server.shutdown()


def check_pages(site: Path, pages: list[str], out: Path, width: int,
                chromium: str, open_folds: bool = False) -> list[dict]:
    results = []
    with offline_browser(site, width, chromium) as (context, base):
        for page_path in pages:
            page = context.new_page()
            page.goto(base + page_path, wait_until="networkidle")
            page.wait_for_timeout(1500)  # diagrams draw after load
            found = page.evaluate(_CHECKS_JS)  # as a reader first sees the page
            name = (page_path.strip("/").replace("/", "-") or "home") + ".png"
            if open_folds:  # then every fold opened, to see what is inside them
                page.evaluate("document.querySelectorAll('article details')"
                              ".forEach(d => d.open = true)")
                page.wait_for_timeout(1500)
                opened = page.evaluate(_CHECKS_JS)
                found.update(page_height_open=opened["page_height"],
                             diagrams=opened["diagrams"],
                             diagrams_drawn=opened["diagrams_drawn"],
                             images_broken=opened["images_broken"],
                             tables_too_wide=opened["tables_too_wide"])
                name = name[:-4] + "-open.png"
            page.screenshot(path=str(out / name), full_page=True)
            found.update(page=page_path or "/", screenshot=name,
                         ok=(found["diagrams_drawn"] == found["diagrams"]
                             and not found["images_broken"]
                             and not found["tables_too_wide"]
                             and found["page_width"] <= width))
            results.append(found)
            page.close()
    return results


def search_site(site: Path, queries: list[str], width: int, chromium: str) -> list[dict]:
    """Type each query into the search box of the home page, as a reader does: the
    number of results the theme shows ("16 matching documents"), the first few result
    titles, and the errors and warnings the page or its search worker logged (a query
    the worker cannot run is a warning, and the page says "No matching documents")."""
    results = []
    with offline_browser(site, width, chromium) as (context, base):
        for query in queries:
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text)
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base, wait_until="networkidle")
            box = page.locator("input.md-search__input")
            if not box.is_visible():  # a narrow window: the search is behind a button
                page.click("label.md-header__button[for='__search']")
            box.click()
            box.fill(query)
            box.press("End")  # the theme searches on a key going up
            meta = page.locator(".md-search-result__meta")
            page.wait_for_function(
                "q => { const m = document.querySelector('.md-search-result__meta');"
                " return m && /matching|No matching/i.test(m.textContent) &&"
                " document.querySelector('input.md-search__input').value === q; }",
                arg=query, timeout=20000)
            page.wait_for_timeout(500)
            text = meta.inner_text().strip()
            number = re.match(r"(\d+)", text)
            titles = page.locator(".md-search-result__item > a h1, "
                                  ".md-search-result__item > a h2").all_inner_texts()
            results.append({"query": query, "shown": text,
                            "results": int(number.group(1)) if number else 0,
                            "first": titles[:3], "errors": errors})
            page.close()
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
    p.add_argument("--open-folds", action="store_true",
                   help="open every fold (<details>) before the screenshot and the checks "
                        "of diagrams, images and tables; the height and words are still "
                        "measured with the folds closed")
    p.add_argument("--search", action="append", default=[], metavar="WORDS",
                   help="also search the site for WORDS in its search box (repeatable)")
    args = p.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"error: no built site in {args.site}: run `make docs` first", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"error: no Chromium at {args.chromium} (apt-get install chromium)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = check_pages(args.site, args.pages, args.out, args.width, args.chromium,
                          args.open_folds)
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['page']:<28} diagrams {r['diagrams_drawn']}/"
              f"{r['diagrams']} drawn, {r['images'] - len(r['images_broken'])}/{r['images']} "
              f"images, {len(r['tables_too_wide'])}/{r['tables']} tables too wide, page "
              f"{r['page_width']} px wide, {r['page_height']} px tall, {r['words']} words "
              f"shown ({r['words_with_folds']} with the folds)"
              + (f", {r['page_height_open']} px with the folds open" if "page_height_open" in r
                 else "") + f" -> {args.out / r['screenshot']}")
        first = r["first_screens"]
        print(f"     first two screens: {first['pictures']} pictures, {first['tables']} "
              f"tables, headings {first['headings']}, code {first['code_blocks']}")
        for what in ("images_broken", "tables_too_wide"):
            for item in r[what]:
                print(f"     {what}: {item}")
    searches = search_site(args.site, args.search, args.width, args.chromium) \
        if args.search else []
    for s in searches:
        print(f"{'ok  ' if s['results'] and not s['errors'] else 'FAIL'} search "
              f"{s['query']!r}: {s['shown']!r}; first {s['first']}")
        for error in s["errors"]:
            print(f"     error: {error[:200]}")
    (args.out / "report.json").write_text(json.dumps({"pages": results, "searches": searches},
                                                     indent=1) + "\n")
    return 0 if all(r["ok"] for r in results) and \
        all(s["results"] and not s["errors"] for s in searches) else 1


if __name__ == "__main__":
    sys.exit(main())
