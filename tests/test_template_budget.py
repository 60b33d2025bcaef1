"""Chat templates are data from a downloaded file: rendered under a time and size budget (cl3.template_budget), a
template that would hang or exhaust memory is refused in one line, naming the key and --chat-template, by every
command that loads a model (chat, serve, export ollama, info --check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import gguf
import jinja2
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from cl3.chat_templates import KNOWN_TEMPLATES
from cl3.template_budget import BudgetedChatFormatter, TemplateBudgetError, check_chat_template
from tests.conftest import one_line_error, run_cl3, stop_process
from tests.test_chat_templates import with_metadata
from tests.test_export import LLAMA3_TOKENS, write_metadata_gguf
from tests.test_serve import free_port, running_server

from .tiny import LLAMA2_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE

# The issue's hostile templates (each prepended to a normal template) and others built the same way.
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
BIG_STRING_LOOP = "{% for i in range(50) %}{% set x = 'A' * 1000000000 %}{% endfor %}"
HUGE_RANGE = "{% for i in range(10**12) %}{% endfor %}"
HUGE_STRING = "{% set x = 'A' * 10**11 %}"
ISSUE_TEMPLATES = {"nested-loops": NESTED_LOOPS, "big-string-loop": BIG_STRING_LOOP, "huge-range": HUGE_RANGE,
                   "huge-string": HUGE_STRING}
MORE_HOSTILE = [
    "{% set ns = namespace(x='AB') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
    "{% set ns = namespace(x='AB') %}{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
    "{% set ns = namespace(x=3) %}{% for i in range(60) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "{{ 2 ** 100000000 }}", "{{ 'A' | center(10**10) }}", "{{ '%1000000000s' % 'x' }}",
    "{{ '%1000000000s' | format('x') }}", "{{ '{:>1000000000}'.format('x') }}",
    "{{ ('x' * 1000000).replace('', 'y' * 1000000) }}", "{{ ('x' * 1000000) | replace('', 'y' * 1000000) }}",
    "{{ ('\\t' * 1000000).expandtabs(1000) }}", "{{ ('a\\n' * 1000000) | indent(1000) }}",
    "{{ ('y' * 1000000).join(['a'] * 1000) }}", "{{ (['a'] * 1000) | join('y' * 1000000) }}",
    "{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}", "{{ [1] * 100000000 }}",
    "{% for i in 'x' * 100000 %}{% for j in 'x' * 100000 %}{% endfor %}{% endfor %}",
    "{{ range(100000) | map('string') | map('center', 100000) | join }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% for a in range(100000) recursive %}{{ loop(range(100000)) }}{% endfor %}",
]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "What is GGUF?"}]


def test_budgeted_formatter_renders_exactly_as_llama_cpp_python():
    for template in (LLAMA3_CHAT_TEMPLATE, LLAMA2_CHAT_TEMPLATE, *KNOWN_TEMPLATES.values()):
        for messages in (MESSAGES, MESSAGES[1:]):
            for gen in (True, False):
                ours = BudgetedChatFormatter(template, eos_token="</s>", bos_token="<s>", add_generation_prompt=gen)
                theirs = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>", add_generation_prompt=gen)
                assert ours(messages=messages).prompt == theirs(messages=messages).prompt


def outcome(formatter_class, template: str) -> str:
    try:
        return formatter_class(template, eos_token="", bos_token="")(messages=MESSAGES).prompt
    except jinja2.exceptions.SecurityError as ex:
        return f"SecurityError: {ex}"


def test_sandbox_still_blocks_attribute_escapes():
    escapes = ["{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__ }}",
               "{{ namespace.__init__.__globals__.os }}", "{{ self.__init__.__globals__.__builtins__ }}",
               "{{ raise_exception.__globals__ }}", "{{ ''.format.__globals__ }}"]
    for escape in escapes:
        ours = outcome(BudgetedChatFormatter, escape)
        assert ours == outcome(Jinja2ChatFormatter, escape)  # the sandbox's own answer, unchanged
        assert ours == "" or ours.startswith("SecurityError: access to attribute")


@pytest.mark.parametrize("hostile", [*ISSUE_TEMPLATES.values(), *MORE_HOSTILE])
def test_hostile_templates_are_refused(hostile):
    with pytest.raises(TemplateBudgetError, match=r"^tokenizer.chat_template of x.gguf exceeds cl3's budget"):
        check_chat_template(hostile + LLAMA3_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>",
                            where="tokenizer.chat_template of x.gguf")


def test_a_template_raising_on_its_own_is_not_a_budget_problem():
    check_chat_template("{{ raise_exception('no system messages') }}", bos_token="", eos_token="", where="t")
    check_chat_template("{% if %}", bos_token="", eos_token="", where="t")  # invalid Jinja: the caller's error


def hostile_metadata_gguf(tmp_path, name: str, prefix: str):
    return write_metadata_gguf(tmp_path / f"{name}.gguf", template=prefix + LLAMA3_CHAT_TEMPLATE, tokens=LLAMA3_TOKENS,
                               bos=0, eos=4)


def refused(proc) -> None:
    one_line_error(proc, "tokenizer.chat_template of ")
    assert "exceeds cl3's budget" in proc.stderr and "--chat-template" in proc.stderr


@pytest.mark.parametrize("name", ISSUE_TEMPLATES)
def test_export_refuses_a_hostile_template_in_one_line(tmp_path, name):
    path = hostile_metadata_gguf(tmp_path, name, ISSUE_TEMPLATES[name])
    refused(run_cl3("export", "ollama", path, timeout=60))
    assert not list(tmp_path.glob("*Modelfile"))
    # the way out: a template named on the command line
    proc = run_cl3("export", "ollama", path, "--chat-template", "llama-3-instruct", timeout=60)
    assert proc.returncode == 0, proc.stderr


def hostile_model(tiny_llama3_gguf, tmp_path, name: str, prefix: str):
    return with_metadata(tiny_llama3_gguf, tmp_path / f"{name}.gguf",
                         {gguf.Keys.Tokenizer.CHAT_TEMPLATE: (gguf.GGUFValueType.STRING, prefix + LLAMA3_CHAT_TEMPLATE)})


@pytest.mark.parametrize("name", ISSUE_TEMPLATES)
def test_chat_and_check_refuse_a_hostile_template_in_one_line(tiny_llama3_gguf, tmp_path, name):
    path = hostile_model(tiny_llama3_gguf, tmp_path, name, ISSUE_TEMPLATES[name])
    refused(run_cl3("chat", path, "-p", "hi", "-n", "4", "-c", "256", timeout=60))
    refused(run_cl3("info", path, "--check", timeout=60))


def test_serve_refuses_to_start_on_a_hostile_template(tiny_llama3_gguf, tmp_path):
    path = hostile_model(tiny_llama3_gguf, tmp_path, "nested", NESTED_LOOPS)
    refused(run_cl3("serve", path, "--port", free_port(), timeout=60))


def post(base: str, path: str, body: dict | None = None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_serve_survives_a_request_that_exceeds_the_budget(tiny_llama3_gguf, tmp_path):
    """A template that passes the start-up probes but hangs on a longer conversation: that request fails in
    seconds and the server goes on answering."""
    trap = ("{% if messages | length > 6 %}" + NESTED_LOOPS + "{% endif %}")
    path = hostile_model(tiny_llama3_gguf, tmp_path, "trap", trap)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cl3", "serve", str(path), "--port", str(port), "-c", "256",
                             "--threads", "2", "--alias", "trap"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=os.environ | {"COLUMNS": "200"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                post(base, "/v1/models")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "cl3 serve did not answer within 120 s"
                time.sleep(0.3)
        long = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(7)]
        with pytest.raises(urllib.error.HTTPError) as info:
            post(base, "/v1/chat/completions", {"messages": long, "max_tokens": 2})
        assert info.value.code == 500 and "exceeds cl3's budget" in info.value.read().decode()
        assert post(base, "/v1/models")["data"][0]["id"] == "trap"
        reply = post(base, "/v1/chat/completions", {"messages": long[:1], "max_tokens": 2})
        assert reply["choices"][0]["message"]["role"] == "assistant"
    finally:
        stop_process(proc)


def test_convert_writes_the_gguf_and_names_the_template_problem(tiny_llama3_dir, tmp_path):
    """convert only copies the template: it writes the GGUF, and its closing check says the template is refused."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama3_dir, src)
    config_path = src / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = NESTED_LOOPS + config["chat_template"]
    config_path.write_text(json.dumps(config), encoding="utf-8")
    out = tmp_path / "hostile.gguf"
    proc = run_cl3("convert", src, "-o", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "Traceback" not in proc.stderr
    assert "check: error: tokenizer.chat_template of hostile.gguf exceeds cl3's budget" in proc.stderr


# Constant expressions: Jinja evaluates them when it compiles a template, which llama-cpp-python's Llama does for
# every template of the GGUF as it loads (even when another template is named).
CONSTANT_HOG = "{{ 'x' | center(10**10) }}{{ 'A' * 10**9 }}"


def test_chat_refuses_a_constant_hog_quickly_and_another_template_is_the_way_out(tiny_llama3_gguf, tmp_path):
    path = hostile_model(tiny_llama3_gguf, tmp_path, "constant", CONSTANT_HOG)
    refused(run_cl3("chat", path, "-p", "hi", "-n", "4", "-c", "256", timeout=60))
    proc = run_cl3("chat", path, "-p", "hi", "-n", "4", "-c", "256", "--chat-template", "llama-3-instruct", timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_serve_with_another_template_runs_beside_a_hostile_one(tiny_llama3_gguf, tmp_path):
    path = hostile_model(tiny_llama3_gguf, tmp_path, "constant", CONSTANT_HOG)
    refused(run_cl3("serve", path, "--port", free_port(), timeout=60))
    with running_server(path, "-c", "256", "--threads", "2", "--chat-template", "llama-3-instruct") as (base, _):
        reply = post(base, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
        assert reply["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("name", sorted(ISSUE_TEMPLATES))
def test_eval_refuses_a_hostile_template(name):
    """cl3 eval's --template model renders through the same budget (a question never hangs the run)."""
    from cl3.evaluation.prompts import ChatRenderer

    with pytest.raises(TemplateBudgetError, match="exceeds cl3's budget"):
        ChatRenderer(ISSUE_TEMPLATES[name] + "{{ messages[0]['content'] }}", "<s>", "</s>", "the model's template")(
            [{"role": "user", "content": "hi"}])
