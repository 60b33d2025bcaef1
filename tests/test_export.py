"""`cl3 export ollama` / `cl3 export lmstudio`.

The translated TEMPLATE is checked with an independent reference: Go's own text/template (the engine Ollama runs),
driven by a small Go program compiled here that feeds it the data Ollama's template.Execute builds (.System = the system
messages joined, .Messages = the collated messages; the Modelfile's SYSTEM is prepended when a request has no system
message, as Ollama's chat handler does). Its output must equal the Jinja rendering of the GGUF's own chat template, minus
the leading BOS text that Ollama's tokenizer adds itself. Without the Go toolchain (Debian: golang-go) the tests' own
small renderer for the Go-template subset (tests/go_template.py) is the reference; with it, both are used and the small
renderer is also checked against Go on Ollama's own templates.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from cl3.errors import UnsupportedModelError, UsageError
from cl3.export import (
    DEFAULT_SYSTEM_PROMPT,
    GgufInfo,
    analyze_chat_template,
    export_lmstudio,
    export_ollama,
    ollama_template,
    render_chat_template,
    stop_sequences,
)
from tests import go_template
from tests.conftest import one_line_error, run_cl3

from .tiny import LLAMA2_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE

GOLDEN = Path(__file__).parent / "golden"

# Chinese-Alpaca-2's prompt format as its authors build it (ymcui/Chinese-LLaMA-Alpaca-2,
# scripts/inference/gradio_demo.py): "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{instruction} [/INST]" for the first
# turn, always with a system prompt (default: prompts/alpaca-2.txt), then " {response}</s><s>[INST] {instruction} [/INST]".
ALPACA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = 'You are a helpful assistant. 你是一个乐于助人的助手。' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first -%}{{ '[INST] <<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Qwen-style ChatML with a built-in default system prompt.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "a", "b"]
SPM_TOKENS = ["<unk>", "<s>", "</s>", "a", "b"]
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b"]


def write_metadata_gguf(path: Path, *, template: str | None, tokens: list[str], bos: int, eos: int,
                        eot: int | None = None, add_bos: bool = True, context_length: int = 8192,
                        name: str = "Test-Model", organization: str | None = None, sampling: dict | None = None,
                        license: str | None = None) -> Path:
    """A GGUF with metadata only (no tensors): enough for the export, which never reads weights."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    if organization:
        w.add_organization(organization)
    if license:
        w.add_license(license)
    w.add_context_length(context_length)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<") and t.endswith(">") else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if eot is not None:
        w.add_eot_token_id(eot)
    w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    for key, val in (sampling or {}).items():
        getattr(w, f"add_sampling_{key}")(val)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MODELS = {
    # name: (template, tokens, bos, eos, eot, add_bos)
    "llama3-instruct": (LLAMA3_CHAT_TEMPLATE, LLAMA3_TOKENS, 0, 4, 4, True),
    "llama2-chat": (LLAMA2_CHAT_TEMPLATE, SPM_TOKENS, 1, 2, None, True),
    "alpaca2": (ALPACA2_CHAT_TEMPLATE, SPM_TOKENS, 1, 2, None, True),
    "chatml": (CHATML_CHAT_TEMPLATE, CHATML_TOKENS, 0, 2, None, False),
}


def model_gguf(tmp_path: Path, kind: str, **kw) -> Path:
    template, tokens, bos, eos, eot, add_bos = MODELS[kind]
    return write_metadata_gguf(tmp_path / f"{kind}.gguf", template=template, tokens=tokens, bos=bos, eos=eos, eot=eot,
                               add_bos=add_bos, **kw)


# --------------------------------------------------------------------------------------------------------------------
# Reading a Modelfile the way Ollama's parser does (parser/parser.go): COMMAND value, values in "..." or """...""".


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    commands, i = [], 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
            continue
        j = i
        while j < len(text) and text[j].isalpha():
            j += 1
        command = text[i:j].upper()
        assert text[j] in " \t", f"bad Modelfile line at {text[i:i + 40]!r}"
        if command == "PARAMETER":
            k = j + 1
            while text[k] not in " \t":
                k += 1
            command, j = "PARAMETER " + text[j + 1:k], k
        j += 1
        if text.startswith('"""', j):
            end = text.index('"""', j + 3)
            value, i = text[j + 3:end], end + 3
        else:
            end = text.find("\n", j)
            end = len(text) if end < 0 else end
            value, i = text[j:end].strip(), end
            if value.startswith('"'):
                assert value.endswith('"') and len(value) >= 2
                value = value[1:-1]
        commands.append((command, value))
    return commands


def modelfile_values(path: Path, command: str) -> list[str]:
    return [v for c, v in parse_modelfile(path.read_text(encoding="utf-8")) if c == command]


# --------------------------------------------------------------------------------------------------------------------
# Go's text/template, fed like Ollama's template.Execute (template/template.go: collate + Execute with .Messages).

GO_RENDERER = r"""
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string      `json:"template"`
	Cases    [][]Message `json:"cases"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(3)
	}
	out := []string{}
	for _, msgs := range in.Cases {
		var system []string
		var collated []*Message
		for i := range msgs {
			m := msgs[i]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if len(collated) > 0 && collated[len(collated)-1].Role == m.Role {
				collated[len(collated)-1].Content += "\n\n" + m.Content
			} else {
				collated = append(collated, &m)
			}
		}
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "Response": "",
			"Tools": nil, "Think": false, "IsThinkSet": false}
		if err := tmpl.Execute(&b, data); err != nil {
			fmt.Fprintln(os.Stderr, "execute:", err)
			os.Exit(4)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def ollama_data(messages: list[dict]) -> dict:
    """The data Ollama's template.Execute gives a .Messages template (collate: system texts joined, consecutive
    messages of one role merged)."""
    system, collated = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": "\n\n".join(system), "Messages": collated, "Response": "", "Tools": None, "Think": False,
            "IsThinkSet": False}


@pytest.fixture(scope="session")
def real_go_render(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.skip("the Go toolchain is not installed (apt-get install golang-go)")
    work = tmp_path_factory.mktemp("go-render")
    (work / "render.go").write_text(GO_RENDERER)
    env = os.environ | {"GOCACHE": str(work / "cache"), "GOPATH": str(work / "gopath"), "GO111MODULE": "off",
                        "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(work / "render"), str(work / "render.go")], check=True, env=env,
                   capture_output=True, timeout=300)

    def render(template: str, conversations: list[list[dict]]) -> list[str]:
        proc = subprocess.run([str(work / "render")], input=json.dumps({"template": template, "cases": conversations}),
                              check=False, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return render


def python_go_render(template: str, conversations: list[list[dict]]) -> list[str]:
    return [go_template.render(template, ollama_data(c)) for c in conversations]


@pytest.fixture(scope="session", params=["go", "python"])
def go_render(request):
    """Go's real text/template when the toolchain is installed; the tests' own small renderer in any case."""
    return request.getfixturevalue("real_go_render") if request.param == "go" else python_go_render


# Conversations of 1-4 user turns (different texts from the ones cl3 checks itself with).
TURNS = [("今天北京的天气怎么样？", "北京今天晴，气温二十度。"),
         ("Write a haiku about llamas.", "Soft wool on the hills\nquiet llamas chew and stare\nclouds drift past the peaks"),
         ("再来一首，写熊猫。", "竹林 深处\n熊猫 慢慢 吃"),
         ("Which one is better?", "Both are lovely.")]
SYSTEM = "你是一位诗人。Answer briefly."


def conversations(with_system: bool) -> list[list[dict]]:
    out = []
    for n in range(1, 5):
        msgs = [{"role": "system", "content": SYSTEM}] if with_system else []
        for i in range(n):
            msgs.append({"role": "user", "content": TURNS[i][0]})
            if i < n - 1:
                msgs.append({"role": "assistant", "content": TURNS[i][1]})
        out.append(msgs)
    return out


def ollama_request(messages: list[dict], modelfile_system: str | None) -> list[dict]:
    """What Ollama's chat handler passes to the template (server/routes.go: SYSTEM unless the request has one)."""
    if modelfile_system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": modelfile_system}] + messages
    return messages


def assert_template_matches_jinja(modelfile: Path, gguf_path: Path, go_render) -> int:
    reader = gguf.GGUFReader(gguf_path)
    field = lambda k: reader.fields[k].contents() if k in reader.fields else None
    tokens = field("tokenizer.ggml.tokens")
    bos, eos = tokens[field("tokenizer.ggml.bos_token_id")], tokens[field("tokenizer.ggml.eos_token_id")]
    add_bos = field("tokenizer.ggml.add_bos_token")
    jinja = field("tokenizer.chat_template")
    [template] = modelfile_values(modelfile, "TEMPLATE")
    systems = modelfile_values(modelfile, "SYSTEM")
    modelfile_system = systems[0] if systems else None

    convs = conversations(False) + conversations(True)
    requests = [ollama_request(c, modelfile_system) for c in convs]
    got = go_render(template, requests)
    for request, prompt in zip(requests, got):
        expected = render_chat_template(jinja, request, bos_token=bos, eos_token=eos)
        assert (bos if add_bos else "") + prompt == expected, "\n".join(m["role"] for m in request)
    return len(got)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("system", [DEFAULT_SYSTEM_PROMPT, None], ids=["with-SYSTEM", "no-SYSTEM"])
def test_ollama_template_renders_like_the_jinja_template(kind, system, tmp_path, go_render):
    path = model_gguf(tmp_path, kind)
    export = export_ollama(path, tmp_path, system=system)
    assert export.modelfile == tmp_path / f"{path.stem}.Modelfile"
    assert modelfile_values(export.modelfile, "SYSTEM") == ([system] if system else [])
    assert assert_template_matches_jinja(export.modelfile, path, go_render) == 8


def test_families_are_recognised_from_rendered_output(tmp_path):
    layouts = {kind: export_ollama(model_gguf(tmp_path, kind), tmp_path).layout for kind in MODELS}
    assert {k: v.family for k, v in layouts.items()} == {
        "llama3-instruct": "llama3-instruct", "llama2-chat": "llama2-chat", "alpaca2": "llama2-chat",
        "chatml": "chatml"}
    assert layouts["alpaca2"].default_system == DEFAULT_SYSTEM_PROMPT
    assert layouts["chatml"].default_system == "You are a helpful assistant."
    assert layouts["llama3-instruct"].default_system is None
    # a reformatted but equivalent Llama-3 template is recognised too (no string comparison with a known source)
    respelled = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                 "{{ m.content | trim }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    path = write_metadata_gguf(tmp_path / "respelled.gguf", template=respelled, tokens=LLAMA3_TOKENS, bos=0, eos=4)
    assert export_ollama(path, tmp_path).layout == layouts["llama3-instruct"]


@pytest.mark.parametrize("kind", ["llama3-instruct", "alpaca2"])
def test_golden_modelfile(kind, tmp_path):
    """Golden files reviewed by eye against Ollama's Modelfile rules (triple-quoted multi-line values, one PARAMETER
    per line). Regenerate with CL3_UPDATE_GOLDEN=1 and review the diff."""
    if kind == "llama3-instruct":
        path = model_gguf(tmp_path, kind, name="Llama-3-Chinese-8B-Instruct-v3", context_length=8192,
                          sampling={"temp": 0.6, "top_p": 0.9}, license="llama3")
    else:
        path = model_gguf(tmp_path, kind, name="Chinese-Alpaca-2-7B", context_length=4096, license="apache-2.0")
    text = export_ollama(path, tmp_path).modelfile.read_text(encoding="utf-8")
    golden = GOLDEN / f"{kind}.Modelfile"
    if os.environ.get("CL3_UPDATE_GOLDEN") == "1":
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")


def test_golden_modelfiles_follow_ollama_syntax(go_render):
    for golden in sorted(GOLDEN.glob("*.Modelfile")):
        commands = parse_modelfile(golden.read_text(encoding="utf-8"))
        names = [c for c, _ in commands]
        assert names[0] == "FROM" and names.count("TEMPLATE") == 1
        assert all(c in ("FROM", "TEMPLATE", "SYSTEM", "LICENSE") or c.startswith("PARAMETER ") for c in names)
        [template] = [v for c, v in commands if c == "TEMPLATE"]
        go_render(template, [[{"role": "user", "content": "hi"}]])  # Go parses and executes it


def test_modelfile_parameters(tmp_path):
    path = model_gguf(tmp_path, "llama3-instruct", context_length=131072, sampling={"temp": 0.5, "penalty_repeat": 1.1},
                      license="llama3")
    gen_config = tmp_path / "generation_config.json"
    gen_config.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    modelfile = export_ollama(path, tmp_path, generation_config=gen_config).modelfile
    params = [v for c, v in parse_modelfile(modelfile.read_text()) if c.startswith("PARAMETER")]
    pairs = [(c.split()[1], v) for c, v in parse_modelfile(modelfile.read_text()) if c.startswith("PARAMETER")]
    assert ("num_ctx", "131072") in pairs
    assert [v for k, v in pairs if k == "stop"] == ["<|eot_id|>", "<|start_header_id|>"]
    # GGUF sampling keys win; generation_config fills what they lack
    assert ("temperature", "0.5") in pairs and ("repeat_penalty", "1.1") in pairs and ("top_p", "0.9") in pairs
    assert len(params) == len(pairs)
    assert modelfile_values(modelfile, "LICENSE") == ["llama3"]
    assert modelfile_values(modelfile, "FROM") == ["./llama3-instruct.gguf"]


def test_stop_covers_every_end_of_turn_token(tmp_path):
    def stops(path: Path) -> list[str]:
        modelfile = export_ollama(path, tmp_path).modelfile
        return [v for c, v in parse_modelfile(modelfile.read_text()) if c == "PARAMETER stop"]

    # EOS <|end_of_text|> and EOT <|eot_id|> differ (base-model EOS): both stop, and so does a new header
    llama3 = write_metadata_gguf(tmp_path / "l3.gguf", template=LLAMA3_CHAT_TEMPLATE, tokens=LLAMA3_TOKENS, bos=0,
                                 eos=1, eot=4)
    assert stops(llama3) == ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"]
    assert stops(model_gguf(tmp_path, "llama2-chat")) == ["</s>", "[INST]"]
    assert stops(model_gguf(tmp_path, "chatml")) == ["<|im_end|>", "<|im_start|>"]


# Mistral-style: the system prompt goes into the last user turn, which no per-message layout can express.
MISTRAL_LAST_TURN_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] "
    "{% if loop.last and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "{{ m.content }} [/INST]{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}"
    "{% endfor %}")
# Gemma-2-style: raises on a system message.
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# Drops system messages silently.
DROPS_SYSTEM = ("{% for m in messages %}{% if m.role != 'system' %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}"
                "{% endfor %}<|assistant|>")
GEMMA_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "a", "b"]


# Mixtral-8x22B-Instruct-v0.1's hub template (as Mistral-7B-Instruct-v0.3's; its tool-calling branches left out):
# the system message opens the LAST user message.
MIXTRAL_8X22B = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""


@pytest.mark.parametrize("template", [MIXTRAL_8X22B, MISTRAL_LAST_TURN_SYSTEM], ids=["mixtral-8x22b", "mistral"])
@pytest.mark.parametrize("system", [None, "Be brief.\n用中文回答。"], ids=["no-SYSTEM", "with-SYSTEM"])
def test_system_in_the_last_user_turn_is_translated(template, system, tmp_path, go_render):
    """The TEMPLATE finds the last message (Go's len/slice) and opens it with .System, as the Jinja template does:
    every conversation, with and without a system message, renders the same."""
    path = write_metadata_gguf(tmp_path / "mixtral.gguf", template=template, tokens=SPM_TOKENS, bos=1, eos=2)
    export = export_ollama(path, tmp_path, system=system)
    assert export.layout.supports_system and export.layout.system_in_last_user == "\n\n"
    assert not any("system messages are not supported" in n for n in export.notes)
    assert assert_template_matches_jinja(export.modelfile, path, go_render) == 8
    # a conversation that ends with an assistant message: no system text anywhere, in either
    [go] = modelfile_values(export.modelfile, "TEMPLATE")
    conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    jinja = render_chat_template(template, conv, bos_token="<s>", eos_token="</s>", add_generation_prompt=False)
    assert "<s>" + go_render(go, [conv])[0] == jinja and SYSTEM not in jinja


@pytest.mark.parametrize("kind", ["gemma", "drops"])
def test_templates_without_system_support_translate_for_conversations_without_one(kind, tmp_path, go_render):
    template, tokens, bos, eos = {"gemma": (GEMMA_LIKE, GEMMA_TOKENS, 2, 1),
                                  "drops": (DROPS_SYSTEM, SPM_TOKENS, 1, 2)}[kind]
    path = write_metadata_gguf(tmp_path / f"{kind}.gguf", template=template, tokens=tokens, bos=bos, eos=eos,
                               name="Chinese-Alpaca-2-7B")  # an authors' name: still no SYSTEM, the template has none
    export = export_ollama(path, tmp_path)
    assert not export.layout.supports_system and export.system is None
    assert "system messages are not supported" in export.notes[0]
    assert "system messages are not supported" in export.modelfile.read_text()
    assert modelfile_values(export.modelfile, "SYSTEM") == []
    [go] = modelfile_values(export.modelfile, "TEMPLATE")
    bos_text, eos_text = tokens[bos], tokens[eos]
    convs = conversations(False)
    lead = bos_text if export.layout.bos_in_template else ""
    for conv, prompt in zip(convs, go_render(go, convs)):
        assert lead + prompt == render_chat_template(template, conv, bos_token=bos_text, eos_token=eos_text)
    # a request with a system message: the TEMPLATE leaves it out (as the template that drops it does)
    with_system = conversations(True)
    assert go_render(go, with_system) == go_render(go, convs)
    with pytest.raises(UsageError, match="does not support a system prompt"):
        export_ollama(path, tmp_path, system="Be brief.")


def test_untranslatable_templates_are_refused(tmp_path):
    shouting = "{% for m in messages %}{{ m.role }}: {{ m.content | upper }}\n{% endfor %}"
    always = "{{ raise_exception('Tools are required') }}"
    for i, template in enumerate([always, shouting]):
        path = write_metadata_gguf(tmp_path / f"bad{i}.gguf", template=template, tokens=SPM_TOKENS, bos=1, eos=2)
        with pytest.raises(UnsupportedModelError, match="cannot translate|Ollama TEMPLATE"):
            export_ollama(path, tmp_path)
        assert not list(tmp_path.glob("*Modelfile"))
    bare = write_metadata_gguf(tmp_path / "base.gguf", template=None, tokens=SPM_TOKENS, bos=1, eos=2)
    with pytest.raises(UnsupportedModelError, match="no tokenizer.chat_template"):
        export_ollama(bare, tmp_path)


def test_chat_template_file_for_a_gguf_without_one(tmp_path, go_render):
    """GGUFs converted without a chat template (older Chinese-Alpaca-2 files) take one from a file."""
    bare = write_metadata_gguf(tmp_path / "alpaca2-bare.gguf", template=None, tokens=SPM_TOKENS, bos=1, eos=2)
    template_file = tmp_path / "alpaca2.jinja"
    template_file.write_text(ALPACA2_CHAT_TEMPLATE, encoding="utf-8")
    proc = run_cl3("export", "ollama", bare, "--chat-template", template_file)
    assert proc.returncode == 0, proc.stderr
    [template] = modelfile_values(tmp_path / "alpaca2-bare.Modelfile", "TEMPLATE")
    reference = export_ollama(model_gguf(tmp_path, "alpaca2"), tmp_path).modelfile
    assert modelfile_values(reference, "TEMPLATE") == [template]


def test_cli_export_ollama(tmp_path):
    path = model_gguf(tmp_path, "alpaca2")
    out = tmp_path / "out"
    out.mkdir()
    env_path = os.environ.get("PATH", "")
    # no `ollama` on PATH: the model is not created, so the exit is a failure naming the command to run
    proc = subprocess.run([sys.executable, "-m", "cl3", "export", "ollama", str(path), "-o", str(out), "--name",
                           "alpaca2-test", "--create"], check=False, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PATH": str(Path(sys.executable).parent), "COLUMNS": "300"})
    modelfile = out / f"{path.stem}.Modelfile"
    assert proc.returncode not in (0, 70), proc.stderr
    line = proc.stderr.splitlines()[-1]  # after `info --check`'s findings on this test model
    assert line.startswith("error: ollama is not on PATH") and "Traceback" not in proc.stderr
    assert "Modelfile is written" in line and f"ollama create alpaca2-test -f {modelfile}" in line
    assert modelfile_values(modelfile, "FROM") == [str(path.resolve())]
    # an `ollama` on PATH is run with that command
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "ollama"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "ollama-args"}\necho "success"\n')
    fake.chmod(0o755)
    proc = subprocess.run([sys.executable, "-m", "cl3", "export", "ollama", str(path), "-o", str(out), "--name",
                           "alpaca2-test", "--create", "--force"], check=False, capture_output=True, text=True,
                          timeout=120, env=os.environ | {"PATH": f"{bindir}:{env_path}", "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ollama-args").read_text().split() == ["create", "alpaca2-test", "-f", str(modelfile)]
    assert "created Ollama model alpaca2-test" in proc.stdout
    fake.write_text("#!/bin/sh\necho 'Error: pull model manifest: file does not exist' >&2\nexit 1\n")
    proc = subprocess.run([sys.executable, "-m", "cl3", "export", "ollama", str(path), "-o", str(out), "--create",
                           "--force"], check=False, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PATH": f"{bindir}:{env_path}", "COLUMNS": "300"})
    assert proc.returncode != 0 and "failed with exit code 1" in proc.stderr


def test_cli_export_errors_are_one_line(tmp_path):
    bad = write_metadata_gguf(tmp_path / "bad.gguf", template="{{ messages | length }}", tokens=SPM_TOKENS, bos=1, eos=2)
    proc = run_cl3("export", "ollama", bad)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*Modelfile"))
    proc = run_cl3("export", "ollama", tmp_path / "missing.gguf")
    assert proc.returncode != 0 and proc.stderr.startswith("error:")


def test_real_tiny_models_export(tiny_llama3_gguf, tiny_spm_gguf, tiny_llama3_dir, tmp_path, go_render):
    """The GGUFs cl3.convert writes (real tokenizers and chat templates) round-trip through the translation."""
    for gguf_path in (tiny_llama3_gguf, tiny_spm_gguf):
        out = tmp_path / gguf_path.stem
        out.mkdir()
        export = export_ollama(gguf_path, out, generation_config=tiny_llama3_dir)
        assert assert_template_matches_jinja(export.modelfile, gguf_path, go_render) == 8
    pairs = [(c.split()[1], v) for c, v in parse_modelfile((tmp_path / tiny_llama3_gguf.stem / f"{tiny_llama3_gguf.stem}.Modelfile").read_text())
             if c.startswith("PARAMETER")]
    assert ("temperature", "0.6") in pairs and ("top_p", "0.9") in pairs and ("stop", "<|eot_id|>") in pairs


def test_lmstudio_layout(tmp_path):
    path = model_gguf(tmp_path, "llama3-instruct", name="Llama-3-Chinese-8B-Instruct", organization="hfl")
    models = tmp_path / "lmstudio-models"
    target = export_lmstudio(path, models)
    assert target == models / "hfl" / "Llama-3-Chinese-8B-Instruct-GGUF" / "llama3-instruct.gguf"
    assert target.read_bytes() == path.read_bytes()
    linked = export_lmstudio(path, models, publisher="me", model="tiny", mode="hardlink")
    assert linked == models / "me" / "tiny" / "llama3-instruct.gguf"
    assert linked.stat().st_ino == path.stat().st_ino
    assert sorted(p.name for p in models.rglob("*")) == sorted(
        ["hfl", "Llama-3-Chinese-8B-Instruct-GGUF", "llama3-instruct.gguf", "me", "tiny", "llama3-instruct.gguf"])

    proc = run_cl3("export", "lmstudio", path, "--models-dir", tmp_path / "other", "--publisher", "cl3")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "other" / "cl3" / "Llama-3-Chinese-8B-Instruct-GGUF" / "llama3-instruct.gguf").is_file()


# Ollama's own templates (ollama/ollama template/*.gotmpl) exercise the small renderer on constructs cl3 does not emit.
OLLAMA_TEMPLATES = {
    "llama3-instruct": (
        "{{- if .Messages }}\n{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>\n"
        "{{- end }}\n{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ else -}}\n{{ if .System }}<|start_header_id|>"
        "system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user"
        "<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{{ .Response }}<|eot_id|>\n{{- end -}}"),
    "llama2-chat": (
        "{{- if .Messages }}\n{{- range $index, $_ := .Messages }}\n{{- if eq .Role \"user\" }}[INST] "
        "{{ if eq $index 0 }}<<SYS>>\n{{- if $.System }}\n{{ $.System }}\n{{ end }}<</SYS>>\n\n{{ end }}{{ .Content }}\n"
        "{{- else }} [/INST] {{ .Content }}</s><s>\n{{- end }}\n{{- end }} [/INST]\n{{- else -}}\n[INST] <<SYS>>"
        "{{ if .System }}{{ .System }}{{ end }}<</SYS>>\n\n{{ .Prompt }} [/INST] {{ .Response }}</s>\n{{- end -}}"),
    "mistral-like": (
        "{{- range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        "{{- if and (eq .Role \"user\") (not (eq $i 0)) }}[INST] {{ else if eq .Role \"user\" }}<s>[INST] {{ end }}"
        "{{- if or (ne .Role \"system\") $last }}{{ .Content }}{{ end }}{{ if $last }} [/INST]{{ end }}"
        "{{- if eq .Role \"assistant\" }}</s>{{ else if lt 1 2 }} {{ print $i }}{{ end }}{{ end }}"
        "{{ .Messages | len | print }}|{{ slice .Messages 0 | len }}"),
}


def test_small_renderer_agrees_with_go(real_go_render, tmp_path):
    convs = conversations(False) + conversations(True) + [[]]
    templates = dict(OLLAMA_TEMPLATES)
    for kind in MODELS:
        export = export_ollama(model_gguf(tmp_path, kind), tmp_path)
        [templates[kind + " (cl3)"]] = modelfile_values(export.modelfile, "TEMPLATE")
    for name, template in templates.items():
        assert python_go_render(template, convs) == real_go_render(template, convs), name


def llama_cpp_templates() -> list[Path]:
    """The real-world chat templates llama.cpp ships in its source tree (models/templates), beside the reference
    tools' build (CL3_REFERENCE_BIN = PREFIX/build/bin, source in PREFIX/src)."""
    bin_dir = os.environ.get("CL3_REFERENCE_BIN")
    roots = [Path(bin_dir).parent.parent / "src"] if bin_dir else []
    roots.append(Path.home() / ".cache" / "cl3-reference" / "0.3.36" / "src")
    for root in roots:
        found = sorted((root / "models" / "templates").glob("*.jinja"))
        if found:
            return found
    return []


@pytest.fixture(scope="session")
def reference_go_render(request):
    """Go when installed, else the small renderer (for tests too slow to run with both)."""
    return request.getfixturevalue("real_go_render") if shutil.which("go") else python_go_render


# Ordinary text: cl3's own prose, code and evaluation text (not the dialogues, which are written in chat templates).
DATA = Path(__file__).parent.parent / "cl3" / "data"
ORDINARY_TEXT = "\n".join(p.read_text(encoding="utf-8") for p in [
    DATA / "calibration" / "code.txt", DATA / "calibration" / "en_prose.txt", DATA / "calibration" / "zh_prose.txt",
    DATA / "evaluation" / "en.txt", DATA / "evaluation" / "zh.txt"]) + "\n".join(m for t in TURNS for m in t)


def assert_stops_are_markup(stops: list[str], jinja: str, bos: str, eos: str, special: set[str]) -> None:
    """No stop is ordinary text: each is one of the vocabulary's special tokens, or markup that the template itself
    writes (it is in the rendered prompt but in no message) and that is not just words and prose punctuation, nor in
    ordinary text."""
    conv = conversations(False)[-1]
    rendered = render_chat_template(jinja, conv, bos_token=bos, eos_token=eos) if stops else ""
    assert stops, "no stop at all"
    for stop in stops:
        if stop in special:
            continue
        assert stop in rendered and not any(stop in m["content"] for m in conv), stop
        assert not re.fullmatch(r"[\w\s.,:;!?'\"()，。：；！？-]*", stop), f"{stop!r} is plain words"
        assert not re.fullmatch(r"\W*", stop), f"{stop!r} is punctuation alone"
        assert stop not in ORDINARY_TEXT, f"{stop!r} occurs in ordinary text"


def test_real_world_templates(reference_go_render):
    """Every template of llama.cpp's collection is either refused with a one-line reason or translated exactly (for
    conversations without a system message only when the template refuses, drops or moves system messages), with
    stops that are markup, never ordinary words."""
    templates = llama_cpp_templates()
    if not templates:
        pytest.skip("llama.cpp's source (models/templates) is not available beside the reference tools")
    translated, refused = {}, {}
    for path in templates:
        jinja = path.read_text(encoding="utf-8")
        bos, eos = ("<|begin_of_text|>", "<|eot_id|>") if "llama" in path.name.lower() else ("<s>", "</s>")
        try:
            layout = analyze_chat_template(jinja, bos_token=bos, eos_token=eos)
        except UnsupportedModelError as ex:
            assert "\n" not in str(ex) and "Ollama TEMPLATE" in str(ex)
            refused[path.stem] = str(ex)
            continue
        translated[path.stem] = layout
        template = ollama_template(layout)
        convs = conversations(False) + (conversations(True) if layout.supports_system else [])
        for system in (DEFAULT_SYSTEM_PROMPT, None) if layout.supports_system else (None,):
            requests = [ollama_request(c, system) for c in convs]
            for request, prompt in zip(requests, reference_go_render(template, requests)):
                expected = render_chat_template(jinja, request, bos_token=bos, eos_token=eos)
                assert (bos if layout.bos_in_template else "") + prompt == expected, (path.name, request)
        info = GgufInfo(path=path, architecture="llama", name=None, organization=None, chat_template=jinja,
                        bos_token=bos, eos_token=eos, end_of_turn_tokens=[], add_bos=True, context_length=None,
                        sampling={}, license=None, license_name=None, license_link=None)
        assert_stops_are_markup(stop_sequences(layout, info), jinja, bos, eos, {bos, eos})
    assert translated["meta-llama-Llama-3.3-70B-Instruct"].family == "llama3-instruct"
    assert translated["Qwen-Qwen2.5-7B-Instruct"].family == "chatml"
    system_less = sorted(k for k, v in translated.items() if not v.supports_system)
    assert "google-gemma-2-2b-it" in system_less
    # the system message inside the last user turn: translated with it, checked above on every conversation
    in_last_user = sorted(k for k, v in translated.items() if v.system_in_last_user is not None)
    assert "mistralai-Mistral-Nemo-Instruct-2407" in in_last_user
    # what is still refused needs tool definitions the probes do not pass
    assert all("tool" in k or "func" in k for k in refused), refused
    print(f"\n{len(templates)} templates: {len(translated) - len(system_less)} translated, {len(system_less)} only "
          f"without a system message ({', '.join(system_less)}), {len(refused)} refused ({', '.join(refused)}); "
          f"system text in the last user turn: {', '.join(in_last_user)}")


# Hub templates whose stops used to be plain words (the first word of the text before the first user turn, the first
# word of the next turn's header).
DEEPSEEK_CODER = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{%- set ns = namespace(found=false) -%}{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- set ns.found = true -%}{%- endif -%}{%- endfor -%}{{bos_token}}{%- if not ns.found -%}"
    "{{'You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, and you "
    "only answer questions related to computer science. For politically sensitive questions, security and privacy "
    "issues, and other non-computer science questions, you will refuse to answer\\n'}}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{{ message['content'] }}{%- else %}"
    "{%- if message['role'] == 'user' %}{{'### Instruction:\\n' + message['content'] + '\\n'}}{%- else %}"
    "{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}{%- endif %}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{'### Response:'}}{% endif %}")
OPENCHAT = ("{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + ': ' + "
            "message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}"
            "{{ 'GPT4 Correct Assistant:' }}{% endif %}")
RWKV_LIKE = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n\nAssistant:"
             "{% elif m.role == 'assistant' %} {{ m.content }}\n\n{% else %}System: {{ m.content }}\n\n{% endif %}"
             "{% endfor %}")


@pytest.mark.parametrize("kind", ["deepseek-coder", "openchat", "user-colon"])
def test_stops_are_never_plain_words(kind, tmp_path, go_render):
    template, tokens, bos, eos, expected = {
        "deepseek-coder": (DEEPSEEK_CODER, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|EOT|>", "a"], 0, 2,
                           ["<|EOT|>", "### Instruction:"]),
        "openchat": (OPENCHAT, ["<unk>", "<s>", "</s>", "<|end_of_turn|>", "a"], 1, 3, ["<|end_of_turn|>"]),
        "user-colon": (RWKV_LIKE, ["<unk>", "<s>", "</s>", "a"], 1, 2, ["</s>"]),
    }[kind]
    path = write_metadata_gguf(tmp_path / f"{kind}.gguf", template=template, tokens=tokens, bos=bos, eos=eos,
                               add_bos=kind != "user-colon")
    export = export_ollama(path, tmp_path)
    stops = [v for c, v in parse_modelfile(export.modelfile.read_text()) if c == "PARAMETER stop"]
    assert stops == expected and "You" not in stops and "GPT4" not in stops
    assert_stops_are_markup(stops, template, tokens[bos], tokens[eos], {tokens[eos], tokens[bos]})
    if kind == "user-colon":
        assert any("no stop for 'User:'" in n for n in export.notes)
    assert assert_template_matches_jinja(export.modelfile, path, go_render) == 8


def test_literals_that_look_like_go_template_syntax(tmp_path, go_render):
    """Braces, "{{", "}}" and whitespace around the messages survive the translation."""
    jinja = ("{% for m in messages %}{{ '{{' }}{{ m.role }}} {\n{{ m.content }}}}\n\n  {% endfor %}"
             "{% if add_generation_prompt %}{{ '{{' }}assistant} {{ '{' }}{% endif %}")
    path = write_metadata_gguf(tmp_path / "braces.gguf", template=jinja, tokens=SPM_TOKENS, bos=1, eos=2,
                               add_bos=False)
    export = export_ollama(path, tmp_path, system=None)
    assert assert_template_matches_jinja(export.modelfile, path, go_render) == 8


# --------------------------------------------------------------------------------------------------------------------
# GGUF and user text never becomes a Modelfile command (read with a transcription of Ollama's own parser)

INJECTION = "x\nFROM /etc/passwd\nSYSTEM pwned\r\nPARAMETER temperature 9\nLICENSE \"\"\"evil\n"


def ollama_commands(modelfile: Path) -> list[tuple[str, str]]:
    from tests import ollama_parser

    return ollama_parser.parse(modelfile.read_bytes().decode("utf-8"))  # as written: no newline translation


def exported(path: Path, *args) -> list[tuple[str, str]]:
    proc = run_cl3("export", "ollama", path, "--force", *args)
    assert proc.returncode == 0, proc.stderr
    return ollama_commands(path.with_suffix(".Modelfile"))


def test_ollama_parser_transcription_reads_our_modelfiles_as_modelfile_values_does(tmp_path):
    path = model_gguf(tmp_path, "llama3-instruct", license="MIT")
    text = export_ollama(path, tmp_path, system="Be brief.\nFROM x").modelfile.read_text(encoding="utf-8")
    from tests import ollama_parser

    ours = [(c, v) for c, v in parse_modelfile(text)]
    theirs = [(("FROM" if n == "model" else f"PARAMETER {n}" if n not in ("template", "system", "license")
                else n.upper()), v) for n, v in ollama_parser.parse(text)]
    assert theirs == ours
    # what an injection looks like to it: a value ends at a line break after a closing quote, then commands follow
    assert ollama_parser.parse('FROM ./a.gguf\nSYSTEM """a"""b\nc"""\nFROM /etc/passwd\n') == [
        ("model", "./a.gguf"), ("system", 'a"""b\nc'), ("model", "/etc/passwd")]
    assert [n for n, _ in ollama_parser.parse('# x\nFROM ./a.gguf\nSYSTEM """a"""\nFROM /etc/passwd\n')] == [
        "model", "system", "model"]


def test_gguf_name_cannot_inject_commands(tmp_path):
    path = model_gguf(tmp_path, "llama3-instruct", name=INJECTION)
    commands = exported(path)
    assert [v for n, v in commands if n == "model"] == ["./llama3-instruct.gguf"]
    assert not [n for n, _ in commands if n in ("system", "license", "temperature")]


def test_system_and_license_with_line_breaks_and_keywords_stay_one_value(tmp_path):
    text = "Be brief.\nFROM /etc/passwd\n  SYSTEM pwned\r\nPARAMETER temperature 9\n# not a comment\n\"quoted\" \"\"x\""
    path = model_gguf(tmp_path, "llama3-instruct", license=text)
    commands = exported(path, "--system", text)
    assert [n for n, _ in commands].count("model") == 1
    assert [v for n, v in commands if n == "system"] == [text]
    assert [v for n, v in commands if n == "license"] == [text]
    assert not [n for n, _ in commands if n == "temperature"]


def test_triple_quotes_in_system_license_or_template_are_refused_in_one_line(tmp_path):
    path = model_gguf(tmp_path, "llama3-instruct")
    for bad in ('a"""\nFROM /etc/passwd\nSYSTEM """b', 'a""\x01"\nFROM /etc/passwd'):  # \x01: Ollama drops it
        one_line_error(run_cl3("export", "ollama", path, "--system", bad, "--force"), 'the SYSTEM text contains """')
        assert not list(tmp_path.glob("*.Modelfile"))
    evil_license = model_gguf(tmp_path, "alpaca2", license='MIT"""\nFROM /etc/passwd\nLICENSE """x')
    one_line_error(run_cl3("export", "ollama", evil_license), 'the LICENSE text contains """')
    license_file = tmp_path / "LICENSE.txt"
    license_file.write_text('MIT\n"""\nSYSTEM pwned\n', encoding="utf-8")
    one_line_error(run_cl3("export", "ollama", path, "--license", license_file), 'the LICENSE text contains """')
    template = LLAMA3_CHAT_TEMPLATE.replace("<|start_header_id|>", '"""\nFROM /etc/passwd\n<|start_header_id|>')
    evil_template = write_metadata_gguf(tmp_path / "tq.gguf", template=template, tokens=LLAMA3_TOKENS, bos=0, eos=4,
                                        eot=4)
    one_line_error(run_cl3("export", "ollama", evil_template), 'the TEMPLATE text contains """')
    assert not list(tmp_path.glob("*.Modelfile"))


def test_template_markup_with_line_breaks_and_keywords_stays_one_value(tmp_path):
    """A chat template whose markup puts Modelfile keywords at line starts: the TEMPLATE holds them, nothing else."""
    template = ("{% for m in messages %}{{ '\\nFROM /etc/passwd\\nSYSTEM ' + m['role'] + ':\\n' + m['content'] + "
                "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '\\nFROM /etc/passwd\\nSYSTEM assistant:\\n' }}"
                "{% endif %}")
    path = write_metadata_gguf(tmp_path / "kw.gguf", template=template, tokens=SPM_TOKENS, bos=1, eos=2)
    commands = exported(path)
    assert [n for n, _ in commands].count("model") == 1 and not [n for n, _ in commands if n == "system"]
    [go] = [v for n, v in commands if n == "template"]
    assert "\nFROM /etc/passwd\nSYSTEM " in go


def test_a_stop_or_parameter_that_cannot_be_written_is_refused(tmp_path):
    from cl3.export import _param_value

    for bad in ('a"b', "a\nFROM x", "a\rb", "a\x00b"):
        with pytest.raises(UnsupportedModelError, match="cannot be written in an Ollama Modelfile"):
            _param_value("stop", bad)
    with pytest.raises(UnsupportedModelError, match="not a number or text"):
        _param_value("temperature", True)
    assert _param_value("stop", "<|eot_id|>") == '"<|eot_id|>"' and _param_value("top_k", 40) == "40"
