"""The plugin behind vLLM's OpenAI-compatible server, called by the ``openai`` client: a chat completion with a
base64 PNG image returns the tokens and logprobs ``LLM.chat`` gives for the same messages, which equal vtexit's
transformers path (DivPrune), and ``usage.prompt_tokens`` counts the kept visual tokens, not the tower's.

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the CPU build
fails at start-up looking up the metadata of ``vllm``) in a process group of its own, on 127.0.0.1 only; the fixture
kills the group."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from _tiny_vllm import (  # noqa: E402
    ARCH,
    ATOL,
    LOGPROBS,
    TOKENS,
    Request,
    allowed_ids,
    compare,
    images,
    make_llm,
    reference,
    sampling,
    save_tiny_llava,
)

from vtexit.integrations.vllm.reduction import ImageReduction  # noqa: E402

METHOD = {"method": "divprune", "keep": 0.5}  # 8 of the tiny tower's 16 tokens
HOST = "127.0.0.1"
START_TIMEOUT = 180  # seconds for the server to answer /health


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(folder, port: int, log) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        "tiny-llava",
        "--host",
        HOST,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "2",
        "--max-num-batched-tokens",
        "256",
        "--limit-mm-per-prompt",
        json.dumps({"image": 1}),
        "--hf-overrides",
        json.dumps({"architectures": [ARCH], "vtexit": METHOD}),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(process: subprocess.Popen, url: str, log_path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the vLLM server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"the vLLM server did not answer /health in {START_TIMEOUT} s:\n{log_path.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Terminate the server's process group (the API server and its engine core), then kill what is left."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llava_server")
    case = save_tiny_llava(folder)  # the processor it saves carries the chat template (chat_template.jinja)
    assert (folder / "chat_template.jinja").exists()
    port = free_port()
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        process = start_server(folder, port, log)
    try:
        llm = make_llm(folder, METHOD, images_per_prompt=1)  # the offline reference, built while the server starts
        url = f"http://{HOST}:{port}"
        wait_healthy(process, url, log_path)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        yield case, llm, client
        del llm
    finally:
        stop(process)


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_completion_matches_llm_chat_and_transformers(served):
    case, llm, client = served
    request = Request(images(1, seed=5))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(request.images[0])}},
                {"type": "text", "text": request.question},
            ],
        }
    ]
    response = client.chat.completions.create(
        model="tiny-llava",
        messages=messages,
        temperature=0,
        max_tokens=TOKENS,
        logprobs=True,
        top_logprobs=LOGPROBS,
        extra_body={
            "allowed_token_ids": allowed_ids(case),
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,  # vLLM's extra fields: the prompt's token ids ...
            "return_prompt_text": True,  # ... and the text its chat template rendered
        },
    )
    choice = response.choices[0]
    extra = response.model_extra
    assert extra["prompt_text"] == request.prompt  # the template renders the prompt the offline tests use
    served_tokens = [int(step.token.removeprefix("token_id:")) for step in choice.logprobs.content]

    # The offline engine with the same messages (vLLM applies the same chat template) ...
    offline = llm.chat(messages, sampling(case), use_tqdm=False)[0]
    assert served_tokens == list(offline.outputs[0].token_ids)
    assert response.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert response.usage.completion_tokens == len(served_tokens)
    worst = 0.0
    steps = zip(choice.logprobs.content, offline.outputs[0].logprobs, strict=True)
    for step, (served_step, offline_step) in enumerate(steps):
        for top in served_step.top_logprobs:
            token = int(top.token.removeprefix("token_id:"))
            diff = abs(top.logprob - offline_step[token].logprob)
            worst = max(worst, diff)
            assert diff <= ATOL, f"step {step}, token {token}: server {top.logprob}, LLM.chat {offline_step[token]}"

    # ... and both equal vtexit's DivPrune on transformers, for the prompt text the template makes.
    kept = ImageReduction.from_setting(METHOD).count(16)
    ref = reference(case, METHOD, request, kept)
    compare(offline, ref)
    assert served_tokens == ref.tokens
    assert extra["prompt_token_ids"] == ref.prompt_ids  # each image's run of placeholders: the kept count
    # The prompt the language model ran: the text tokens and each image's 8 kept tokens, not the tower's 16.
    full = len(reference(case, None, request, None).prompt_ids)
    assert response.usage.prompt_tokens == len(ref.prompt_ids) == full - 16 + kept
    print(f"server: prompt_tokens {response.usage.prompt_tokens}, largest logprob difference vs LLM.chat {worst:.2e}")


def test_text_only_chat_runs_unchanged(served):
    case, llm, client = served
    messages = [{"role": "user", "content": "what color is a circle ?"}]
    response = client.chat.completions.create(
        model="tiny-llava",
        messages=messages,
        temperature=0,
        max_tokens=TOKENS,
        logprobs=True,
        extra_body={"allowed_token_ids": allowed_ids(case), "return_tokens_as_token_ids": True},
    )
    offline = llm.chat(messages, sampling(case), use_tqdm=False)[0]
    served_tokens = [int(step.token.removeprefix("token_id:")) for step in response.choices[0].logprobs.content]
    assert served_tokens == list(offline.outputs[0].token_ids)
    assert response.usage.prompt_tokens == len(offline.prompt_token_ids)
