"""Screenshots of the Prefect UI as a data engineer uses it, taken with headless Chromium (selenium).

Against a running `hvp ui`: open Deployments, click a deployment (`hypervision` by default) -> Run -> Custom run
(the typed form, saved whole), then Run -> Quick run (as the README says), wait for the run to finish, then save
screenshots of the run's page (its logs show the resolved paths), its subflows, artifacts and parameters tabs, and
every artifact page of the deployment's stages (images must show inline, tables fit, descriptions render). Look at
the PNGs it writes.

Needs Debian's `chromium` and `chromium-driver` and selenium (not a project dependency; any venv):

    python bench/ui_screens.py --url http://127.0.0.1:4200 --out /tmp/screens [--deployment heads] [--no-run] [--json]

It ends with one JSON line `{"figures": [...]}`: whether the run the click started completed, how many of the
deployment's artifacts had no page, and the run's wall time in seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

#: The artifacts each deployment's run publishes, in the order a person reads them.
ARTIFACT_KEYS: dict[str, list[str]] = {
    "hypervision": ["hypervision-parameters", "hypervision-stages", "ingest-summary", "label-spatial",
                    "label-spectral", "label-material", "fuse-report", "fuse-overlays", "pretrain-loss",
                    "pretrain-metrics", "features-summary", "heads-report", "heads-report-markdown"],
    "features": ["features-summary"],
    "heads": ["heads-report", "heads-report-markdown"],
}
#: Tallest screenshot taken, in pixels (long artifact pages are cut there).
MAX_HEIGHT = 9000


def api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """POST (with ``body``) or GET one Prefect API path; the decoded JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/api{path}", data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 (loopback)
        return json.loads(r.read() or b"null")


def browser(width: int, height: int) -> Any:
    """Headless Chromium with a fresh profile, no network beyond loopback services."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='hvp-chromium-')}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def shot(driver: Any, url: str | None, out: Path, name: str, wait: float = 4.0) -> Path:
    """Open ``url`` (None: stay on the current page), let the app render, save ``out/name.png`` as tall as the
    page's content (up to MAX_HEIGHT), then restore the window's size."""
    if url is not None:
        driver.get(url)
    time.sleep(wait)
    size = driver.get_window_size()
    # the app scrolls inside an inner element: the tallest scrollHeight is the content's height
    height = driver.execute_script("return Math.max(...Array.from(document.querySelectorAll('*'), "
                                   "e => e.scrollHeight))")
    if height > size["height"]:
        driver.set_window_size(size["width"], min(int(height) + 40, MAX_HEIGHT))
        time.sleep(1.5)
    path = out / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])
    print(f"{path}  <- {url or driver.current_url}")
    return path


def click_text(driver: Any, text: str, timeout: float = 20.0) -> None:
    """Click the first visible button, link or menu item whose text is ``text``."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    xpaths = [f"//button[normalize-space(.)='{text}']", f"//*[@role='menuitem'][normalize-space(.)='{text}']",
              f"//*[self::a or self::li or self::div or self::span][normalize-space(.)='{text}']"]
    while time.monotonic() < deadline:
        for xpath in xpaths:
            for el in driver.find_elements(By.XPATH, xpath):
                if el.is_displayed():
                    el.click()  # a real click: menus open on pointer events
                    return
        time.sleep(0.5)
    raise RuntimeError(f"no visible element with text {text!r} on {driver.current_url}")


def open_tab(driver: Any, run_url: str, tab: str) -> None:
    """Open a flow run's page and click one of its tabs (Logs, Subflow Runs, Artifacts, Parameters, ...)."""
    from selenium.webdriver.common.by import By

    driver.get(run_url)
    time.sleep(4)
    for el in driver.find_elements(By.XPATH, f"//*[@role='tab' or self::button][normalize-space(.)='{tab}']"):
        if el.is_displayed():
            el.click()
            return
    click_text(driver, tab, timeout=10.0)  # the tab strip's entries are plain elements in some UI versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:4200")
    ap.add_argument("--out", type=Path, default=Path("ui-screens"))
    ap.add_argument("--deployment", default="hypervision", help="deployment to open and run")
    ap.add_argument("--no-run", action="store_true", help="screenshot the deployment's latest run, start none")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run")
    ap.add_argument("--json", action="store_true", help="also print the run's final state as JSON")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    url = args.url.rstrip("/")
    name = args.deployment
    dep = next(d for d in api(url, "/deployments/filter", {}) if d["name"] == name)
    driver = browser(1600, 1000)
    missing: list[str] = []
    try:
        shot(driver, f"{url}/deployments", args.out, f"{name}-01-deployments")
        driver.get(f"{url}/deployments/deployment/{dep['id']}")
        time.sleep(4)
        click_text(driver, "Run")
        time.sleep(1)
        shot(driver, None, args.out, f"{name}-02-run-menu", wait=1)
        click_text(driver, "Custom run")
        shot(driver, None, args.out, f"{name}-03-custom-run-form", wait=6)
        before = {r["id"] for r in api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})}
        if not args.no_run:
            driver.get(f"{url}/deployments/deployment/{dep['id']}")
            time.sleep(4)
            click_text(driver, "Run")
            time.sleep(1)
            click_text(driver, "Quick run")
            time.sleep(3)
        runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}},
                                              "sort": "START_TIME_DESC"})
        new = [r for r in runs if r["id"] not in before] if not args.no_run else runs
        if not new:
            raise RuntimeError("the Quick run click started no flow run")
        run_id = new[0]["id"]
        print(f"{name} flow run {run_id}")
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            state = api(url, f"/flow_runs/{run_id}")["state"]
            if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(10)
        print(f"final state: {state['type']} {state['name']}: {state.get('message')}")
        run = api(url, f"/flow_runs/{run_id}")
        run_url = f"{url}/runs/flow-run/{run_id}"
        shot(driver, run_url, args.out, f"{name}-04-run", wait=6)
        for i, tab in enumerate(("Subflow Runs", "Artifacts", "Parameters")):
            open_tab(driver, run_url, tab)
            shot(driver, None, args.out, f"{name}-{5 + i:02d}-run-{tab.lower().replace(' ', '-')}", wait=4)
        for i, key in enumerate(ARTIFACT_KEYS.get(name, [])):
            latest = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC",
                                                    "limit": 1})
            if not latest:
                print(f"no artifact {key}")
                missing.append(key)
                continue
            shot(driver, f"{url}/artifacts/artifact/{latest[0]['id']}", args.out,
                 f"{name}-{10 + i:02d}-artifact-{key}", wait=5)
    finally:
        driver.quit()
    completed = state is not None and state["type"] == "COMPLETED"
    if args.json:
        print(json.dumps({"run": run_id, "state": state, "artifacts_missing": missing}))
    figures = [
        {"name": f"{name} run started from the UI completed", "value": int(completed), "target": 1,
         "met": completed},
        {"name": f"{name} artifacts without a page", "value": len(missing), "target": 0, "met": not missing},
        {"name": f"{name} run wall s", "value": round(float(run.get("total_run_time") or 0.0), 1),
         "target": None, "met": None},
    ]
    print(json.dumps({"figures": figures}))


if __name__ == "__main__":
    main()
