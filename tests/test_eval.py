"""cl3 eval against independent references on real tiny models.

- The prompt text: a port of the authors' own prompt building (ymcui/Chinese-LLaMA-Alpaca-3, scripts/ceval and
  scripts/cmmlu llama_evaluator.py; scripts/mmlu/eval.py = hendrycks/test), reading the CSVs with pandas as they do.
- The choice scores: a plain llama-cpp-python ``Llama(logits_all=True)`` evaluation of the same prompt.
- The answers: the authors' scorer ported onto transformers' own ``generate`` (torch, CPU) of the same checkpoint
  the F32 GGUF was converted from, with their GenerationConfig (repetition penalty 1.1, processed scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cl3.errors import Cl3Error, Interrupted
from cl3.evaluation.prompts import build_prompt, chat_messages
from cl3.evaluation.run import EvalRequest, evaluate, load_run
from cl3.evaluation.tasks import read_questions, split_file, task_info

from .conftest import one_line_error, run_cl3
from .eval_data import write_ceval, write_cmmlu, write_mmlu

CEVAL_SUBJECTS = ["computer_network", "mao_zedong_thought"]
CMMLU_SUBJECTS = ["agronomy", "chinese_history"]
MMLU_SUBJECTS = ["college_biology", "abstract_algebra"]


@pytest.fixture(scope="module")
def exams(tmp_path_factory):
    root = tmp_path_factory.mktemp("exams")
    return {"ceval": write_ceval(root / "ceval", CEVAL_SUBJECTS, n_val=8),
            "cmmlu": write_cmmlu(root / "cmmlu", CMMLU_SUBJECTS),
            "mmlu": write_mmlu(root / "mmlu", MMLU_SUBJECTS)}


# --- the authors' prompt building, transcribed (their code, pandas included) ------------------------------------

CHOICES = ["A", "B", "C", "D"]
AUTHORS_SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"
CEVAL_SYSTEM_FORMAT = '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>'
CMMLU_SYSTEM_FORMAT = '<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>'
USER_FORMAT = ('<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>'
               '<|start_header_id|>assistant<|end_header_id|>\n\n')
ASSISTANT_FORMAT = '{content}<|eot_id|>'


def authors_zh_prompts(task: str, subject_name: str, dev_df, test_df, k: int, with_prompt: bool) -> list[str]:
    """Chinese-LLaMA-Alpaca-3 scripts/{ceval,cmmlu}/llama_evaluator.py: eval_subject's instruction per row."""
    q_col, a_col = ("question", "answer") if task == "ceval" else ("Question", "Answer")
    system_format = CEVAL_SYSTEM_FORMAT if task == "ceval" else CMMLU_SYSTEM_FORMAT
    begin = "<|begin_of_text|>" if task == "ceval" else ""

    def format_example(line, few_shot=False):
        example = line[q_col]
        for choice in CHOICES:
            example += f'\n{choice}. {line[f"{choice}"]}'
        if few_shot:
            example += '\n答案：' + line[a_col] + '\n\n'
        else:
            example += '\n答案：'
        return example

    few_shot = k > 0
    history = f"以下是中国关于{subject_name}考试的单项选择题，请选出其中的正确答案。\n\n"
    if few_shot:
        if with_prompt:
            prompt_template = (
                begin + "<|start_header_id|>system<|end_header_id|>\n\n{system_prompt}<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|><|start_header_id|>assistant"
                "<|end_header_id|>\n\n好的，我会结合{subject}相关知识回答<|eot_id|>")
            prompt = prompt_template.format_map({'instruction': history, 'system_prompt': AUTHORS_SYSTEM_PROMPT,
                                                 'subject': subject_name})
            for i in range(k):
                line = dev_df.iloc[i, :]
                q = line[q_col]
                for choice in CHOICES:
                    q += f'\n{choice}. {line[f"{choice}"]}'
                a = line[a_col]
                q += "\n答案："
                prompt += USER_FORMAT.format(content=q) + ASSISTANT_FORMAT.format(content=a)
            history = prompt
        else:
            prompt = history
            for i in range(k):
                prompt += format_example(dev_df.iloc[i, :], few_shot=True)
            history = prompt
    out = []
    for _, row in test_df.iterrows():
        question = format_example(row, few_shot=False)
        instruction = history + question
        if with_prompt:
            if few_shot:
                instruction = history + USER_FORMAT.format_map({'content': question})
            else:
                instruction = (system_format.format(content=AUTHORS_SYSTEM_PROMPT)
                               + USER_FORMAT.format_map({'content': instruction}))
        out.append(instruction)
    return out


def authors_alpaca2_prompts(task: str, subject_name: str, dev_df, test_df, k: int, with_prompt: bool) -> list[str]:
    """Chinese-LLaMA-Alpaca-2 scripts/ceval/llama_evaluator.py and scripts/cmmlu/llama2_evaluator.py (subject_name:
    the file stem, as their eval.py passes it)."""
    q_col, a_col = ("question", "answer") if task == "ceval" else ("Question", "Answer")
    system_prompt = AUTHORS_SYSTEM_PROMPT if task == "ceval" else "你是一个乐于助人的助手。"

    def format_example(line, include_answer=True):
        example = line[q_col]
        for choice in CHOICES:
            example += f'\n{choice}. {line[f"{choice}"]}'
        if include_answer:
            example += '\n答案：' + line[a_col] + '\n\n'
        else:
            example += '\n答案：'
        return example

    if k > 0:
        prompt = f"以下是中国关于{subject_name}考试的单项选择题，请选出其中的正确答案。\n\n"
        if with_prompt:
            prompt_template = ("[INST] <<SYS>>\n" "{system_prompt}\n" "<</SYS>>\n\n"
                               "{instruction} [/INST]好的，我会结合{subject}相关知识回答")
            prompt = prompt_template.format_map({'instruction': prompt, 'system_prompt': system_prompt,
                                                 'subject': subject_name})
            for i in range(k):
                line = dev_df.iloc[i, :]
                q = line[q_col]
                for choice in CHOICES:
                    q += f'\n{choice}. {line[f"{choice}"]}'
                a = line[a_col]
                prompt += "[INST] " + q + "\n答案：[/INST]" + a + "\n"
        else:
            for i in range(k):
                prompt += format_example(dev_df.iloc[i, :], include_answer=True)
        history = prompt
    else:
        history = ''
    out = []
    for _, row in test_df.iterrows():
        instruction = format_example(row, include_answer=False)
        if with_prompt:
            prompt_template = ("[INST] <<SYS>>\n" "{system_prompt}\n" "<</SYS>>\n\n" "{instruction} [/INST]")
            instruction = prompt_template.format_map({'instruction': instruction, 'system_prompt': system_prompt})
        out.append(history + instruction)
    return out


def authors_mmlu_prompts(subject: str, dev_df, test_df, k: int) -> list[str]:
    """hendrycks/test evaluate.py (Chinese-LLaMA-Alpaca-3 scripts/mmlu/eval.py): gen_prompt + format_example."""
    def format_subject(subject):
        line = subject.split("_")
        s = ""
        for entry in line:
            s += " " + entry
        return s

    def format_example(df, idx, include_answer=True):
        prompt = df.iloc[idx, 0]
        kk = df.shape[1] - 2
        for j in range(kk):
            prompt += "\n{}. {}".format(CHOICES[j], df.iloc[idx, j + 1])
        prompt += "\nAnswer:"
        if include_answer:
            prompt += " {}\n\n".format(df.iloc[idx, kk + 1])
        return prompt

    def gen_prompt(train_df, subject, k=-1):
        prompt = "The following are multiple choice questions (with answers) about {}.\n\n".format(
            format_subject(subject))
        if k == -1:
            k = train_df.shape[0]
        for i in range(k):
            prompt += format_example(train_df, i)
        return prompt

    return [gen_prompt(dev_df, subject, k) + format_example(test_df, i, include_answer=False)
            for i in range(test_df.shape[0])]


def cl3_prompts(root: Path, task: str, subject: str, split: str, shots: int, chat=None,
                style: str = "alpaca3") -> list[str]:
    info = task_info(task)
    dev = read_questions(split_file(root, task, subject, "dev"), task, subject)[:shots]
    questions = read_questions(split_file(root, task, subject, split), task, subject)
    return [build_prompt(info, info.subjects[subject], dev, q, chat, style) for q in questions]


@pytest.mark.parametrize("shots", [0, 5])
def test_prompts_equal_the_authors_byte_for_byte(exams, shots):
    import pandas as pd

    checked = 0
    for task, subjects, splits in (("ceval", CEVAL_SUBJECTS, ("dev", "val")), ("cmmlu", CMMLU_SUBJECTS, ("dev", "test")),
                                   ("mmlu", MMLU_SUBJECTS, ("dev", "val"))):
        root = exams[task]
        for subject in subjects:
            for split in splits:
                header = None if task == "mmlu" else "infer"
                dev_df = pd.read_csv(split_file(root, task, subject, "dev"), header=header)
                test_df = pd.read_csv(split_file(root, task, subject, split), header=header)
                if task == "mmlu":
                    expected = authors_mmlu_prompts(subject, dev_df[:shots], test_df, shots)
                    assert cl3_prompts(root, task, subject, split, shots) == expected
                    checked += len(expected)
                    continue
                name = task_info(task).subjects[subject].name
                for with_prompt in (False, True):
                    expected = authors_zh_prompts(task, name, dev_df, test_df, shots, with_prompt)
                    got = cl3_prompts(root, task, subject, split, shots, "alpaca3" if with_prompt else None)
                    assert got == expected, (task, subject, split, with_prompt)
                    checked += len(expected)
                    expected = authors_alpaca2_prompts(task, subject, dev_df, test_df, shots, with_prompt)
                    got = cl3_prompts(root, task, subject, split, shots, "alpaca2" if with_prompt else None,
                                      "alpaca2")
                    assert got == expected, (task, subject, split, with_prompt, "alpaca2")
                    checked += len(expected)
    assert checked > 100
    # the data exercised pandas' readings: a numbers-only option column and an NA cell
    sample = "".join(cl3_prompts(exams["ceval"], "ceval", CEVAL_SUBJECTS[0], "val", shots))
    assert "\nD. nan" in sample or "nan" in "".join(cl3_prompts(exams["ceval"], "ceval", CEVAL_SUBJECTS[1], "val", 0))


def test_subject_tables():
    ceval, cmmlu, mmlu = task_info("ceval"), task_info("cmmlu"), task_info("mmlu")
    assert len(ceval.subjects) == 52 and len(cmmlu.subjects) == 67 and len(mmlu.subjects) == 57
    assert ceval.categories == ("STEM", "Social Science", "Humanities", "Other")
    assert {s.categories[0] for s in ceval.subjects.values()} == set(ceval.categories)
    assert [sum(s.categories[0] == c for s in ceval.subjects.values()) for c in ceval.categories] == [20, 10, 11, 11]
    assert len(ceval.hard) == 8 and set(ceval.hard) <= set(ceval.subjects)
    assert ceval.subjects["computer_network"].name == "计算机网络"
    assert cmmlu.subjects["chinese_history"].categories == ("Humanities", "China specific")
    assert mmlu.subjects["college_biology"].categories == ("STEM",)


# --- scores and answers against independent evaluations ------------------------------------------------------------

def _run(model, data, tmp_path, **kw) -> dict:
    name = "-".join(f"{k}{v}" for k, v in kw.items())
    run = evaluate(EvalRequest(Path(model), task=str(data), output=tmp_path / f"{name}.json", force=True,
                               n_ctx=4096, **kw))
    return run


def _prompt_texts(data: Path, task: str, shots: int, split: str, template) -> dict[str, str]:
    out = {}
    for subject in sorted(p.name for p in (data / "dev").iterdir()):
        key = subject.removesuffix(".csv").removesuffix("_dev")
        for i, text in enumerate(cl3_prompts(data, task, key, split, shots, template)):
            out[f"{key}/{i}"] = text
    return out


def _penalised(logits: np.ndarray, prompt: list[int], ids: list[int], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor on the chosen ids."""
    values = logits[ids].astype(np.float32)
    seen = np.isin(ids, prompt)
    return np.where(seen, np.where(values < 0, values * np.float32(penalty), values / np.float32(penalty)), values)


@pytest.mark.parametrize("task", ["ceval", "mmlu"])
def test_choice_scores_equal_llama_cpp_python(tiny_llama3_gguf, exams, tmp_path, task):
    from llama_cpp import Llama

    split = "val"
    run = _run(tiny_llama3_gguf, exams[task], tmp_path, shots=5, split=split)
    llm = Llama(model_path=str(tiny_llama3_gguf), n_ctx=4096, n_batch=512, logits_all=True, verbose=False)
    tok = lambda text, bos: llm.tokenize(text.encode(), add_bos=bos, special=True)  # noqa: E731
    if task == "mmlu":
        first, second, penalty = [tok(c, True)[-1] for c in CHOICES], None, 1.0
    else:
        first, second, penalty = [tok(c, False)[0] for c in CHOICES], [tok("：" + c, True)[-1] for c in CHOICES], 1.1
    texts = _prompt_texts(exams[task], task, 5, split, None)
    assert set(texts) == set(run.answers)
    for key in list(texts)[::3]:
        prompt = tok(texts[key], True)
        llm.reset()
        llm.eval(prompt)
        logits = np.array(llm.scores[len(prompt) - 1], dtype=np.float32)
        expected = _penalised(logits, prompt, first, penalty)
        if second is not None:
            expected = expected + _penalised(logits, prompt, second, penalty)
        np.testing.assert_allclose(run.answers[key]["scores"], expected, atol=1e-4, err_msg=key)
    llm.close()


@pytest.fixture(scope="module")
def hf_model(tiny_llama3):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama3.path, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama3.path)


def authors_answer(model, tokenizer, instruction: str) -> tuple[str, np.ndarray]:
    """Their eval_subject's constrained decoding, on transformers' generate (scores: processed, /temperature)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(temperature=0.2, top_k=0, top_p=1.0, do_sample=True, num_beams=1,
                              repetition_penalty=1.1, max_new_tokens=1, output_scores=True,
                              return_dict_in_generate=True)
    s_ids = [tokenizer.encode(c, add_special_tokens=False)[0] for c in CHOICES]
    ids = [tokenizer.encode("：" + c)[-1] for c in CHOICES]
    inputs = tokenizer(instruction, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                             generation_config=config)
    logits = out.scores[0][0].float()
    scores = (logits[s_ids] + logits[ids]).numpy()
    return {0: "A", 1: "B", 2: "C", 3: "D"}[int(np.argmax(scores))], scores


@pytest.mark.parametrize("shots,template", [(0, "none"), (5, "none"), (0, "alpaca3"), (5, "alpaca3"),
                                            (5, "model")])
def test_answers_equal_the_authors_scorer_on_transformers(tiny_llama3_gguf, hf_model, exams, tmp_path, shots,
                                                          template):
    model, tokenizer = hf_model
    run = _run(tiny_llama3_gguf, exams["ceval"], tmp_path, shots=shots, template=template)
    chat = None if template == "none" else template
    if template == "model":  # transformers renders the checkpoint's own template (cl3: the GGUF's, through Jinja)
        info, root = task_info("ceval"), exams["ceval"]
        texts = {}
        for subject in CEVAL_SUBJECTS:
            dev = read_questions(split_file(root, "ceval", subject, "dev"), "ceval", subject)[:shots]
            for q in read_questions(split_file(root, "ceval", subject, "val"), "ceval", subject):
                messages = chat_messages(info, info.subjects[subject], dev, q)
                texts[q.key] = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        texts = _prompt_texts(exams["ceval"], "ceval", shots, "val", chat)
    compared = 0
    for key, text in texts.items():
        mine = np.array(run.answers[key]["scores"])
        top = np.sort(mine)[::-1]
        answer, scores = authors_answer(model, tokenizer, text)
        np.testing.assert_allclose(scores * 0.2, mine, atol=2e-3, err_msg=key)
        if top[0] - top[1] > 1e-3:
            assert run.answers[key]["predicted"] == answer, key
            compared += 1
    assert compared >= len(texts) // 2


# --- prefix reuse and batching, resuming, the command line ---------------------------------------------------------

def test_prefix_reuse_and_batching_change_no_answer(tiny_llama3_gguf, exams, tmp_path):
    runs = [_run(tiny_llama3_gguf, exams["ceval"], tmp_path, shots=5, reuse_prefix=reuse, n_parallel=par)
            for reuse, par in ((False, 1), (True, 1), (True, 4), (False, 16), (True, 16))]
    base = runs[0].answers
    for run in runs[1:]:
        assert {k: a["predicted"] for k, a in run.answers.items()} == {k: a["predicted"] for k, a in base.items()}
        for k, a in run.answers.items():
            np.testing.assert_allclose(a["scores"], base[k]["scores"], atol=1e-4)


def test_interrupted_run_continues(tiny_llama3_gguf, exams, tmp_path):
    out = tmp_path / "run.json"
    request = EvalRequest(tiny_llama3_gguf, task=str(exams["ceval"]), shots=5, output=out, n_parallel=2)
    calls = []

    def stop_after_some(done: int, total: int) -> None:
        calls.append(done)
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="5 of 16 questions scored"):
        evaluate(request, progress=stop_after_some)
    kept = load_run(out)
    assert len(kept.answers) == 5 and kept.summary is None
    seen = []
    run = evaluate(request, progress=lambda done, total: seen.append(done))
    assert seen[0] == 5 and len(run.answers) == 16
    whole = _run(tiny_llama3_gguf, exams["ceval"], tmp_path, shots=5)
    assert {k: a["predicted"] for k, a in run.answers.items()} == {k: a["predicted"] for k, a in whole.answers.items()}
    # another request must not mix its answers into this file
    with pytest.raises(Cl3Error, match="other settings"):
        evaluate(EvalRequest(tiny_llama3_gguf, task=str(exams["ceval"]), shots=0, output=out))


def test_cli_eval_json_and_baseline(tiny_llama3_gguf, tiny_llama3_gguf_f16, exams, tmp_path):
    out = tmp_path / "f32.json"
    proc = run_cl3("eval", tiny_llama3_gguf, "--task", exams["mmlu"], "--shots", "5", "--split", "val", "-o", out,
                   "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["summary"]["overall"]["n"] == 12 and len(result["answers"]) == 12
    assert json.loads(out.read_text())["answers"] == result["answers"]
    proc = run_cl3("eval", tiny_llama3_gguf_f16, "--task", exams["mmlu"], "--shots", "5", "--split", "val",
                   "-o", tmp_path / "f16.json", "--baseline", out)
    assert proc.returncode == 0, proc.stderr
    assert "flip rate" in proc.stdout and "all (over questions)" in proc.stdout


def test_bad_inputs_get_one_line(tiny_llama3_gguf, exams, tmp_path):
    bad = tmp_path / "bad"
    write_ceval(bad, ["logic"])
    with open(bad / "val" / "logic_val.csv", "a", encoding="utf-8") as f:
        f.write("99,a question,1,2,3\n")
    one_line_error(run_cl3("eval", tiny_llama3_gguf, "--task", bad, "-o", tmp_path / "a.json"), "row 7 has 5 fields")
    one_line_error(run_cl3("eval", tiny_llama3_gguf, "--task", exams["ceval"], "--subjects", "chemistry",
                           "-o", tmp_path / "b.json"), "no subject 'chemistry'")
    one_line_error(run_cl3("eval", tiny_llama3_gguf, "--task", exams["ceval"], "--split", "test",
                           "-o", tmp_path / "c.json"), "use the val split")
    one_line_error(run_cl3("eval", tiny_llama3_gguf, "--task", tmp_path / "nowhere", "-o", tmp_path / "d.json"),
                   "unknown task")
    one_line_error(run_cl3("eval", tiny_llama3_gguf, "--task", exams["cmmlu"], "--split", "val",
                           "-o", tmp_path / "e.json"), "CMMLU has no val split")


def test_demo_model_answers_its_own_text_and_quantization_flips_answers(trained_demo, tmp_path):
    from cl3.evaluation.run import compare
    from cl3.quantize import quantize

    from .eval_learnable import write_learnable_set

    f16, _ = trained_demo(1)
    data = write_learnable_set(tmp_path / "learnable", f16.parent / "hf" / "tokenizer.json")
    runs = {}
    for name in ("F16", "Q8_0", "Q2_K"):
        model = f16 if name == "F16" else quantize(f16, name, out=tmp_path / f"demo-{name}.gguf").outputs[0]
        runs[name] = evaluate(EvalRequest(model, task=str(data), shots=0, output=tmp_path / f"{name}.json"))
    n = runs["F16"].summary.overall.n
    assert n >= 30
    assert runs["F16"].summary.overall.accuracy > 0.6  # chance: 0.25
    near, far = compare(runs["Q8_0"], runs["F16"]), compare(runs["Q2_K"], runs["F16"])
    assert far["flips"] > 0 and far["flips"] > near["flips"]
    assert far["difference"] < -2 * far["se"]  # the paired test sees Q2_K's loss
    assert far["flips"] == sum(runs["Q2_K"].answers[k]["predicted"] != a["predicted"]
                               for k, a in runs["F16"].answers.items())


# --- cl3 download --dataset, against a loopback hub ------------------------------------------------------------------

def _archive(folder: Path, kind: str) -> bytes:
    import io
    import tarfile
    import zipfile

    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as z:
            for p in sorted(folder.rglob("*.csv")):
                z.write(p, p.relative_to(folder))  # dev/x.csv, test/x.csv at the top, as cmmlu_v1_0_1.zip
    else:
        with tarfile.open(fileobj=buf, mode="w") as t:
            t.add(folder, arcname="ceval_data")  # one folder inside
    return buf.getvalue()


def test_download_dataset_unpacks_the_official_layout(exams, tiny_llama3_gguf, tmp_path, monkeypatch):
    from .test_hub import FakeHub

    class DatasetHub(FakeHub):
        def route(self, h, head):  # dataset endpoints as the model ones
            h.path = h.path.replace("/api/datasets/", "/api/models/", 1)
            if h.path.startswith("/datasets/"):
                h.path = h.path[len("/datasets"):]
            return super().route(h, head)

    hub = DatasetHub({"haonan-li/cmmlu": {"cmmlu_v1_0_1.zip": _archive(exams["cmmlu"], "zip"), "README.md": b"x"},
                      "ceval/ceval-exam": {"ceval_data.tar": _archive(exams["ceval"], "tar"),
                                           "ceval-exam.py": b"# a loading script"}})
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("CL3_CACHE_DIR", str(tmp_path / "cl3-cache"))
    try:
        for task in ("cmmlu", "ceval"):
            proc = run_cl3("download", "--dataset", task)
            assert proc.returncode == 0, proc.stderr
            where = Path(proc.stdout.strip())
            assert where == tmp_path / "cl3-cache" / "datasets" / task
            mine = {p.relative_to(where): p.read_bytes() for p in where.rglob("*.csv")}
            theirs = {p.relative_to(exams[task]): p.read_bytes() for p in exams[task].rglob("*.csv")}
            assert mine == theirs
        assert not hub.gets("README.md") and not hub.gets("ceval-exam.py")
        n = len(hub.gets("/resolve/"))
        assert run_cl3("download", "--dataset", "ceval").returncode == 0 and len(hub.gets("/resolve/")) == n
        proc = run_cl3("eval", tiny_llama3_gguf, "--task", "cmmlu", "--shots", "0", "-o", tmp_path / "r.json", "-q")
        assert proc.returncode == 0, proc.stderr
        assert "all (over questions)" in proc.stdout
        one_line_error(run_cl3("download", "--dataset", "gaokao"), "unknown dataset")
    finally:
        hub.close()


# --- cl3 bench --eval ------------------------------------------------------------------------------------------------

def test_bench_eval_rows(trained_demo, text_file, tmp_path, monkeypatch):
    import csv as csv_mod

    from cl3 import bench
    from cl3.evaluation.stats import paired

    from .eval_learnable import write_learnable_set

    f16, _ = trained_demo(1)
    monkeypatch.setenv("CL3_CACHE_DIR", str(tmp_path / "cache"))
    write_learnable_set(tmp_path / "cache" / "datasets" / "ceval", f16.parent / "hf" / "tokenizer.json", n=30)
    out = tmp_path / "tables" / "demo"
    out.parent.mkdir()
    proc = run_cl3("bench", f16, "--types", "F16,Q2_K", "--eval", "ceval:0", "-c", "64", "--chunks", "1", "-f",
                   text_file, "-p", "16", "-n", "2", "-r", "1", "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "C-Eval 0-shot (%)" in proc.stdout and "flips vs F16" in proc.stdout
    rows = {r[0]: r[1:] for r in csv_mod.reader((tmp_path / "tables" / "demo.csv").read_text().splitlines())}
    assert "C-Eval 0-shot (%)" in (tmp_path / "tables" / "demo.md").read_text()
    cells = json.loads((tmp_path / "tables" / "demo.json").read_text())["cells"]
    runs = {t: load_run(next((tmp_path / "tables" / "demo.models").glob(f"*{t}*.ceval-0shot.json")))
            for t in ("F16", "Q2_K")}
    for i, t in enumerate(("F16", "Q2_K")):
        acc = sum(a["predicted"] == a["answer"] for a in runs[t].answers.values()) / len(runs[t].answers)
        assert float(rows["ceval_0shot"][i]) == pytest.approx(100 * acc, abs=1e-4)
        assert cells[t]["ceval_0shot"] == pytest.approx(100 * acc)
    assert float(rows["ceval_0shot"][0]) > 50  # the demo knows its text; chance is 25
    flips = paired(runs["Q2_K"].answers, runs["F16"].answers).flips
    assert flips > 0 and float(rows["ceval_0shot_flips"][1]) == pytest.approx(100 * flips / 25, abs=1e-4)
    # the authors' Chinese-LLaMA-2-7B table compares on the same rows
    published = bench.read_table_csv(Path(__file__).parent.parent / "quant_tables" / "chinese-llama-2-7b.published.csv")
    table = bench.BenchTable("demo", str(f16), ["F16", "Q8_0", "Q4_0"],
                             bench.BenchSettings(evals=bench.eval_specs(["ceval"])))
    compared = {(c["metric"], c["type"]): c["published"] for c in bench.compare(table, published)}
    assert compared[("ceval_5shot", "Q8_0")] == 35.4 and compared[("ceval_0shot", "F16")] == 28.2
    one_line_error(run_cl3("bench", f16, "--eval", "gaokao", "-o", tmp_path / "x"), "unknown evaluation task")
    one_line_error(run_cl3("bench", f16, "--eval", "ceval", "--ray", "-o", tmp_path / "y"), "--eval")


def test_cli_output_folder_gets_the_default_name(tiny_llama3_gguf, exams, tmp_path):
    proc = run_cl3("eval", tiny_llama3_gguf, "--task", exams["ceval"], "--shots", "0", "--limit", "1",
                   "-o", f"{tmp_path}/runs/", "-q")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["tiny-llama3-f32.ceval-val-0shot.json"]


@pytest.mark.parametrize("shots,template", [(0, "none"), (5, "none"), (5, "alpaca2")])
def test_alpaca2_answers_equal_the_authors_scorer_on_transformers(tiny_spm, tiny_spm_gguf, exams, tmp_path, shots,
                                                                   template):
    """The Chinese-LLaMA-2 / Alpaca-2 protocol on a SentencePiece model: their LlamaTokenizer(legacy=True), where the
    bare letter ("▁A") and the last token of "：A" ("A") differ."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_spm.path, torch_dtype=torch.float32).eval()
    tokenizer = LlamaTokenizer.from_pretrained(tiny_spm.path, legacy=True)
    run = _run(tiny_spm_gguf, exams["ceval"], tmp_path, shots=shots, template=template, style="alpaca2")
    texts = {}
    for subject in CEVAL_SUBJECTS:
        for i, text in enumerate(cl3_prompts(exams["ceval"], "ceval", subject, "val", shots,
                                             None if template == "none" else template, "alpaca2")):
            texts[f"{subject}/{i}"] = text
    compared = 0
    for key, text in texts.items():
        mine = np.array(run.answers[key]["scores"])
        answer, scores = authors_answer(model, tokenizer, text)
        np.testing.assert_allclose(scores * 0.2, mine, atol=2e-3, err_msg=key)
        if np.sort(mine)[-1] - np.sort(mine)[-2] > 1e-3:
            assert run.answers[key]["predicted"] == answer, key
            compared += 1
    assert compared >= len(texts) // 2
