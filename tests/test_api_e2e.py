"""The API in front of real server processes, driven by OpenAI's own client, httpx and a real browser.

A tiny random llama with SmolLM2's tokenizer and chat template serves text at a tiny model's
speed; the last tests kill a server (the page must show it, and requests get a 503 naming the
missing blocks), so they run last. SmolLM2 itself answers through a coordinator at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from blockswarm.model.tiny import tiny_chat_model

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("BLOCKSWARM_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smollm2_dir):
    return tiny_chat_model(tmp_path_factory.mktemp("api") / "chat", smollm2_dir)


@pytest.fixture(scope="module")
def swarm(chat_model):
    from blockswarm.runtime.launcher import server_processes

    with server_processes(str(chat_model), [(0, 2), (2, 4)], ["--threads", "1"]) as servers:
        yield servers


@pytest.fixture(scope="module")
def api(swarm, chat_model):
    from blockswarm.api.serving import APIConfig, APIServer

    with APIServer(APIConfig(servers=list(swarm), model=str(chat_model), port=0)).start() as server:
        yield server


@pytest.fixture(scope="module")
def python_api(swarm, chat_model):
    from blockswarm.runtime.client import DistributedModel

    with DistributedModel.from_servers(list(swarm), model=str(chat_model)) as model:
        yield model


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)


def python_text(model, prompt_ids, max_tokens, temperature=0.0, seed=None) -> tuple[str, int]:
    from blockswarm.model.sampling import SamplingParams

    result = model.generate(prompt_ids, max_new_tokens=max_tokens, sampling=SamplingParams(temperature, 1.0, seed))
    return result.text, len(result.token_ids)


def sessions_on(addresses) -> dict[str, int]:
    from blockswarm.runtime.connection import client_context, fetch_info

    context = client_context()
    try:
        return {a: fetch_info(context, a, 5.0).sessions for a in addresses}
    finally:
        context.destroy(linger=0)


def test_openai_client_gets_what_the_python_api_generates(client, python_api, api):
    """Chat and completions, streaming and not, greedy and seeded: the text is the Python API's
    for the same prompt, and usage counts the prompt's and the answer's tokens."""
    head = python_api.head
    chat_ids = head.encode_chat(HELLO)
    expected, generated = python_text(python_api, chat_ids, 12)
    answer = client.chat.completions.create(model="chat", messages=HELLO, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(chat_ids), generated)
    stream = client.chat.completions.create(model="chat", messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == generated and chunks[-2].choices[0].finish_reason == "length"

    prompt = "The history of the bee begins"
    ids = head.encode(prompt, chat_template=False)
    for temperature, seed in ((0.0, None), (0.9, 1234)):
        expected, generated = python_text(python_api, ids, 16, temperature, seed)
        done = client.completions.create(model="chat", prompt=prompt, max_tokens=16, temperature=temperature, seed=seed)
        assert done.choices[0].text == expected and done.usage.prompt_tokens == len(ids)
        streamed = client.completions.create(model="chat", prompt=prompt, max_tokens=16, temperature=temperature,
                                             seed=seed, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected
    tokens = client.completions.create(model="chat", prompt=ids, max_tokens=16, temperature=0)
    assert tokens.choices[0].text == python_text(python_api, ids, 16)[0]
    assert [m.id for m in client.models.list().data] == ["chat"]


def test_a_heavy_head_picks_tokens_off_the_event_loop(python_api, monkeypatch):
    """On an event loop (where the API runs generations) a head above `offload_head_macs` picks
    tokens in a thread, so it holds no other stream up, and a small one on the loop; the tokens
    are the same either way, and the same as in a plain thread."""
    import asyncio
    import threading

    from blockswarm.runtime import cooperative

    ids = python_api.head.encode_chat(HELLO)
    expected = [streamed.token for streamed in python_api.stream(ids, 8)]
    where, logits = [], python_api.head.logits

    def recorded(hidden):  # (the real head, noting which thread ran it)
        where.append(threading.get_ident())
        return logits(hidden)

    monkeypatch.setattr(python_api.head, "logits", recorded)

    async def on_a_loop():
        return await cooperative.start(lambda: [streamed.token for streamed in python_api.stream(ids, 8)])

    here = threading.get_ident()  # (asyncio.run runs its loop in this thread)
    assert asyncio.run(on_a_loop()) == expected and set(where) == {here}
    where.clear()
    monkeypatch.setattr(python_api, "offload_head_macs", 0)
    assert asyncio.run(on_a_loop()) == expected and where and here not in where


def test_n_choices_are_independent_and_reproducible(client):
    def ask():
        return client.completions.create(model="chat", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=99, n=3)

    first, again = ask(), ask()
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3, texts  # each choice its own seed
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]  # derived seeds repeat
    one = client.completions.create(model="chat", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=99)
    assert one.choices[0].text == texts[0]
    assert first.usage.completion_tokens == 3 * 12
    stream = client.chat.completions.create(model="chat", messages=HELLO, max_tokens=6, temperature=1.0, seed=5, n=2,
                                            stream=True)
    got = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            got[choice.index] += choice.delta.content or ""
    assert got[0] and got[1] and got[0] != got[1]


def test_stop_strings_end_the_answer_before_them(client, python_api):
    ids = python_api.head.encode("The history of the bee begins", chat_template=False)
    full, _ = python_text(python_api, ids, 24)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    done = client.completions.create(model="chat", prompt=ids, max_tokens=24, temperature=0, stop=[stop, "\u2603"])
    assert done.choices[0].text == cut and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens < 24
    streamed = list(client.completions.create(model="chat", prompt=ids, max_tokens=24, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_every_error_is_its_status_in_openai_shape(api, chat_model, swarm):
    from blockswarm.api.serving import APIConfig, APIServer

    url = f"{api.url}/v1"

    def post(path, body):
        return httpx.post(url + path, content=body if isinstance(body, bytes) else json.dumps(body), timeout=30)

    ok = {"model": "chat", "messages": HELLO, "max_tokens": 4}
    assert post("/chat/completions", b'{"model": "chat", "messages": [').status_code == 400
    bad = post("/chat/completions", {**ok, "temperature": -1})
    assert bad.status_code == 400 and error_of(bad)["param"] == "temperature"
    bad = post("/completions", {"model": "chat", "prompt": [1, 10**9]})
    assert bad.status_code == 400 and error_of(bad)["param"] == "prompt"
    missing = post("/chat/completions", {**ok, "model": "gpt-4"})
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"
    assert httpx.get(f"{url}/models/gpt-4").status_code == 404 and httpx.get(f"{url}/models/chat").status_code == 200
    too_long = post("/completions", {"model": "chat", "prompt": "bee " * 600, "max_tokens": 4})
    assert too_long.status_code == 400 and error_of(too_long)["code"] == "context_length_exceeded"
    too_many = post("/completions", {"model": "chat", "prompt": "bee", "max_tokens": 600})
    assert too_many.status_code == 400 and error_of(too_many)["param"] == "max_tokens"
    huge = post("/chat/completions", {**ok, "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert huge.status_code == 413 and error_of(huge)["code"] == "request_too_large"
    assert error_of(httpx.get(f"{api.url}/v2/nothing"))["code"] == "not_found"
    wrong_method = httpx.get(f"{url}/chat/completions")  # (the generation routes take POSTs only)
    assert wrong_method.status_code == 405 and error_of(wrong_method)["code"] == "method_not_allowed"

    # one generation at a time and no queue: a second request while one runs is a 429 with Retry-After
    keys = {"sk-test-1"}
    with APIServer(APIConfig(servers=list(swarm), model=str(chat_model), port=0, slots=1, queue=0,
                             api_keys=keys, body_timeout_s=0.5)).start() as narrow:
        auth = {"Authorization": "Bearer sk-test-1"}
        host, port = narrow.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as trickle:  # promises 100 bytes, sends 1
            trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-1\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            assert trickle.recv(4096).startswith(b"HTTP/1.1 408")
        refused = httpx.post(f"{narrow.url}/v1/chat/completions", json=ok)
        assert refused.status_code == 401 and error_of(refused)["code"] == "invalid_api_key"
        assert httpx.get(f"{narrow.url}/api/swarm").status_code == 401
        with httpx.stream("POST", f"{narrow.url}/v1/completions", headers=auth, timeout=30,
                          json={"model": "chat", "prompt": "bee", "max_tokens": 400, "stream": True}) as running:
            lines = running.iter_lines()  # (kept: httpx closes the response when its iterator is collected)
            next(lines)
            busy = httpx.post(f"{narrow.url}/v1/chat/completions", json=ok, headers=auth)
            assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
            assert error_of(busy)["type"] == "rate_limit_error"
        # the stream's client went away: its slot comes back once the generation stops at its next
        # token and closes its sessions (a few ms), with no queue a request before then is a 429
        deadline = time.monotonic() + 5
        while (status := httpx.post(f"{narrow.url}/v1/chat/completions", json=ok, headers=auth,
                                    timeout=30).status_code) == 429 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200


def test_bounded_load_loses_and_duplicates_nothing(api, python_api, swarm):
    """64 requests, 16 at a time: each answer is the one its own prompt and seed give."""
    head = python_api.head
    prompts = [f"Request number {i} asks about" for i in range(64)]
    expected = [python_text(python_api, head.encode(p, chat_template=False), 8, 1.0, seed=i)[0]
                for i, p in enumerate(prompts)]

    def ask(i):
        begin = time.perf_counter()
        response = httpx.post(f"{api.url}/v1/completions", timeout=120, json={
            "model": "chat", "prompt": prompts[i], "max_tokens": 8, "temperature": 1.0, "seed": i})
        assert response.status_code == 200, response.text
        return response.json(), time.perf_counter() - begin

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(64)))
    ids = [body["id"] for body, _ in results]
    assert len(set(ids)) == 64
    assert [body["choices"][0]["text"] for body, _ in results] == expected
    latencies = sorted(seconds for _, seconds in results)
    print(f"64 requests, 16 at a time: latency p50 {statistics.median(latencies) * 1e3:.0f} ms, "
          f"p90 {latencies[57] * 1e3:.0f} ms, max {latencies[-1] * 1e3:.0f} ms")
    time.sleep(0.2)
    assert set(sessions_on(swarm).values()) == {0}  # every session closed


def test_a_stream_sends_each_token_as_it_is_made(api):
    """A lone generation may spin through its waits, holding the event loop; its text must still
    leave token by token. (It did not: the chunks came in bursts microseconds apart, after pauses
    of up to half a second in which the client's going away went unheard as well.)"""
    arrivals = []
    with httpx.stream("POST", f"{api.url}/v1/completions", timeout=30, json={
            "model": "chat", "prompt": "bee", "max_tokens": 200, "temperature": 0, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    assert len(arrivals) > 100
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    mean_gap = (arrivals[-1] - arrivals[0]) / len(gaps)
    assert gaps[len(gaps) // 2] > 0.2 * mean_gap, f"in bursts: median gap {gaps[len(gaps) // 2] * 1e3:.3f} ms, " \
                                                  f"mean {mean_gap * 1e3:.3f} ms, longest {gaps[-1] * 1e3:.0f} ms"


def test_a_client_gone_mid_answer_frees_its_sessions(api, swarm):
    before = api.engine.finished["cancelled"]
    with httpx.stream("POST", f"{api.url}/v1/completions", timeout=30, json={
            "model": "chat", "prompt": "bee", "max_tokens": 480, "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert set(sessions_on(swarm).values()) == {1}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and set(sessions_on(swarm).values()) != {0}:
        time.sleep(0.05)
    assert set(sessions_on(swarm).values()) == {0}
    assert api.engine.finished["cancelled"] == before + 1  # stopped early, not run to its 480 tokens

    # a non-streaming request whose client gives up (as an SDK's timeout does) stops as well
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{api.url}/v1/completions", timeout=0.5, json={"model": "chat", "prompt": "bee",
                                                                   "max_tokens": 480})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and api.engine.finished["cancelled"] != before + 2:
        time.sleep(0.05)
    assert api.engine.finished["cancelled"] == before + 2, dict(api.engine.finished)
    assert set(sessions_on(swarm).values()) == {0}


def test_api_command_serves_as_the_acceptance_commands_use_it(swarm, chat_model):
    """`blockswarm api --servers ... --port P` as a process: models, a streamed chat, and Ctrl-C."""
    from blockswarm.runtime.launcher import start, wait_ready

    process = start([sys.executable, "-m", "blockswarm", "api", "--servers", ",".join(swarm), "--model",
                     str(chat_model), "--port", "0"], stderr=subprocess.PIPE)
    try:
        address = wait_ready(process, 60)
        client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=0)
        assert client.models.list().data[0].id == "chat"
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="chat", messages=HELLO, max_tokens=5, stream=True))
        assert text
        assert "<title>blockswarm" in httpx.get(f"http://{address}/").text
        process.send_signal(2)
        assert process.wait(15) in (0, 130)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def chromium_driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "the swarm page test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def bars(driver) -> dict[str, tuple[str, str]]:
    return {address: (state, text) for address, state, text in driver.execute_script(
        "return Array.from(document.querySelectorAll('#bars .bar')).map(b => [b.dataset.address, b.dataset.state, "
        "b.textContent])")}


def test_swarm_page_shows_every_server_chats_and_shows_a_killed_one_going(api, swarm, client, python_api):
    """In headless Chromium: every server's bar with its span; the chat box streams the answer the
    Python API gives; a killed server's bar turns `gone` within seconds, the strip shows its blocks
    uncovered, and requests get a 503 naming them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    spans = {address: f"{a}:{b}" for address, (a, b) in zip(swarm, [(0, 2), (2, 4)])}
    driver = chromium_driver()
    try:
        driver.get(api.url + "/")
        WebDriverWait(driver, 15).until(lambda d: {a: s for a, (s, _) in bars(d).items()}
                                        == {a: "serving" for a in swarm})
        for address, (_, text) in bars(driver).items():
            assert spans[address] in text
        driver.find_element(By.ID, "max").clear()
        driver.find_element(By.ID, "max").send_keys("16")
        driver.find_element(By.ID, "prompt").send_keys(HELLO[0]["content"])
        driver.find_element(By.ID, "send").click()  # greedy (the box's default temperature is 0)
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .msg")) == 2
                                        and d.find_element(By.ID, "send").is_enabled())
        shown = driver.execute_script("return document.querySelectorAll('#log .msg span')[1].textContent")
        assert shown == python_text(python_api, python_api.head.encode_chat(HELLO), 16)[0]
        driver.save_screenshot(str(ARTIFACTS / "swarm-page.png"))
        victim = list(swarm)[1]
        swarm[victim].kill()
        swarm[victim].wait()
        killed = time.monotonic()
        WebDriverWait(driver, 10).until(lambda d: bars(d)[victim][0] == "gone")
        print(f"the page showed {victim} gone {time.monotonic() - killed:.1f} s after the kill")
        assert bars(driver)[list(swarm)[0]][0] == "serving"
        WebDriverWait(driver, 5).until(lambda d: d.execute_script(
            "return document.querySelectorAll('#strip .block.c0').length") == 2)
        driver.save_screenshot(str(ARTIFACTS / "swarm-page-server-killed.png"))
    finally:
        driver.quit()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="chat", messages=HELLO, max_tokens=4)
    assert caught.value.status_code == 503 and caught.value.response.headers["Retry-After"]
    error = caught.value.body
    assert error["code"] == "swarm_incomplete" and "2..3" in error["missing_blocks"]


def test_api_over_a_coordinator_answers_with_smollm2(smollm2_coordinated):
    """Each request its own route from the coordinator; the page's data is the coordinator's."""
    from blockswarm.api.serving import APIConfig, APIServer
    from blockswarm.model.checkpoint import SMOLLM2

    address, servers = smollm2_coordinated
    with APIServer(APIConfig(coordinator=address, model=SMOLLM2, port=0)).start() as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        seen_routes = []
        for _ in client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=24, stream=True):
            seen_routes.extend(httpx.get(f"{server.url}/api/swarm").json()["routes"])
        assert any(route["by"] == "api" and route["hops"][0]["start"] == 0 for route in seen_routes)
        swarm = httpx.get(f"{server.url}/api/swarm").json()
        assert swarm["source"] == "coordinator" and swarm["missing"] is None
        assert {s["address"] for s in swarm["servers"]} == set(servers)
        assert all(s["state"] == "serving" and s["device"] == "cpu" for s in swarm["servers"])
