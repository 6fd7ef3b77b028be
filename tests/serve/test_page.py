"""The chat page in a real browser: Debian's chromium, headless, driven by playwright.

Without chromium the test is skipped, unless ``DOGE_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which
installs chromium) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from .conftest import API_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def page():
    if CHROMIUM is None:
        if os.environ.get("DOGE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_the_page_streams_a_reply_with_its_thinking_collapsed(page, r1_served, tmp_path):
    requests = []
    page.on("request", lambda r: requests.append((r.url, r.post_data)))
    page.goto(r1_served.url + "/")
    assert "doge-r1" not in page.content()  # nothing about the model before the key
    assert page.is_visible("#api-key")  # this server needs a key
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")  # the key, once entered, opens /v1/models: the model's name shows
    page.wait_for_function("document.querySelector('#model').textContent === 'doge-r1'", timeout=60_000)
    page.fill("#system", "Answer briefly.")
    page.fill("#input", "What is 2+2?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('.msg.assistant .body')?.textContent === '4'", timeout=60_000)
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=60_000)
    thinking = page.locator(".msg.assistant details.thinking")
    assert thinking.count() == 1
    assert thinking.get_attribute("open") is None  # collapsed
    assert thinking.locator("div").text_content() == "the" and thinking.locator("div").is_hidden()
    thinking.locator("summary").click()  # opening it shows the thinking
    assert thinking.locator("div").is_visible()
    assert page.inner_text(".msg.user .body") == "What is 2+2?"
    assert page.locator(".msg.error").count() == 0
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 1000
    assert all(url.startswith(r1_served.url) for url, _ in requests)  # no external assets
    sent = [json.loads(data) for url, data in requests if url.endswith("/v1/chat/completions")]
    assert sent[0]["stream"] is True and sent[0]["model"] == "doge-r1"
    assert sent[0]["messages"] == [{"role": "system", "content": "Answer briefly."},
                                   {"role": "user", "content": "What is 2+2?"}]

    # a second turn goes out with the history, then "New chat" clears it
    page.fill("#input", "And 3+3?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                           "!document.querySelector('#send').disabled", timeout=60_000)
    assert page.locator(".msg.assistant .body").nth(1).inner_text() == "4"
    second = [json.loads(data) for url, data in requests if url.endswith("/v1/chat/completions")][1]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    page.click("#new")
    assert page.locator(".msg").count() == 0


def test_a_wrong_key_shows_the_servers_error(page, r1_served):
    page.goto(r1_served.url + "/")
    page.fill("#api-key", "wrong")
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error", timeout=60_000)
    assert "Incorrect API key" in page.inner_text(".msg.error .body")


@pytest.fixture(scope="module")
def markup_served(tmp_path_factory):
    """A model whose every reply is the markup ``<b>hi`` (then end of turn)."""
    from tests.chat.toymodel import chain_of, make_chat_tokenizer, save_forced_model, single_token

    from .conftest import start_server, stop_server

    root = tmp_path_factory.mktemp("serve-markup")
    tok = make_chat_tokenizer(root / "tokenizer")
    header = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    last = tok(header, add_special_tokens=False)["input_ids"][-1]
    chain = chain_of([last, *(single_token(tok, c) for c in "<b>hi")])
    server = start_server(save_forced_model(root / "model", tok, chain), root / "server.log", "--served-name", "m")
    yield server
    stop_server(server)


def test_markup_in_a_reply_is_shown_as_text_not_rendered(page, markup_served):
    page.goto(markup_served.url + "/")
    page.fill("#input", "Say something bold.")
    page.press("#input", "Enter")
    page.wait_for_function("!document.querySelector('#send').disabled && "
                           "document.querySelector('.msg.assistant .body')?.textContent", timeout=60_000)
    body = page.locator(".msg.assistant .body")
    assert body.text_content() == "<b>hi"
    assert body.locator("b").count() == 0  # no element was made of the reply
    assert page.locator(".msg.error").count() == 0
