"""Prompt rewriting: the instructions of each mode, the lint rules and the answer cleaning on worked examples, a
tiny random chat model through transformers, a real local HTTP server speaking the OpenAI chat API, and the
`generate --rewrite` flags."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from hunyuan_i2v.cli import bundled_model_dir, main
from hunyuan_i2v.errors import InputError
from hunyuan_i2v.rewrite import (
    ENV_API_MODEL, ENV_KEY, ENV_MODEL_PATH, ENV_URL, MODES, OpenAIBackend, RewriteError, Rewritten,
    TransformersBackend, backend_from_options, build_messages, chat_completions_url, clean_answer, lint_prompt,
    rewrite_prompt,
)

FINE = "The woman turns her head and smiles while her hair sways; the camera slowly pushes in."
LONG = ("A young woman with long curly red hair, wearing a green wool coat and a silver necklace, stands on an old "
        "stone bridge over a quiet river in a small European town at dusk, with warm street lamps, ivy on the "
        "walls, a bakery with a striped awning, pigeons on the railing, a cyclist in the distance, soft pink clouds "
        "and she turns to smile")  # 65 words (wc -w)


@pytest.fixture(autouse=True)
def _no_rewrite_env(monkeypatch):
    for name in (ENV_MODEL_PATH, ENV_URL, ENV_API_MODEL, ENV_KEY):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------
# instructions


def test_each_mode_has_its_own_instructions_and_keeps_the_prompt():
    prompt = "  一只猫跳上桌子  "
    systems = {}
    for mode in MODES:
        messages = build_messages(prompt, mode)
        assert [m["role"] for m in messages] == ["system", "user"]
        assert messages[1]["content"] == prompt.strip()
        systems[mode] = messages[0]["content"]
        assert "Chinese" in systems[mode] and "English" in systems[mode], mode
        assert "nothing else" in systems[mode], mode  # the answer is the prompt alone
    assert len(set(systems.values())) == 3
    assert "Keep every fact" in systems["normal"] and "Add nothing" in systems["normal"]
    assert "lighting" in systems["master"] and "composition" in systems["master"]
    assert "lighting" not in systems["normal"]
    assert "already given" in systems["i2v"] and "no scene changes, cuts" in systems["i2v"]
    assert "camera" in systems["i2v"] and "40 words" in systems["i2v"]


def test_unknown_modes_are_refused():
    with pytest.raises(RewriteError, match="normal, master, i2v"):
        build_messages("a cat jumps", "fancy")
    with pytest.raises(RewriteError, match="lint"):
        rewrite_prompt("a cat jumps", "fancy", None)
    assert issubclass(RewriteError, InputError)  # the CLI's one-line error, exit 2


# ---------------------------------------------------------------------------------------------
# lint


@pytest.mark.parametrize("prompt", [
    FINE,
    "the camera pans left",
    "A dog barking at the mailman",
    "Two children run across the beach as waves roll in.",
])
def test_good_prompts_give_no_warnings(prompt):
    assert lint_prompt(prompt) == []


@pytest.mark.parametrize("prompt, needles", [
    ("", ["prompt is empty"]),
    (LONG, ["prompt is long (65 words)", "77 tokens"]),
    (" ".join([LONG] * 3), ["very long (195 words)", "256 tokens"]),
    ("A man walks to the door, then cut to a beach at sunset", ["scene change", "'then', 'cut to'"]),
    ("She dances. Suddenly the scene transitions to night", ["'suddenly the scene', 'transitions to'"]),
    ("a red car parked on a quiet street", ["no action or motion"]),
    ("A photo of a dog running in the park", ["describes the picture ('a photo of')"]),
    ("一只猫跳上桌子", ["Chinese", "will be translated by rewriting"]),
])
def test_lint_worked_examples(prompt, needles):
    warnings = lint_prompt(prompt)
    assert len(warnings) == 1, warnings
    for needle in needles:
        assert needle in warnings[0]
    assert "\n" not in warnings[0]


def test_lint_reports_several_problems_and_words_chinese_after_a_rewrite():
    warnings = lint_prompt("a still lake at dawn, then the scene changes to a city")
    assert len(warnings) == 2
    assert "'then', 'the scene changes'" in warnings[0] and "no action" in warnings[1]
    assert "still contains Chinese" in lint_prompt("猫跳", rewritten=True)[0]


def test_lint_mode_leaves_the_prompt_alone_without_a_backend():
    prompt = "A man walks to the door, then cut to a beach"
    result = rewrite_prompt(prompt, "lint", None)
    assert result == Rewritten(prompt, prompt, "lint", None, tuple(lint_prompt(prompt)))
    assert len(result.warnings) == 1


def test_without_a_backend_the_error_says_how_to_configure_one():
    with pytest.raises(RewriteError) as info:
        rewrite_prompt("a cat jumps", "i2v", None)
    message = str(info.value)
    for needle in ("--rewrite-model", "--rewrite-url", ENV_MODEL_PATH, ENV_URL, "--rewrite lint"):
        assert needle in message
    with pytest.raises(RewriteError, match="empty"):
        rewrite_prompt("   ", "normal", OpenAIBackend("http://127.0.0.1:9", "m"))


# ---------------------------------------------------------------------------------------------
# cleaning the answer


@pytest.mark.parametrize("raw, clean", [
    ("  A cat jumps onto the table.\n", "A cat jumps onto the table."),
    ('"A cat jumps."', "A cat jumps."),
    ("“A cat jumps.”", "A cat jumps."),
    ("Rewritten prompt: A cat jumps.", "A cat jumps."),
    ('**Rewritten Prompt:** "A cat jumps."', "A cat jumps."),
    ('"Prompt: A cat jumps."', "A cat jumps."),
    ("<think>The user wants motion.\nOK.</think>\n\nA cat jumps.", "A cat jumps."),
    ("the template opened the reasoning</think>A cat jumps.", "A cat jumps."),
    ("<think>reasoning that ran out of tokens", ""),
    ("Here is a more cinematic version:\n\nA cat jumps\n\nonto the table.", "A cat jumps onto the table."),
    ("```\nA cat jumps.\n```", "A cat jumps."),
    ("The cat's owner says: hello", "The cat's owner says: hello"),  # a colon inside the prompt stays
])
def test_clean_answer_worked_examples(raw, clean):
    assert clean_answer(raw) == clean


# ---------------------------------------------------------------------------------------------
# a local chat model (tiny, random weights, the real Llama-3 tokenizer)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _save_chat_model(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    import transformers

    from tiny_components import llama_tokenizer_file

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(llama_tokenizer_file()),
                                               bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    if chat_template:
        tok.chat_template = chat_template
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,  # tied random weights only repeat the last token
        initializer_range=0.2,  # at the default 0.02 the answer hardly depends on the prompt
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return _save_chat_model(tmp_path_factory.mktemp("chat_model"))


def test_transformers_backend_returns_only_the_new_text_deterministically(chat_model):
    import transformers

    messages = build_messages("a cat jumps onto the table", "i2v")
    backend = TransformersBackend(chat_model, max_new_tokens=8)
    assert backend._model is None  # nothing loads before the first completion
    answer = backend.complete(messages)
    assert isinstance(answer, str) and answer.strip()
    assert backend.complete(messages) == answer
    assert TransformersBackend(chat_model, max_new_tokens=8).complete(messages) == answer  # a fresh load, too
    assert backend.complete(build_messages("a cat jumps onto the table", "master")) != answer  # it reads the messages

    # the same greedy generation done by hand: the answer is exactly the 8 new tokens
    tok = transformers.AutoTokenizer.from_pretrained(chat_model, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(chat_model, local_files_only=True).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(ids["input_ids"][0]).endswith("assistant<|end_header_id|>\n\n")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    assert answer == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "image-to-video" not in answer  # not the echoed instructions

    backend.close()
    assert backend._model is None


def test_rewrite_prompt_with_the_local_model(chat_model):
    backend = TransformersBackend(chat_model, max_new_tokens=8)
    result = rewrite_prompt("a cat jumps onto the table", "normal", backend)
    assert isinstance(result, Rewritten)
    assert result.original == "a cat jumps onto the table" and result.mode == "normal"
    assert result.backend == backend.name == f"transformers:{chat_model.name}"
    assert result.prompt == clean_answer(backend.complete(build_messages(result.original, "normal")))
    assert result.prompt and result.warnings == tuple(lint_prompt(result.prompt, rewritten=True))


def test_unusable_model_folders(chat_model, tmp_path):
    with pytest.raises(RewriteError, match="not found"):
        TransformersBackend(tmp_path / "nope")
    plain = shutil.copytree(chat_model, tmp_path / "base-model")
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RewriteError, match="no chat template"):
        TransformersBackend(plain).complete(build_messages("a cat jumps", "normal"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewriteError, match="cannot load a tokenizer"):
        TransformersBackend(tmp_path / "empty").complete(build_messages("a cat jumps", "normal"))


def test_a_template_without_a_system_role_gets_the_instructions_in_the_user_turn(chat_model, tmp_path):
    strict = shutil.copytree(chat_model, tmp_path / "no-system-role")
    (strict / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT_TEMPLATE)
    messages = build_messages("a cat jumps", "master")
    merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
    backend = TransformersBackend(strict, max_new_tokens=6)
    assert backend.complete(messages) == backend.complete(merged)
    assert backend.complete(messages) != TransformersBackend(chat_model, max_new_tokens=6).complete(messages)


# ---------------------------------------------------------------------------------------------
# an OpenAI-compatible server (stdlib http.server on a free port)

KEY = "sekret-key"


class _ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.requests: list[dict] = []
        self.answer = "A cat jumps."
        self.status = 200
        self.raw: bytes | None = None  # a body to send instead of the chat answer
        self.delay = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ChatHandler(BaseHTTPRequestHandler):
    server: _ChatServer

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status: int, payload) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {KEY}":
            return True
        self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                   "code": "invalid_api_key"}})
        return False

    def do_GET(self):
        self.server.requests.append({"method": "GET", "path": self.path})
        if not self._authorised():
            return
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "served-model", "object": "model", "owned_by": "me"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"method": "POST", "path": self.path, "body": body,
                                     "content_type": self.headers.get("Content-Type")})
        time.sleep(self.server.delay)
        if not self._authorised():
            return
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if self.server.status != 200:
            return self._send(self.server.status, {"error": {"message": "model crashed", "type": "server_error"}})
        if self.server.raw is not None:
            return self._send(200, self.server.raw)
        self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.server.answer},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129},
        })


@pytest.fixture
def server():
    srv = _ChatServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_endpoint_rule():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("https://h/api/v3") == "https://h/api/v3/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    assert chat_completions_url("https://h/openai?api-version=1") == "https://h/openai/chat/completions?api-version=1"
    with pytest.raises(RewriteError, match="http://"):
        chat_completions_url("file:///etc/passwd")


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_openai_backend_sends_the_mode_instructions_and_cleans_the_answer(server, suffix):
    server.answer = '<think>Keep it short.</think>\n"Rewritten prompt: The woman turns her head and smiles."'
    backend = OpenAIBackend(server.url + suffix, "qwen2.5-7b-instruct", api_key=KEY)
    result = rewrite_prompt("一个女人转头微笑", "i2v", backend)
    assert result == Rewritten("一个女人转头微笑", "The woman turns her head and smiles.", "i2v",
                               "openai:qwen2.5-7b-instruct", ())
    (request,) = server.requests
    assert request["method"] == "POST" and request["path"] == "/v1/chat/completions"
    assert request["content_type"] == "application/json"
    body = request["body"]
    assert body["model"] == "qwen2.5-7b-instruct" and body["temperature"] == 0
    assert body["messages"] == build_messages("一个女人转头微笑", "i2v")
    assert body["messages"][0]["content"] != build_messages("x", "normal")[0]["content"]


def test_openai_backend_asks_the_server_for_its_model(server):
    backend = OpenAIBackend(server.url, None, api_key=KEY)
    assert backend.complete(build_messages("a cat jumps", "normal")) == "A cat jumps."
    assert [r["path"] for r in server.requests] == ["/v1/models", "/v1/chat/completions"]
    assert server.requests[1]["body"]["model"] == "served-model" and backend.name == "openai:served-model"


def _fails(backend, *needles) -> str:
    with pytest.raises(RewriteError) as info:
        rewrite_prompt("a cat jumps", "normal", backend)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_openai_backend_errors_name_the_url_and_the_remedy(server):
    endpoint = server.url + "/v1/chat/completions"
    message = _fails(OpenAIBackend(server.url, "m", api_key="wrong"), endpoint, "HTTP 401", "--rewrite-key", ENV_KEY)
    assert "wrong" not in message  # the key is never echoed
    _fails(OpenAIBackend(server.url, "m"), "HTTP 401")  # no key at all
    _fails(OpenAIBackend(server.url + "/v2", "m", api_key=KEY), "HTTP 404", "--rewrite-url")
    server.status = 500
    _fails(OpenAIBackend(server.url, "m", api_key=KEY), endpoint, "HTTP 500", "model crashed", "server's log")
    server.status = 200
    server.raw = b"<html>gateway</html>"
    _fails(OpenAIBackend(server.url, "m", api_key=KEY), endpoint, "did not answer with JSON")
    server.raw = json.dumps({"result": "A cat jumps."}).encode()
    _fails(OpenAIBackend(server.url, "m", api_key=KEY), endpoint, "OpenAI chat format")
    server.raw = None
    server.answer = '  ""  '
    _fails(OpenAIBackend(server.url, "m", api_key=KEY), "empty answer", "openai:m")


def test_openai_backend_times_out(server):
    server.delay = 1.0
    start = time.perf_counter()
    _fails(OpenAIBackend(server.url, "m", api_key=KEY, timeout=0.2), server.url, "within 0.2 s")
    assert time.perf_counter() - start < 1.0


def test_unreachable_server_fails_quickly_with_the_url():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    _fails(OpenAIBackend(url, "m", timeout=2.0), f"{url}/v1/chat/completions", "cannot reach", "--rewrite-url")
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------------------------------
# configuration


def test_backend_from_options_and_environment(monkeypatch, chat_model, tmp_path):
    assert backend_from_options() is None
    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:8000/v1")
    monkeypatch.setenv(ENV_API_MODEL, "env-model")
    monkeypatch.setenv(ENV_KEY, "env-key")
    from_env = backend_from_options()
    assert isinstance(from_env, OpenAIBackend)
    assert (from_env.endpoint, from_env.model, from_env.api_key) == (
        "http://127.0.0.1:8000/v1/chat/completions", "env-model", "env-key")
    flags = backend_from_options(url="http://other:1234", api_model="flag-model", api_key="flag-key")
    assert (flags.endpoint, flags.model, flags.api_key) == (
        "http://other:1234/v1/chat/completions", "flag-model", "flag-key")
    local = backend_from_options(model_path=str(chat_model))  # an explicit flag wins over the environment
    assert isinstance(local, TransformersBackend) and local.path == chat_model
    with pytest.raises(RewriteError, match="not both"):
        backend_from_options(model_path=str(chat_model), url="http://h")
    monkeypatch.setenv(ENV_MODEL_PATH, str(chat_model))
    with pytest.raises(RewriteError, match="unset one"):
        backend_from_options()
    monkeypatch.delenv(ENV_URL)
    assert isinstance(backend_from_options(), TransformersBackend)
    monkeypatch.setenv(ENV_MODEL_PATH, str(tmp_path / "missing"))
    with pytest.raises(RewriteError, match="missing"):
        backend_from_options()


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (180, 120, 60)).save(path)
    return path


def test_generate_rewrite_without_a_backend_fails_before_the_model(photo, tmp_path, capsys):
    # The model folder does not exist: had the model been looked at first, the error would be about it.
    code = main(["generate", str(photo), "a cat jumps", "--rewrite", "normal", "--model", str(tmp_path / "nope"),
                 "-o", str(tmp_path / "out.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --rewrite normal needs a language model") and "\n" not in err
    assert "--rewrite-url" in err and ENV_MODEL_PATH in err
    assert not (tmp_path / "out.mp4").exists()
    code = main(["generate", str(photo), "a cat jumps", "--rewrite", "i2v", "--rewrite-url", "ftp://host",
                 "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "out.mp4")])
    assert code == 2 and "http://" in capsys.readouterr().err


def test_generate_rewrites_through_a_server_and_stores_both_prompts(server, photo, tmp_path, capsys):
    from hunyuan_i2v.video import read_video

    if bundled_model_dir() is None:
        pytest.skip("this install has no bundled demo model")
    server.answer = "Rewritten prompt: The camera slowly pans left, then cuts to a beach."
    out = tmp_path / "out.mp4"
    code = main(["generate", str(photo), "镜头向左平移", "--rewrite", "i2v", "--rewrite-url", server.url + "/v1",
                 "--rewrite-api-model", "m", "--rewrite-key", KEY, "-o", str(out), "--frames", "5", "--steps", "1",
                 "--seed", "3", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rewritten = "The camera slowly pans left, then cuts to a beach."
    assert f"rewritten prompt (i2v, openai:m): {rewritten}" in captured.out
    assert "warning: the prompt describes a scene change" in captured.err  # lint of the rewritten prompt
    assert server.requests[0]["body"]["messages"] == build_messages("镜头向左平移", "i2v")
    meta = read_video(out)[2]
    assert meta["prompt"] == rewritten and meta["original_prompt"] == "镜头向左平移"
    assert meta["rewrite_mode"] == "i2v" and meta["rewrite_backend"] == "openai:m"
