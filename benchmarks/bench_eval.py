"""`cl3 eval` speed: questions/s with and without the shared few-shot prefix, 0- and 5-shot, against a
straightforward one-prompt-per-question run through llama-cpp-python (``Llama.eval`` of each whole prompt), with the
answers compared; and the extrapolation to C-Eval valid (1,346 questions) for an 8B Q4_K_M model.

Model: the demo model (cl3's 10M-parameter Llama-3-format model; `--model` takes any GGUF). Data: C-Eval-shaped
subjects written from cl3's built-in Chinese evaluation text (question ~90 characters, options ~15), dev + val.

    python benchmarks/bench_eval.py [--model M.gguf] [--subjects 4] [--questions 24] [--pp-rate 12]
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO  # puts the repo on sys.path

from cl3.evaluation.engine import AUTHORS_PENALTY
from cl3.evaluation.prompts import build_prompt
from cl3.evaluation.run import EvalRequest, evaluate
from cl3.evaluation.tasks import read_questions, split_file, task_info

SUBJECTS = ["computer_network", "logic", "law", "physician", "high_school_history", "accountant"]
CEVAL_VAL_QUESTIONS = 1346


def write_exam(root: Path, n_subjects: int, n_questions: int) -> Path:
    text = "".join((Path(REPO) / "cl3" / "data" / "evaluation" / "zh.txt").read_text(encoding="utf-8").split())
    rng = random.Random(0)

    def piece(n: int) -> str:
        i = rng.randrange(len(text) - n)
        return text[i:i + n]

    for split, n in (("dev", 5), ("val", n_questions)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in SUBJECTS[:n_subjects]:
            with open(root / split / f"{s}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
                for i in range(n):
                    w.writerow([i, piece(90), *(piece(15) for _ in range(4)), rng.choice("ABCD")])
    return root


def llama_cpp_python_run(model: Path, data: Path, subjects: list[str], shots: int) -> tuple[dict, float, int]:
    """One whole prompt per question through llama-cpp-python, the authors' scores from its last logits."""
    from llama_cpp import Llama

    info = task_info("ceval")
    llm = Llama(model_path=str(model), n_ctx=4096, n_batch=512, logits_all=True, verbose=False)
    tok = lambda text, bos: llm.tokenize(text.encode(), add_bos=bos, special=True)  # noqa: E731
    first = [tok(c, False)[0] for c in "ABCD"]
    second = [tok("：" + c, True)[-1] for c in "ABCD"]
    answers, n_tokens = {}, 0
    t0 = time.perf_counter()
    for s in subjects:
        dev = read_questions(split_file(data, "ceval", s, "dev"), "ceval", s)[:shots]
        for q in read_questions(split_file(data, "ceval", s, "val"), "ceval", s):
            prompt = tok(build_prompt(info, info.subjects[s], dev, q), True)
            llm.reset()
            llm.eval(prompt)
            logits = np.asarray(llm.scores[len(prompt) - 1], dtype=np.float32)
            seen = set(prompt)

            def pen(t: int, logits=logits, seen=seen) -> float:
                v = logits[t]
                return (v * AUTHORS_PENALTY if v < 0 else v / AUTHORS_PENALTY) if t in seen else v

            scores = [pen(a) + pen(b) for a, b in zip(first, second)]
            answers[q.key] = "ABCD"[int(np.argmax(scores))]
            n_tokens += len(prompt)
    seconds = time.perf_counter() - t0
    llm.close()
    return answers, seconds, n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="GGUF (default: the demo model, built once)")
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--questions", type=int, default=10, help="val questions per subject")
    ap.add_argument("--pp-rate", type=float, default=12.0,
                    help="prompt tokens/s of an 8B Q4_K_M on this machine (`cl3 speed` pp512) for the extrapolation")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model = args.model
    if model is None:
        from cl3.convert import convert
        from cl3.demo_model import build_demo_checkpoint

        model = convert(build_demo_checkpoint(work / "demo").path, work / "demo-F16.gguf", "f16").path
    data = write_exam(work / "exam", args.subjects, args.questions)
    subjects = SUBJECTS[:args.subjects]
    n = args.subjects * args.questions
    print(f"model {model.name}, {args.subjects} subjects x {args.questions} questions = {n}")
    print("| shots | run | questions/s | × llama-cpp-python | tokens decoded / question | answers = reference |")
    print("|---|---|---|---|---|---|")
    extrapolation = {}
    for shots in (0, 5):
        ref, ref_s, ref_tokens = llama_cpp_python_run(model, data, subjects, shots)
        print(f"| {shots} | llama-cpp-python, one prompt per question | {n / ref_s:.1f} | 1.00 | "
              f"{ref_tokens / n:.0f} | – |")
        for label, reuse, par in (("cl3, whole prompts, 1 at a time", False, 1),
                                  ("cl3, whole prompts, 4 side by side", False, 4),
                                  ("cl3, shared prefix, 4 side by side (default)", True, 4)):
            run = evaluate(EvalRequest(model, task=str(data), shots=shots, reuse_prefix=reuse, n_parallel=par,
                                       output=work / f"run-{shots}-{reuse}-{par}.json"))
            same = sum(run.answers[k]["predicted"] == a for k, a in ref.items())
            prompt_tokens = ref_tokens / n
            decoded = prompt_tokens if not reuse else \
                (ref_tokens - (n - args.subjects) * _shared_tokens(model, data, subjects, shots)) / n
            print(f"| {shots} | {label} | {n / run.seconds:.1f} | {ref_s / run.seconds:.2f} | {decoded:.0f} | "
                  f"{same}/{n} |")
            if reuse:
                extrapolation[shots] = (prompt_tokens, decoded)
    print(f"\nC-Eval valid ({CEVAL_VAL_QUESTIONS} questions, 52 subjects) on an 8B Q4_K_M at {args.pp_rate:g} prompt "
          "tokens/s (this demo tokenizer's token counts; Llama-3's 128k vocabulary needs fewer):")
    for shots, (whole, decoded) in extrapolation.items():
        print(f"  {shots}-shot: one prompt per question {CEVAL_VAL_QUESTIONS * whole / args.pp_rate / 3600:.1f} h, "
              f"shared prefix {CEVAL_VAL_QUESTIONS * decoded / args.pp_rate / 3600:.1f} h")


def _shared_tokens(model: Path, data: Path, subjects: list[str], shots: int) -> float:
    """Mean tokens of a subject's shared prefix (what prefix reuse decodes once instead of per question)."""
    from cl3.evaluation.engine import common_prefix, tokenize_prompt
    from cl3.llama import Model

    info = task_info("ceval")
    sizes = []
    with Model(model, vocab_only=True) as m:
        for s in subjects:
            dev = read_questions(split_file(data, "ceval", s, "dev"), "ceval", s)[:shots]
            prompts = [tokenize_prompt(m, build_prompt(info, info.subjects[s], dev, q))
                       for q in read_questions(split_file(data, "ceval", s, "val"), "ceval", s)]
            sizes.append(common_prefix(prompts))
    return float(np.mean(sizes))


if __name__ == "__main__":
    main()
