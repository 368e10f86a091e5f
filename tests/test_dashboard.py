"""GET /dashboard in headless Chromium against a live service.

The page loads, draws the arms and the loop health that the API gives, says so when there are no arms yet,
shows a banner when it cannot reach the API, and leaves a screenshot (copied to docs/learning/dashboard.png
when MAB_KEEP_SCREENSHOT is set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from mab_service import dashboard
from tests.conftest import Rand, Server, stop_process, wait_until

CHROMIUM_TIMEOUT_S = 60.0
APT_TIMEOUT_S = 900.0
# Virtual time: the page polls at 0, 2 and 4 s of it; Chromium runs it faster than the wall clock.
VIRTUAL_TIME_BUDGET_MS = 5000
WINDOW = (1280, 1340)
SCREENSHOT_COPY = Path(__file__).resolve().parents[1] / "docs" / "learning" / "dashboard.png"

# Ids that a careless page would turn into markup; the arms' hidden click rates make the forest plot uneven.
ARMS = {f"arm-{i:02d}": 0.04 + 0.02 * i for i in range(20)} | {
    "<img src=x onerror=alert(1)>": 0.3,
    "é-unicode": 0.2,
}
ROUNDS = 150
TOP_K = 3
# For the picture in the docs, the rounds are spread over a few of the loop's 10 s buckets so that the reward-rate
# chart has a line to draw; the assertions do not depend on it.
KEEP_SCREENSHOT = bool(os.environ.get("MAB_KEEP_SCREENSHOT"))
TRAFFIC_SPAN_S = 45.0 if KEEP_SCREENSHOT else 0.0


# --- Chromium ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's ``chromium``, installed with apt-get when missing and running as root."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs Debian's chromium: not installed, and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = ""
    for attempt in (
        ["apt-get", "install", "-y", "chromium"],
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "chromium"],
    ):
        try:
            done = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"needs Debian's chromium: {' '.join(attempt)} took more than {APT_TIMEOUT_S:.0f} s")
        log = done.stdout[-2000:] + done.stderr[-2000:]
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip(f"needs Debian's chromium: apt-get could not install it:\n{log}")


def run_chromium(chromium: str, profile: Path, *args: str) -> str:
    """Run headless Chromium with a fresh profile, bounded in time; its stdout."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {CHROMIUM_TIMEOUT_S:.0f} s: {cmd}") from None
    finally:
        # Chromium's helper processes share its group; none may outlive the run.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err.decode(errors='replace')[-3000:]}"
    return out.decode()


# --- A small DOM from Chromium's --dump-dom --------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> list[Node]:
        found = [self]
        for c in self.children:
            if isinstance(c, Node):
                found += c.walk()
        return found

    def all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [
            n
            for n in self.walk()
            if (tag is None or n.tag == tag) and (cls is None or cls in n.attrs.get("class", "").split())
        ]

    def by_id(self, id_: str) -> Node:
        (node,) = [n for n in self.walk() if n.attrs.get("id") == id_]
        return node


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# --- Numbers as the page writes them ----------------------------------------------------------------------------


def _rounded(x: float, digits: int) -> Decimal:
    # Both toFixed and Intl round the exact binary value half away from zero.
    return Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)


def fixed3(x: float) -> str:
    """JavaScript's ``x.toFixed(3)``."""
    return f"{_rounded(x, 3):.3f}"


def number_text(x: float, digits: int) -> str:
    """``x.toLocaleString("en-US", {maximumFractionDigits: digits})``."""
    text = f"{_rounded(x, digits):,.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# --- The live service -------------------------------------------------------------------------------------------


@dataclass
class Live:
    server: Server
    empty_dom: Node
    empty_arms: Any
    sent: dict[str, int]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dashboard-features") / "arms.csv"
    path.write_text("entity_id,alpha,beta\n" + "".join(f"{id_},1,1\n" for id_ in ARMS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def service(
    server_factory: Callable[..., Server], catalogue: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The real service, in its own process group, stopped when this module is done."""
    state_dir = tmp_path_factory.mktemp("dashboard-state")
    server = server_factory(args=["--features", f"csv:{catalogue}", "--state-dir", str(state_dir)])
    yield server
    stop_process(server.proc)


@pytest.fixture(scope="module")
def live(service: Server, chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Live:
    """The service's page drawn before any traffic, then rounds of answers and clicks so that arms exist."""
    empty_dom = parse(
        run_chromium(chromium, tmp_path_factory.mktemp("profile"), "--dump-dom", service.url + "/dashboard")
    )
    empty_arms = api(service, "/arms")
    rand = Rand(seed=20261128)
    sent = {"impressions": 0, "accepted": 0, "duplicate": 0, "unknown_event": 0}
    started = time.monotonic()
    with service.client() as http:
        for r in range(ROUNDS):
            time.sleep(max(0.0, started + r * TRAFFIC_SPAN_S / ROUNDS - time.monotonic()))
            answer = http.post(
                "/predict", json={"user_id": f"u{r % 17}", "candidates": list(ARMS), "top_k": TOP_K, "seed": r}
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            sent["impressions"] += len(body["ids"])
            for id_ in body["ids"]:
                if rand.gen.random() < ARMS[id_]:
                    # One half reward, so that the page's reward column shows a fraction.
                    value = 0.5 if sent["accepted"] == 3 else 1.0
                    reward = {"event_id": body["event_id"], "id": id_, "reward": value}
                    assert http.post("/reward", json=reward).status_code == 202
                    sent["accepted"] += 1
                    if sent["duplicate"] == 0:
                        assert http.post("/reward", json=reward).json() == {"status": "duplicate"}
                        sent["duplicate"] += 1
        refused = http.post("/reward", json={"event_id": "never-answered", "id": "arm-00"})
        assert refused.status_code == 404
        sent["unknown_event"] += 1

        def settled() -> bool:
            loop = http.get("/loop").json()
            return bool(
                loop["impressions_total"] == sent["impressions"] and loop["rewards_accepted"] == sent["accepted"]
            )

        assert wait_until(settled, timeout_s=10), http.get("/loop").text
    return Live(service, empty_dom, empty_arms, sent)


def percentages(node: Node) -> dict[str, float]:
    """The percentages of an element's inline style, e.g. ``{"left": 12.5}`` for ``left: 12.5%``."""
    pairs = (d.split(":") for d in node.attrs["style"].split(";") if d.strip())
    return {k.strip(): float(v.strip().removesuffix("%")) for k, v in pairs}


def api(server: Server, path: str) -> Any:
    with server.client() as http:
        answer = http.get(path)
    assert answer.status_code == 200, answer.text
    return answer.json()


# --- Tests ------------------------------------------------------------------------------------------------------


def test_page_is_self_contained() -> None:
    html = dashboard.page().decode("utf-8")
    assert dashboard.page() is dashboard.page()  # read once
    assert html.lower().startswith("<!doctype html>")
    # Nothing from a network: the only absolute URL is the SVG namespace, which is a name, never fetched.
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    # The API is reached by relative URLs, so that the page works under any prefix.
    assert 'getJSON("loop")' in html and '"arms?top="' in html
    # Data reaches the DOM as text only.
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html


def test_served_at_dashboard(service: Server) -> None:
    answer = httpx.get(service.url + "/dashboard", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.content == dashboard.page()


def test_before_any_impression(live: Live) -> None:
    # The table lists the catalogue's arms at their priors, and says that nothing was shown yet.
    dom = live.empty_dom
    rows = dom.all("tr", "arm")
    assert [row.attrs["data-id"] for row in rows] == [a["id"] for a in live.empty_arms["arms"]]
    assert len(rows) == 20 and live.empty_arms["total"] == len(ARMS)
    assert {row.all("td", "impressions")[0].text() for row in rows} == {"0"}
    assert {row.all("td", "mean")[0].text() for row in rows} == {"0.500"}  # Beta(1, 1)
    note = dom.by_id("arms-note")
    assert "hidden" not in note.attrs and note.text().startswith("No impressions yet")
    assert dom.by_id("chart").text() == "no impressions yet"
    assert "hidden" in dom.by_id("banner").attrs
    assert dom.by_id("h-learning").text() == "on"
    assert dom.by_id("h-impressions").text() == "0"


def test_learning_off(server_factory: Callable[..., Server], catalogue: Path, chromium: str, tmp_path: Path) -> None:
    # Served with --no-learning, /arms refuses (learning_off) and /loop says only that: a state, not an error.
    server = server_factory(args=["--features", f"csv:{catalogue}", "--no-learning"])
    try:
        assert api(server, "/loop") == {"learning": False}
        dom = parse(run_chromium(chromium, tmp_path / "profile", "--dump-dom", server.url + "/dashboard"))
    finally:
        stop_process(server.proc)
    assert "hidden" in dom.by_id("banner").attrs, dom.by_id("banner").text()
    assert dom.by_id("h-learning").text() == "off"
    assert dom.by_id("h-durable").text() == "–"
    assert dom.by_id("h-events").text() == "–"
    (message,) = dom.by_id("arm-rows").all("td", "empty")
    assert message.text() == "learning is off (--no-learning): no counts to show"
    assert dom.by_id("chart").text() == "learning is off"


@pytest.mark.parametrize("order", ["mean", "impressions", "rewards"])
def test_draws_the_arms_the_api_gives(live: Live, chromium: str, tmp_path: Path, order: str) -> None:
    top = 10
    dom = parse(
        run_chromium(
            chromium, tmp_path / "profile", "--dump-dom", f"{live.server.url}/dashboard?top={top}&order={order}"
        )
    )
    arms = api(live.server, f"/arms?top={top}&order={order}")
    assert "hidden" in dom.by_id("banner").attrs, dom.by_id("banner").text()
    assert "hidden" in dom.by_id("arms-note").attrs
    assert len(arms["arms"]) == top

    rows = dom.all("tr", "arm")
    assert [row.attrs["data-id"] for row in rows] == [a["id"] for a in arms["arms"]]
    for row, arm in zip(rows, arms["arms"]):
        cells = {c.attrs["class"]: c.text() for c in row.all("td")}
        assert cells["id"] == arm["id"]
        assert cells["mean"] == fixed3(arm["mean"])
        assert cells["interval"] == f"{fixed3(arm['low'])} – {fixed3(arm['high'])}"
        assert cells["impressions"] == number_text(arm["impressions"], 0)
        assert cells["rewards"] == number_text(arm["rewards"], 2)
        # The forest plot puts the dot at the mean and the bar over the interval, on 0..1.
        (dot,) = row.all("div", "dot")
        (bar,) = row.all("div", "ci")
        assert percentages(dot) == pytest.approx({"left": 100 * arm["mean"]}, abs=1e-3)
        assert percentages(bar) == pytest.approx(
            {"left": 100 * arm["low"], "width": 100 * (arm["high"] - arm["low"])}, abs=1e-3
        )
    # Ids stay text: the markup-like id is drawn as characters, never as an element.
    assert dom.all("img") == []
    assert (
        dom.by_id("arms-count").text()
        == f"(top {top} of {arms['total']} arms, by "
        + {
            "mean": "posterior mean",
            "impressions": "impressions",
            "rewards": "rewards",
        }[order]
        + ")"
    )


def test_shows_the_loop_health(live: Live, chromium: str, tmp_path: Path) -> None:
    dom = parse(run_chromium(chromium, tmp_path / "profile", "--dump-dom", live.server.url + "/dashboard"))
    loop = api(live.server, "/loop")
    assert dom.by_id("h-learning").text() == ("on" if loop["learning"] else "off")
    assert dom.by_id("h-durable").text() == ("yes" if loop["durable"] else "no")
    assert dom.by_id("h-events").text() == number_text(loop["events_held"], 0)
    assert dom.by_id("h-impressions").text() == number_text(live.sent["impressions"], 0)
    assert dom.by_id("h-accepted").text() == number_text(live.sent["accepted"], 0)
    assert dom.by_id("h-rewards").text() == number_text(loop["rewards_total"], 2)
    assert dom.by_id("h-window").text() == number_text(loop["reward_window_s"], 0) + " s"
    refusals = {li.attrs["data-kind"]: li.all("span")[1].text() for li in dom.by_id("h-refusals").all("li")}
    assert refusals == {kind: number_text(n, 0) for kind, n in loop["refusals"].items()}
    assert refusals["duplicate"] == number_text(live.sent["duplicate"], 0)
    assert refusals["unknown_event"] == number_text(live.sent["unknown_event"], 0)
    # The reward-rate chart: one point per bucket that had impressions.
    buckets = [p for p in loop["series"] if p["impressions"] > 0]
    assert buckets
    chart = dom.by_id("chart")
    assert len(chart.all("circle", "pt")) == len(buckets)
    assert chart.all("path", "line")[0].attrs["d"].startswith("M")
    sum_r = sum(p["rewards"] for p in loop["series"])
    sum_i = sum(p["impressions"] for p in loop["series"])
    assert f"{number_text(sum_r, 2)} rewards over {number_text(sum_i, 0)} impressions" in dom.by_id("chart-desc").text()


def test_unreachable_api_shows_a_banner(chromium: str, tmp_path: Path) -> None:
    # Opened from a file, the page's relative API URLs lead nowhere.
    page = tmp_path / "dashboard.html"
    page.write_bytes(dashboard.page())
    dom = parse(run_chromium(chromium, tmp_path / "profile", "--dump-dom", page.as_uri()))
    banner = dom.by_id("banner")
    assert "hidden" not in banner.attrs
    assert banner.text().startswith("Cannot update: cannot reach arms")
    assert "cannot reach loop" in banner.text()


def test_screenshot(live: Live, chromium: str, tmp_path: Path) -> None:
    shot = tmp_path / "dashboard.png"
    run_chromium(
        chromium,
        tmp_path / "profile",
        f"--screenshot={shot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
        f"{live.server.url}/dashboard?top=20&order=mean",
    )
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == WINDOW
    if KEEP_SCREENSHOT:
        SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_COPY)


# --- With API keys on ---------------------------------------------------------------------------------------------

API_KEY = "dashboard-key-0123456789"
# Runs the page's own key handling (its first script) in Node, against a live service with API keys on: a fake tab
# (sessionStorage, location, history) opened as /dashboard?top=10#key=...&view=1, then keys typed in the form.
KEY_DRIVER = """
const kept = new Map();
const storage = {
  getItem: (k) => (kept.has(k) ? kept.get(k) : null),
  setItem: (k, v) => kept.set(k, String(v)),
  removeItem: (k) => kept.delete(k),
};
const replaced = [];
const hash = "#key=" + encodeURIComponent(process.env.KEY) + "&view=1";
const loc = { hash, pathname: "/dashboard", search: "?top=10" };
const keys = apiKeys(storage, loc, { replaceState: (state, title, url) => replaced.push(url) });
const status = async (headers) => (await fetch(process.env.URL + "/loop", { headers })).status;
(async () => {
  const out = { replaced, known: keys.known(), fromFragment: await status(keys.headers()) };
  keys.set("   ");
  out.cleared = keys.headers();
  out.none = await status(keys.headers());
  keys.set(" not-a-known-key-0000 ");
  out.wrong = await status(keys.headers());
  keys.set(process.env.KEY);
  out.typed = await status(keys.headers());
  console.log(JSON.stringify(out));
})();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node to run the page's script")
def test_with_api_keys_the_page_sends_the_key_it_is_given(
    server_factory: Callable[..., Server], catalogue: Path, tmp_path: Path
) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"{API_KEY}\n")
    server = server_factory(args=["--features", f"csv:{catalogue}", "--api-keys-file", str(keys_file)])
    html = dashboard.page().decode("utf-8")
    found = re.search(r'<script id="api-key">(.*?)</script>', html, re.S)
    assert found is not None
    # The page needs the key like every route but the probes; what it fetches needs one too, and it sends it.
    assert httpx.get(server.url + "/dashboard").status_code == 401
    assert httpx.get(server.url + "/dashboard", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(server.url + "/loop").status_code == 401
    assert "...keys.headers()" in html and 'r.reason.code === "unauthorized"' in html
    script = tmp_path / "keys.js"
    script.write_text(found.group(1) + KEY_DRIVER)
    env = {**os.environ, "URL": server.url, "KEY": API_KEY}
    done = subprocess.run(["node", str(script)], capture_output=True, text=True, env=env, timeout=60, check=True)
    out = json.loads(done.stdout)
    # The key leaves the address bar at once; the rest of the fragment and the query stay.
    assert out["replaced"] == ["/dashboard?top=10#view=1"]
    assert out["known"] is True and out["fromFragment"] == 200
    assert out["cleared"] == {} and out["none"] == 401
    assert out["wrong"] == 401 and out["typed"] == 200


def test_the_segment_selector_draws_the_arms_of_one_segment(
    server_factory: Callable[..., Server], catalogue: Path, chromium: str, tmp_path: Path
) -> None:
    server = server_factory(args=["--features", f"csv:{catalogue}", "--state-dir", str(tmp_path / "state")])
    try:
        with server.client() as http:
            for r in range(12):
                segment = "fr" if r % 3 else None
                body = {"user_id": "u", "candidates": list(ARMS), "top_k": TOP_K, "seed": r, "segment": segment}
                assert http.post("/predict", json=body).status_code == 200
        dom = parse(
            run_chromium(chromium, tmp_path / "profile", "--dump-dom", f"{server.url}/dashboard?top=50&segment=fr")
        )
        arms = api(server, "/arms?top=50&order=impressions&segment=fr")
        assert "hidden" in dom.by_id("banner").attrs, dom.by_id("banner").text()
        rows = dom.all("tr", "arm")
        assert [row.attrs["data-id"] for row in rows] == [a["id"] for a in arms["arms"]]
        assert sum(a["impressions"] for a in arms["arms"]) == 8 * TOP_K  # the segment's answers alone
        for row, arm in zip(rows, arms["arms"]):
            cells = {c.attrs["class"]: c.text() for c in row.all("td")}
            assert cells["impressions"] == number_text(arm["impressions"], 0)
        assert dom.by_id("arms-count").text() == (
            f'(top {len(arms["arms"])} of {arms["total"]} arms shown in segment "fr", by impressions)'
        )
    finally:
        stop_process(server.proc)
