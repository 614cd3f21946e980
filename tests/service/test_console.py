"""The web console at /ui/ in a real browser: Debian's chromium, headless, driven by Playwright (pointed at
the system browser; nothing is downloaded), against the real API server, PostgreSQL, Redis, a Celery
training worker and an inference worker. Screenshots go to tests/artifacts/console/ (or
$RLHF_TEST_ARTIFACTS/console/)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from service.api.app import CONSOLE_DIR
from tests.service.conftest import EvalsWorker, Stack, Workers, wait_for

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("RLHF_CHROMIUM", "/usr/bin/chromium")
# what the machine's closed network needs (no background connections, no sandbox as root)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ARTIFACTS = (
    Path(os.environ.get("RLHF_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts")) / "console"
)
PROMPT = "What is a kite?"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert (CONSOLE_DIR / "index.html").is_file(), "the console is not built: make console"
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).is_file(), f"no {CHROMIUM}: apt-get install chromium"
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh tab (its own session storage); a screenshot of it at the end, named after the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def sign_in(page: Any, url: str, key: str) -> None:
    page.goto(f"{url}/ui/")
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("table#jobs")


@pytest.fixture(scope="module")
def key(e2e_client: httpx.Client) -> str:
    return e2e_client.headers["Authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def inference(
    e2e_stack: Stack, e2e_finished: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    """An inference worker, started after the training tests of this module (two torch processes at once
    on two cores slow each other several-fold)."""
    w = Workers(e2e_stack, tmp_path_factory.mktemp("console-inference"))
    w.start()
    yield w
    w.stop()


def test_the_console_is_served_with_a_content_security_policy(e2e_stack: Stack) -> None:
    r = httpx.get(f"{e2e_stack.url}/ui/")
    assert r.status_code == 200 and '<div id="app">' in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    script = next(line for line in r.text.splitlines() if "<script" in line)
    assert 'src="/ui/assets/' in script  # built assets, served from here: no CDN
    asset = httpx.get(e2e_stack.url + script.split('src="')[1].split('"')[0])
    assert asset.status_code == 200 and "javascript" in asset.headers["content-type"]
    assert httpx.get(f"{e2e_stack.url}/ui", follow_redirects=False).headers["location"] == "/ui/"


def test_a_wrong_key_is_refused_by_the_sign_in_form_and_a_good_one_lists_the_jobs(
    page: Any, e2e_stack: Stack, key: str, e2e_finished: dict[str, Any]
) -> None:
    page.goto(f"{e2e_stack.url}/ui/")
    page.fill("#api-key", "sk-not-a-key")
    page.click("#sign-in button[type=submit]")
    message = page.locator("#sign-in-message")
    message.filter(has_text="not accepted").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    job = e2e_finished["job"]
    row = page.locator(f"tr[data-job='{job['id']}']")
    row.wait_for()
    assert row.locator("[data-status]").inner_text() == "succeeded"
    assert "100%" in row.inner_text() and "$" in row.inner_text()
    assert page.evaluate("Object.keys(sessionStorage)") == ["rlhf.apiKey"]
    assert page.evaluate("localStorage.length") == 0  # the key is kept in this tab only


def test_a_finished_job_shows_its_steps_curves_checkpoints_and_rollouts(
    page: Any, e2e_stack: Stack, key: str, e2e_client: httpx.Client, e2e_finished: dict[str, Any]
) -> None:
    job = e2e_finished["job"]
    sign_in(page, e2e_stack.url, key)
    page.click(f"tr[data-job='{job['id']}'] a")
    page.wait_for_selector("#live:has-text('stream ended')")
    assert page.locator("#step-status [data-status='succeeded']").count() == 3
    metrics = e2e_client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", params={"step": 3}).json()["data"]
    for metric in (
        "reward_mean",
        "kl_to_ref",
        "actor_loss",
        "critic_loss",
    ):  # every point of the series is drawn
        chart = page.locator(f".curves-step[data-step='3'] .chart[data-metric='{metric}']")
        assert chart.get_attribute("data-points") == str(sum(metric in p["values"] for p in metrics)), metric
    assert page.locator(".curves-step[data-step='1'] .chart[data-metric='loss']").count() == 1
    ckpts = e2e_client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 100}).json()[
        "data"
    ]
    assert page.locator("#checkpoints tbody tr").count() == len(ckpts) >= 3
    assert page.locator("#checkpoints tbody tr", has_text="(final)").count() == 3  # each step's final model
    rollouts = e2e_client.get(f"/v1/fine_tuning/jobs/{job['id']}/rollouts", params={"limit": 100}).json()[
        "data"
    ]
    first = page.locator("#rollouts tbody tr").first.locator("td")
    assert page.locator("#rollouts tbody tr").count() == min(20, len(rollouts))
    assert first.nth(0).inner_text() == str(rollouts[-1]["id"])  # newest first
    assert (
        first.nth(2).inner_text().strip() == rollouts[-1]["answer"].strip()
    )  # an answer may start with a space


def test_a_graded_jobs_rollouts_show_each_part_the_judges_replies_and_the_flags(
    page: Any, e2e_stack: Stack, judged_job: dict[str, Any]
) -> None:
    with e2e_stack.client(judged_job["key"]) as http:
        rollouts = http.get(
            f"/v1/fine_tuning/jobs/{judged_job['id']}/rollouts", params={"limit": 100}
        ).json()["data"]
    sign_in(page, e2e_stack.url, judged_job["key"])
    page.click(f"tr[data-job='{judged_job['id']}'] a")
    newest = rollouts[-1]
    cell = page.locator("#rollouts tbody tr").first.locator("td.grader")
    py = newest["grades"]["py"]  # each part's score, as the console writes numbers (fmt.num)
    expect(cell).to_contain_text(f"py {int(py) if py == round(py) else format(py, '#.4g')}")
    judge = newest["judges"][0]
    said = json.dumps(judge["text"]) if judge["text"] is not None else f"no reply: {judge['error']}"
    expect(cell.locator("[data-judge='judge']")).to_have_text(f"judge (tiny-opt-xs): {said}")
    for flag in newest["errors"]:  # what could not be graded, by OpenAI's flag
        expect(cell.locator(".flag", has_text=flag)).to_have_count(1)


def test_the_evals_page_compares_a_jobs_sft_and_rlhf_models(
    page: Any, e2e_stack: Stack, compared_eval: dict[str, Any]
) -> None:
    eval_id = compared_eval["eval_id"]
    with e2e_stack.client(compared_eval["key"]) as http:
        criteria = [c["name"] for c in http.get(f"/v1/evals/{eval_id}").json()["testing_criteria"]]
        runs = [http.get(f"/v1/evals/{eval_id}/runs/{r}").json() for r in compared_eval["runs"].values()]

    def rate(passed: int, total: int) -> str:
        return f"{round(100 * passed / total)}% ({passed}/{total})"

    sign_in(page, e2e_stack.url, compared_eval["key"])
    page.goto(f"{e2e_stack.url}/ui/#/evals/{eval_id}")
    heads = page.locator("#eval-runs thead th[data-run]")
    expect(heads).to_have_count(2)
    for k, run in enumerate(runs):  # the SFT model's run, then the RLHF model's
        expect(heads.nth(k)).to_contain_text(run["name"])
    counts = [r["result_counts"] for r in runs]
    expect(page.locator("#eval-runs tr[data-row='overall'] td")).to_have_text(
        [rate(c["passed"], c["total"]) for c in counts]
    )
    for name in criteria:  # each criterion's pass rate per run, as the API counts it
        per = [
            next(p for p in r["per_testing_criteria_results"] if p["testing_criteria"] == name) for r in runs
        ]
        expect(page.locator(f"#eval-runs tr[data-criterion='{name}'] td")).to_have_text(
            [rate(p["passed"], p["passed"] + p["failed"]) for p in per]
        )


def test_the_evals_page_shows_runs_side_by_side_and_the_items_where_they_differ(
    page: Any, e2e_stack: Stack, tmp_path: Path
) -> None:
    key = e2e_stack.key("console-evals")
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    check = {
        "type": "string_check",
        "name": "names it",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "ilike",
    }
    evals = EvalsWorker(e2e_stack, tmp_path)
    evals.start()
    try:
        with e2e_stack.client(key) as http:
            ev = http.post(
                "/v1/evals",
                json={
                    "name": "side by side",
                    "data_source_config": {"type": "custom", "item_schema": schema},
                    "testing_criteria": [check],
                },
            ).json()
            answers = {"base": ["a kite", "the wind", "no idea"], "tuned": ["a kite", "no idea", "a dog"]}
            items = [{"answer": "kite"}, {"answer": "wind"}, {"answer": "dog"}]
            for name, said in answers.items():
                content = [
                    {"item": i, "sample": {"output_text": t}} for i, t in zip(items, said, strict=True)
                ]
                run = http.post(
                    f"/v1/evals/{ev['id']}/runs",
                    json={
                        "name": name,
                        "data_source": {
                            "type": "jsonl",
                            "source": {"type": "file_content", "content": content},
                        },
                    },
                ).json()
                deadline = time.monotonic() + 60
                while http.get(f"/v1/evals/{ev['id']}/runs/{run['id']}").json()["status"] != "completed":
                    assert time.monotonic() < deadline
                    time.sleep(0.3)
        sign_in(page, e2e_stack.url, key)
        page.click("nav a[href='#/evals']")
        page.click(f"tr[data-eval='{ev['id']}'] a")
        overall = page.locator("#eval-runs tr[data-row='overall'] td")
        expect(overall).to_have_text(["67% (2/3)", "67% (2/3)"])
        expect(page.locator("#eval-runs tr[data-criterion='names it'] td")).to_have_text(
            ["67% (2/3)", "67% (2/3)"]
        )
        differ = page.locator("#eval-differ tbody tr")
        expect(differ).to_have_count(2)  # items 1 and 2: wind (base passes), dog (the tuned model passes)
        assert [differ.nth(k).get_attribute("data-item") for k in range(2)] == ["1", "2"]
        expect(differ.nth(0).locator("td[data-status]")).to_have_text(["passthe wind", "failno idea"])
    finally:
        evals.stop()


def test_submit_a_job_see_its_curve_gain_points_live_then_cancel_it(
    page: Any,
    e2e_stack: Stack,
    key: str,
    e2e_client: httpx.Client,
    e2e_finished: dict[str, Any],
    tmp_path: Path,
) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {n}?"},
                {"role": "assistant", "content": f"It is {n}."},
            ]
        }
        for n in ("a kite", "a dog", "an owl", "a lamp", "a boat", "a duck", "a frog", "a bear") * 8
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sign_in(page, e2e_stack.url, key)
    page.click("nav a[href='#/new']")
    page.select_option("#model", "tiny-opt-xs")
    page.select_option("#method", "supervised")
    page.select_option("#preset", "tiny")
    page.set_input_files("#upload", str(data))  # uploaded at once, then chosen as the training file
    page.locator("label", has_text="upload").filter(has_text="uploaded as file-").wait_for()
    file_id = page.locator("#training-file").input_value()
    assert file_id.startswith("file-") and e2e_client.get(f"/v1/files/{file_id}").json()["rows"] == 64
    page.fill("#config", '{"sft": {"max_steps": 100000, "num_train_epochs": 5000, "checkpoint_interval": 0}}')
    estimate = page.locator("#estimate")
    estimate.filter(has_text="Estimate: $").wait_for()
    assert page.locator("#submit").is_enabled()
    page.fill("#n-epochs", "many")  # a bad value: the form says which field, and will not submit
    page.locator("#estimate .error", has_text="n_epochs").wait_for()
    assert page.locator("#submit").is_disabled()
    page.fill("#n-epochs", "")
    estimate.filter(has_text="Estimate: $").wait_for()
    page.fill("#nodes", "2")  # this server runs a step on one machine: the estimate names the field
    page.locator("#estimate .error", has_text="nodes").wait_for()
    assert page.locator("#submit").is_disabled()
    page.fill("#nodes", "")
    estimate.filter(has_text="Estimate: $").wait_for()
    page.click("#submit")
    page.wait_for_url("**/ui/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]
    chart = page.locator(".curves-step[data-step='1'] .chart[data-metric='loss']")
    chart.wait_for(timeout=120_000)  # the job's first points arrive over its live event stream
    first = int(chart.get_attribute("data-points"))
    deadline = time.monotonic() + 60  # (polled from here: the page's CSP forbids wait_for_function's eval)
    while page.evaluate("() => window.__curves.points(1, 'loss')") < first + 5:
        assert time.monotonic() < deadline, (
            f"the loss curve stayed at {chart.get_attribute('data-points')} points"
        )
        time.sleep(0.5)
    page.locator("#phase", has_text="training step").wait_for()  # what it does now, with its time so far
    page.screenshot(path=str(ARTIFACTS / "live-curve.png"), full_page=True)
    page.click("#job-head button[data-action='cancel']")
    page.locator("#job-head [data-status='cancelled']").wait_for(timeout=60_000)
    job = wait_for(e2e_client, job_id, ("cancelled",), timeout=60)
    assert (
        job["model"] == "tiny-opt-xs"
        and job["method"]["type"] == "supervised"
        and job["training_file"] == file_id
    )


def test_chat_streams_a_reply_with_its_reward(
    page: Any, e2e_stack: Stack, key: str, e2e_finished: dict[str, Any], inference: Workers
) -> None:
    model = e2e_finished["job"]["fine_tuned_model"]
    sign_in(page, e2e_stack.url, key)
    page.click("nav a[href='#/chat']")
    page.select_option("#chat-model", model)
    page.fill("#max-tokens", "48")
    # count the reply's updates as they land: a streamed reply grows in several pieces
    page.evaluate("""() => { window.__updates = 0; new MutationObserver(() => window.__updates++)
        .observe(document.getElementById('chat-log'),
                 {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#chat-input", PROMPT)
    page.click("#send")
    reply = page.locator("#chat-log .msg.assistant[data-done='1']")
    reply.wait_for(timeout=120_000)
    assert reply.inner_text().strip(), "an empty reply"
    assert page.evaluate("window.__updates") >= 4  # user turn, the reply's box, then several pieces
    meta = page.locator("#chat-log small").last.inner_text()
    assert model in meta and "reward" in meta, meta


def test_side_by_side_shows_sft_rlhf_and_ema_replies_each_scored(
    page: Any,
    e2e_stack: Stack,
    key: str,
    e2e_client: httpx.Client,
    e2e_finished: dict[str, Any],
    inference: Workers,
) -> None:
    job = e2e_finished["job"]
    main = job["fine_tuned_model"]
    sign_in(page, e2e_stack.url, key)
    page.click("nav a[href='#/compare']")
    page.select_option("#compare-job", job["id"])
    columns = page.locator("#compare-columns .column")
    assert [columns.nth(i).get_attribute("data-model") for i in range(3)] == [
        f"{main}:sft",
        main,
        f"{main}:ema",
    ]
    page.fill("#compare-prompt", PROMPT)
    page.click("#compare-send")
    expect(page.locator("#compare-columns .column[data-done='1']")).to_have_count(3, timeout=180_000)
    for i in range(3):  # each reply is the model's greedy answer, scored by the job's reward model
        col = columns.nth(i)
        want = e2e_client.post(
            "/v1/chat/completions",
            json={
                "model": col.get_attribute("data-model"),
                "temperature": 0,
                "max_tokens": 64,
                "messages": [{"role": "user", "content": PROMPT}],
            },
        ).json()
        assert col.locator(".reply").inner_text().strip() == want["choices"][0]["message"]["content"].strip()
        assert abs(float(col.get_attribute("data-reward")) - want["choices"][0]["reward"]) < 1e-3
    page.screenshot(path=str(ARTIFACTS / "side-by-side.png"), full_page=True)


def test_a_key_revoked_mid_session_returns_to_sign_in(page: Any, e2e_stack: Stack) -> None:
    from service.db.session import session_scope
    from service.services.keys import create_key, revoke_key

    with session_scope(e2e_stack.settings.db_url) as s:
        row, secret = create_key(session=s, tenant="e2e")
        key_id = row.id
    sign_in(page, e2e_stack.url, secret)
    with session_scope(e2e_stack.settings.db_url) as s:
        revoke_key(session=s, key_id=key_id)  # (the API server is in this process: its cache forgets the key)
    message = page.locator("#sign-in-message")  # the jobs list refreshes every 3 s, and hears the 401
    message.filter(has_text="Signed out").wait_for(timeout=20_000)
    assert page.evaluate("sessionStorage.length") == 0
    assert "Traceback" not in page.content()
