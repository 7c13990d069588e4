"""The workbench in a real browser: JupyterLab on 127.0.0.1 (token, fresh settings and workspaces in a temporary folder),
driven through Debian's Chromium by selenium + chromedriver.

- `test_explorer_in_browser`: opens each explorer notebook (`7x_explore.*`), runs all cells, waits for the widgets and
  plotly figures to render, changes a dropdown, asserts through the page's JavaScript that a figure's data changed and
  that no cell shows an error, and saves a screenshot to the artifacts folder (`TSDIFFBENCH_ARTIFACTS`, default a
  temporary folder; its path is printed).
- `test_notebooks_in_lab_kernels`: every notebook in nbs/ runs top to bottom in a JupyterLab kernel through the server's
  REST and websocket API (`#| slow` cells skipped, `IN_TEST=1` as under nbdev's runner), several kernels at a time.

Server and browser are stopped by process id at the end, and by a watchdog after `TSDIFFBENCH_BROWSER_TIMEOUT` seconds.
Missing Chromium, chromedriver or selenium fail the tests with a message; they are never skipped.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parent
ROOT = NBS.parent
EXPLORERS = sorted(NBS.glob("7[2-9]_explore.*.ipynb"))
NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))
HARD_TIMEOUT = float(os.environ.get("TSDIFFBENCH_BROWSER_TIMEOUT", 1500))   # seconds for the whole module
CELL_TIMEOUT = 600                                                         # seconds for one notebook's cells
LAB_WORKERS = int(os.environ.get("TSDIFFBENCH_LAB_WORKERS", 2))            # kernels running notebooks at once
if not EXPLORERS: raise RuntimeError(f"no explorer notebooks (7x_explore.*.ipynb) in {NBS}")


def _kill_tree(pid: int, grace: float = 10.0) -> None:
    "Terminate process `pid` and every descendant it has now (by pid), then kill what is left after `grace` seconds."
    import psutil
    try: root = psutil.Process(pid)
    except psutil.NoSuchProcess: return
    procs = [root] + root.children(recursive=True)
    for p in procs:
        try: p.terminate()
        except psutil.NoSuchProcess: pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try: p.kill()
        except psutil.NoSuchProcess: pass


class _Watchdog:
    "Kills the registered process trees when the module runs past `HARD_TIMEOUT` (the tests then fail on the lost server)."
    def __init__(self):
        self.pids, self.fired = [], False
        self.timer = threading.Timer(HARD_TIMEOUT, self.fire); self.timer.daemon = True; self.timer.start()
    def fire(self):
        self.fired = True
        print(f"\nbrowser test: hard timeout of {HARD_TIMEOUT:.0f} s reached, stopping {self.pids}", file=sys.stderr)
        for pid in self.pids: _kill_tree(pid, grace=2)


@pytest.fixture(scope="module")
def watchdog():
    w = _Watchdog()
    yield w
    w.timer.cancel()


def _free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


class Lab:
    "A running JupyterLab server: `url`, `token`, `api(method, path, body)`."
    def __init__(self, port: int, token: str, proc):
        self.port, self.token, self.proc = port, token, proc
        self.url = f"http://127.0.0.1:{port}"

    def api(self, method: str, path: str, body=None, timeout: float = 30):
        req = urllib.request.Request(f"{self.url}{path}", method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            return json.loads(text) if text else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory, watchdog):
    "JupyterLab on 127.0.0.1 with a token, fresh settings/workspaces/runtime folders, IN_TEST=1 for its kernels."
    tmp = tmp_path_factory.mktemp("lab")
    token, port = uuid.uuid4().hex, _free_port()
    # never write into the checkout: no autosave of executed notebooks, checkpoints in the temporary folder
    settings = tmp / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    env = {**os.environ, "IN_TEST": "1", "TSDIFFBENCH_QUIET": "1", "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp / "config"), "IPYTHONDIR": str(tmp / "ipython"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
           f"--FileContentsManager.checkpoints_kwargs=root_dir={tmp / 'checkpoints'}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")     # containers and CI run as root
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    watchdog.pids.append(proc.pid)
    server = Lab(port, token, proc)
    deadline = time.time() + 120
    while True:
        try: server.api("GET", "/api/status", timeout=5); break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                _kill_tree(proc.pid)
                pytest.fail(f"JupyterLab did not start (exit {proc.poll()}); log:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield server
    try: server.api("POST", "/api/shutdown", timeout=10)                                 # shuts its kernels down too
    except OSError: pass
    try: proc.wait(timeout=20)
    except subprocess.TimeoutExpired: pass
    _kill_tree(proc.pid)
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory, watchdog):
    "Headless Chromium through chromedriver; fails (never skips) when either or selenium is missing."
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("the browser test needs Debian's Chromium and chromedriver: apt-get install -y chromium chromium-driver "
                    f"(found chromium={chromium}, chromedriver={driver_path}); .ci/run installs them")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"the browser test needs selenium (pip install -e '.[dev]'): {e}")
    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1800",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    service = Service(driver_path)
    drv = webdriver.Chrome(service=service, options=opts)
    watchdog.pids.append(service.process.pid)
    drv.set_script_timeout(30)
    yield drv
    quitter = threading.Thread(target=drv.quit, daemon=True); quitter.start(); quitter.join(20)
    _kill_tree(service.process.pid)


@pytest.fixture(scope="module")
def artifacts():
    folder = Path(os.environ.get("TSDIFFBENCH_ARTIFACTS") or tempfile.mkdtemp(prefix="tsdiffbench-browser-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {folder}")
    return folder


# ------------------------------------------------------------------------------------------------------------------
# JavaScript read through the page: JupyterLab's app object (exposed by --LabApp.expose_app_in_browser) and the DOM.

NOTEBOOK_STATE = """
const path = arguments[0];
const app = window.jupyterapp;
if (!app) return {ready: false, why: 'no jupyterapp'};
let w = null;
for (const x of app.shell.widgets('main')) if (x.context && x.context.path === path && x.content && x.content.model) w = x;
if (!w) return {ready: false, why: 'notebook not open'};
if (arguments[1]) { app.shell.activateById(w.id); app.commands.execute('notebook:run-all-cells'); }
const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
const cells = [], errors = [];
for (let i = 0; i < w.content.model.cells.length; i++) {
  const c = w.content.model.cells.get(i);
  if (c.type !== 'code') continue;
  cells.push(c.executionCount);
  for (const o of c.outputs.toJSON()) if (o.output_type === 'error') errors.push(i + ': ' + o.ename + ': ' + o.evalue);
}
const node = w.content.node;
const text = node.innerText;
for (const bad of ['Error displaying widget', 'Failed to load model class', 'Traceback (most recent call last)'])
  if (text.includes(bad)) errors.push('page shows: ' + bad);
return {ready: true, kernel: kernel ? kernel.status : null, counts: cells, errors: errors,
        plots: node.querySelectorAll('.js-plotly-plot').length,
        widgets: node.querySelectorAll('.jupyter-widgets.widget-dropdown, .widget-dropdown').length,
        pending: node.querySelectorAll('.jp-InputPrompt').length ?
                 Array.from(node.querySelectorAll('.jp-InputPrompt')).filter(p => p.textContent.includes('*')).length : 0};
"""

PLOT_DATA = """
let node = null;
for (const x of window.jupyterapp.shell.widgets('main')) if (x.context && x.context.path === arguments[0]) node = x.content.node;
return Array.from(node.querySelectorAll('.js-plotly-plot')).map(
  el => JSON.stringify((el.data || []).map(t => [t.type, t.x, t.y, t.z])));
"""


DROPDOWNS = """
for (const x of window.jupyterapp.shell.widgets('main')) if (x.context && x.context.path === arguments[0])
  return Array.from(x.content.node.querySelectorAll('.widget-dropdown select')).filter(s => s.options.length > 1);
return [];
"""


def _wait(what: str, fn, timeout: float, interval: float = 0.5):
    "Poll `fn()` until it returns a true value; fail with `what` and the last value after `timeout` seconds."
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        last = fn()
        if last: return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last state: {last}")


@pytest.mark.parametrize("nb", EXPLORERS, ids=[p.stem for p in EXPLORERS])
def test_explorer_in_browser(nb, lab, browser, artifacts):
    "Run the explorer in JupyterLab, change a dropdown in the page and see a figure's data change; no cell shows an error."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    rel = nb.relative_to(ROOT).as_posix()
    t0 = time.time()
    browser.get(f"{lab.url}/lab/tree/{rel}?reset&token={lab.token}")
    state = lambda run=False: browser.execute_script(NOTEBOOK_STATE, rel, run)
    _wait(f"{rel} to open with an idle kernel", lambda: (s := state())["ready"] and s["kernel"] == "idle" and s, 120)
    state(run=True)                                                                     # activate it, then Run > Run All Cells
    def finished():
        s = state()
        if s.get("errors"): pytest.fail(f"{rel}: a cell shows an error: {s['errors']}")
        done = s["ready"] and s["kernel"] == "idle" and all(c is not None for c in s["counts"]) and not s["pending"]
        return s if done else None
    s = _wait(f"all cells of {rel} to run", finished, CELL_TIMEOUT)
    run_seconds = time.time() - t0
    s = _wait(f"plotly figures and widgets of {rel} to render",
              lambda: (x := state())["plots"] > 0 and x["widgets"] > 0 and x, 60)
    before = _wait("plot data to be readable", lambda: browser.execute_script(PLOT_DATA, rel), 30)
    # change the first dropdown of the panel that offers a choice (e.g. toy, variate, model, file) to its next option
    selects = browser.execute_script(DROPDOWNS, rel)
    assert selects, f"{rel}: no dropdown with a choice found in the page"
    menu = Select(selects[0])
    index = browser.execute_script("return arguments[0].selectedIndex", selects[0])
    current, target = menu.options[index].text, menu.options[(index + 1) % len(menu.options)].text
    t1 = time.time()
    menu.select_by_index((index + 1) % len(menu.options))
    after = _wait(f"a figure of {rel} to change after choosing {target!r}",
                  lambda: (d := browser.execute_script(PLOT_DATA, rel)) != before and d, 60, interval=0.1)
    redraw = time.time() - t1
    browser.save_screenshot(str(artifacts / f"{nb.stem}.png"))
    s = state()
    assert not s["errors"], f"{rel}: {s['errors']}"
    assert len(after) == len(before) and after != before
    print(f"{rel}: cells ran in {run_seconds:.1f} s; dropdown {current!r} → {target!r} redrawn in the page in {redraw:.2f} s; "
          f"{s['plots']} plotly figures")


# ------------------------------------------------------------------------------------------------------------------
# Every notebook through the server's API

def _directives(source: str) -> dict:
    "nbdev cell directives (`#| name args`) at the top of a cell."
    out = {}
    for line in source.splitlines():
        if not line.startswith("#|"): break
        parts = line[2:].strip().split(None, 1)
        if parts: out[parts[0].rstrip(":")] = parts[1].strip() if len(parts) > 1 else ""
    return out


def _skipped(source: str) -> bool:
    "Cells nbdev's test runner skips: `#| slow`, `#| eval: false`, and nbdev_export() calls."
    d = _directives(source)
    return "slow" in d or d.get("eval", "").lower() == "false" or "nbdev_export" + "(" in source


def run_in_lab_kernel(lab: Lab, nb: Path, timeout: float = CELL_TIMEOUT) -> tuple[bool, float, str]:
    "(ok, seconds, error) of running the notebook's code cells in a new kernel of `lab` over the websocket channels."
    import websocket
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    rel = nb.relative_to(ROOT).as_posix()
    session = lab.api("POST", "/api/sessions", {"path": rel, "type": "notebook", "name": nb.name, "kernel": {"name": "python3"}})
    kernel, t0 = session["kernel"]["id"], time.time()
    ws = websocket.create_connection(f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel}/channels?token={lab.token}", timeout=timeout)
    try:
        for i, cell in enumerate(cells):
            source = "".join(cell["source"])
            if _skipped(source) or not source.strip(): continue
            msg_id = uuid.uuid4().hex
            ws.send(json.dumps({"header": {"msg_id": msg_id, "username": "test", "session": session["id"], "msg_type": "execute_request",
                                           "version": "5.3", "date": ""}, "parent_header": {}, "metadata": {}, "channel": "shell",
                                "content": {"code": source, "silent": False, "store_history": True, "user_expressions": {},
                                            "allow_stdin": False, "stop_on_error": True}}))
            error, idle, replied = None, False, False
            while not (idle and replied):
                if time.time() - t0 > timeout: return False, time.time() - t0, f"cell {i}: timed out after {timeout:.0f} s"
                opcode, data = ws.recv_data()
                if opcode != websocket.ABNF.OPCODE_TEXT: continue                   # comm messages with binary buffers (widgets)
                msg = json.loads(data)
                if msg.get("parent_header", {}).get("msg_id") != msg_id: continue
                kind = msg["header"]["msg_type"]
                if kind == "error": error = f"cell {i}: {msg['content']['ename']}: {msg['content']['evalue']}\n" + \
                                            "\n".join(msg["content"]["traceback"])[-3000:]
                elif kind == "status" and msg["content"]["execution_state"] == "idle": idle = True
                elif kind == "execute_reply":
                    replied = True
                    if msg["content"]["status"] != "ok" and error is None: error = f"cell {i}: {msg['content'].get('ename')}: {msg['content'].get('evalue')}"
            if error: return False, time.time() - t0, error
        return True, time.time() - t0, ""
    finally:
        ws.close()
        try: lab.api("DELETE", f"/api/sessions/{session['id']}")
        except OSError: pass


def _guarded(lab: Lab, nb: Path) -> tuple[bool, float, str]:
    "run_in_lab_kernel, with a failure of the harness itself reported for that notebook instead of stopping the others."
    t0 = time.time()
    try: return run_in_lab_kernel(lab, nb)
    except Exception as e: return False, time.time() - t0, f"{type(e).__name__}: {e}"


def test_notebooks_in_lab_kernels(lab):
    "Every notebook in nbs/ runs top to bottom in a JupyterLab kernel (IN_TEST=1, `#| slow` skipped), LAB_WORKERS at a time."
    t0 = time.time()
    with ThreadPoolExecutor(LAB_WORKERS) as pool:
        results = dict(zip(NOTEBOOKS, pool.map(lambda nb: _guarded(lab, nb), NOTEBOOKS)))
    for nb, (ok, secs, _) in results.items(): print(f"{nb.name}: {'ok' if ok else 'FAILED'} in {secs:.1f} s")
    print(f"all {len(NOTEBOOKS)} notebooks in JupyterLab kernels: {time.time() - t0:.0f} s with {LAB_WORKERS} kernels at a time")
    failed = {nb.name: err for nb, (ok, _, err) in results.items() if not ok}
    assert not failed, "notebooks failing in a JupyterLab kernel:\n" + "\n\n".join(f"{k}: {v}" for k, v in failed.items())
