"""`cl3 eval`'s library entry: a request in, a run (per-question answers and scores, summary) out, resumable.

The run file (JSON, written under a temporary name and renamed, every few seconds while scoring and at the end)
holds the settings and every scored question; the same request finds it and continues where it stopped (Ctrl-C).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import paths
from ..chat_templates import template_from_spec
from ..errors import InputError, Interrupted, OutputError, UsageError
from ..files import atomic_output, check_output_directory, is_directory_target, output_directory
from ..llama import Context, Model
from ..metadata import read_metadata
from .engine import ChoiceTokens, Scorer, tokenize_prompt
from .prompts import AUTHORS_TEMPLATES, STYLES, ChatRenderer, build_prompt
from .stats import Summary, paired, summarize
from .tasks import (
    DEFAULT_SPLIT,
    TASKS,
    Question,
    Subject,
    TaskInfo,
    detect_layout,
    folder_prompt,
    read_questions,
    split_file,
    subjects_in,
    task_info,
)

FORMAT = "cl3-eval/1"
SAVE_EVERY_S = 5.0
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EvalRequest:
    model: Path
    task: str = "ceval"              # ceval, cmmlu, mmlu (cl3's downloaded copy) or a folder in one of the layouts
    split: str | None = None         # default: ceval val, cmmlu test, mmlu test
    shots: int = 5
    subjects: tuple[str, ...] = ()   # default: all the folder holds
    template: str = "none"           # none, model, alpaca3, alpaca2, a template name or a Jinja file
    style: str = "alpaca3"           # whose scripts' plain prompts: Chinese-LLaMA-Alpaca-3's or -2's
    limit: int | None = None         # at most this many questions per subject
    n_ctx: int = 4096
    n_batch: int = 2048
    n_parallel: int = 4
    threads: int | None = None
    n_gpu_layers: int = -1
    reuse_prefix: bool = True
    flash_attn: str = "off"          # llama.cpp's CPU flash attention rounds Q to F16: 1e-3 score changes between
                                     # batch layouts; off, scores agree with a plain one-prompt evaluation to 1e-5
    output: str | Path | None = None  # the run file (a folder: the default name in it); default: in the current
                                     # folder, named after model, task, split, shots and template
    force: bool = False              # start over even if the run file holds another run's answers


@dataclass
class EvalRun:
    settings: dict
    answers: dict[str, dict]         # "subject/index" -> {"answer", "predicted", "scores"}
    summary: Summary | None = None
    path: Path | None = None
    seconds: float = 0.0
    info: TaskInfo | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "settings": self.settings, "seconds": round(self.seconds, 3),
                "summary": self.summary.to_dict() if self.summary else None, "answers": self.answers}


def dataset_dir(task: str) -> Path:
    """Where `cl3 download --dataset TASK` puts a task's files (official layout)."""
    return paths.cache_dir() / "datasets" / task


def resolve_task(task: str) -> tuple[Path, str, TaskInfo]:
    """(folder, layout, subject table) of a task name or folder."""
    if task in TASKS:
        root = dataset_dir(task)
        if not (root / "dev").is_dir():
            raise InputError(f"no {task} data in {root}: fetch it with `cl3 download --dataset {task}` or pass a "
                             "folder in the official layout", param="task")
    else:
        root = Path(task)
        if not root.is_dir():
            raise UsageError(f"unknown task {task!r}: choose {', '.join(TASKS)} or a folder", param="task")
    layout = detect_layout(root)
    return root, layout, folder_prompt(root, task_info(layout))


def default_output(request: EvalRequest, split: str) -> Path:
    task = request.task if request.task in TASKS else Path(request.task).name
    chat = "" if request.template == "none" else f"-{Path(request.template).stem}"
    chat += "" if request.style == "alpaca3" else f"-{request.style}"
    return Path(f"{Path(request.model).stem}.{task}-{split}-{request.shots}shot{chat}.json")


def load_run(path: str | os.PathLike) -> EvalRun:
    """A saved run file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as ex:
        raise InputError(f"{path} is not a cl3 eval run: {ex}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path} is not a cl3 eval run (no \"format\": \"{FORMAT}\")")
    return EvalRun(data["settings"], data["answers"], path=path, seconds=data.get("seconds", 0.0))


def open_baseline(path: str | os.PathLike) -> EvalRun | None:
    """A ``--baseline``, checked before any scoring: a saved run (loaded), or a GGUF to evaluate (None)."""
    path = Path(path)
    if path.suffix == ".json":
        return load_run(path)
    read_metadata(path)  # a missing or damaged GGUF is refused now, not after the model's own run
    return None


def evaluate(request: EvalRequest, *, progress: Progress | None = None) -> EvalRun:
    """Score the request's questions; continue a run file of the same settings; return the finished run."""
    root, layout, info = resolve_task(request.task)
    split = request.split or DEFAULT_SPLIT[layout]
    if request.style not in STYLES:
        raise UsageError(f"unknown prompt style {request.style!r}: choose {', '.join(STYLES)}", param="style")
    if request.shots < 0:
        raise UsageError("the number of shots must be 0 or more", param="shots")
    if request.limit is not None and request.limit < 1:
        raise UsageError("the question limit must be at least 1", param="limit")
    available = subjects_in(root, layout, split)
    chosen = list(request.subjects) or available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise UsageError(f"no subject {unknown[0]!r} in {root}/{split} (it has {len(available)}: "
                         f"{', '.join(available[:6])}{', ...' if len(available) > 6 else ''})", param="subjects")
    if not chosen:
        raise InputError(f"{root}/{split} holds no subject files")
    work = _read_work(root, layout, info, split, chosen, request)
    settings = {"model": str(request.model), "model_bytes": Path(request.model).stat().st_size
                if Path(request.model).is_file() else None, "task": layout, "data": str(root), "split": split,
                "shots": request.shots, "template": request.template, "subjects": chosen, "limit": request.limit}
    if request.style != "alpaca3":
        settings["style"] = request.style
    out = Path(request.output) if request.output else default_output(request, split)
    if request.output and is_directory_target(request.output):  # -o DIR/: the default name inside it
        out = output_directory(request.output) / default_output(request, split).name
    check_output_directory(out)  # before the scoring, not after it
    run = EvalRun(settings, {}, path=out, info=info)
    if out.exists() and not request.force:
        old = load_run(out)
        if old.settings != settings:
            raise OutputError(f"{out} holds a run with other settings", param="force")
        run.answers, run.seconds = old.answers, old.seconds
    todo = sum(1 for _, _, qs in work for q in qs if q.key not in run.answers)
    total = sum(len(qs) for _, _, qs in work)
    if todo:
        _score(request, info, work, run, total, progress)
    elif progress:
        progress(total, total)
    run.summary = summarize(info, run.answers)
    _save(run)
    return run


def _read_work(root: Path, layout: str, info: TaskInfo, split: str, chosen: list[str],
               request: EvalRequest) -> list[tuple[Subject, list[Question], list[Question]]]:
    work = []
    for key in chosen:
        subject = info.subjects.get(key) or Subject(key, key.replace("_", " "), ())
        shots: list[Question] = []
        if request.shots:
            dev = read_questions(split_file(root, layout, key, "dev"), layout, key)
            if request.shots > len(dev):
                raise InputError(f"{key} has {len(dev)} dev examples, fewer than {request.shots} shots",
                                 param="shots")
            shots = dev[:request.shots]
        questions = read_questions(split_file(root, layout, key, split), layout, key)
        work.append((subject, shots, questions[:request.limit] if request.limit else questions))
    return work


def _chat(request: EvalRequest, model: Model) -> ChatRenderer | str | None:
    spec = request.template
    if spec == "none":
        return None
    if spec in AUTHORS_TEMPLATES:
        return spec
    if spec == "model":
        text = read_metadata(request.model).chat_template
        if not text:
            raise InputError(f"{request.model} has no chat template (tokenizer.chat_template); name one",
                             param="template")
        source = "the model's"
    else:
        try:
            choice = template_from_spec(spec)
        except UsageError as ex:
            ex.param = "template"  # eval's flag is --template, not --chat-template
            raise
        text, source = choice.text, choice.name or spec
    piece = lambda t: model.piece(t).decode("utf-8", errors="replace") if t >= 0 else ""  # noqa: E731
    return ChatRenderer(text, piece(model.bos), piece(model.eos), source)


def _score(request: EvalRequest, info: TaskInfo, work, run: EvalRun, total: int, progress: Progress | None) -> None:
    seconds0 = run.seconds
    last_save = [time.monotonic()]
    done = [total - sum(1 for _, _, qs in work for q in qs if q.key not in run.answers)]
    with Model(request.model, n_gpu_layers=request.n_gpu_layers) as model, \
            Context(model, n_ctx=request.n_ctx, n_batch=request.n_batch, n_seq=request.n_parallel + 1,
                    threads=request.threads, kv_unified=True,
                    flash_attn=request.flash_attn) as ctx:
        chat = _chat(request, model)
        choice_tokens = ChoiceTokens.of(model, info.language)
        scorer = Scorer(ctx, choice_tokens, n_parallel=request.n_parallel, reuse_prefix=request.reuse_prefix)
        t0 = time.perf_counter()
        if progress:
            progress(done[0], total)
        try:
            for subject, shots, questions in work:
                todo = [q for q in questions if q.key not in run.answers]
                prompts = [tokenize_prompt(model, build_prompt(info, subject, shots, q, chat, request.style))
                           for q in todo]

                def on_scored(i: int, scores, todo=todo) -> None:
                    q = todo[i]
                    run.answers[q.key] = {"answer": q.answer, "predicted": "ABCD"[int(scores.argmax())],
                                          "scores": [round(float(s), 6) for s in scores]}
                    done[0] += 1
                    if progress:
                        progress(done[0], total)
                    if time.monotonic() - last_save[0] > SAVE_EVERY_S:
                        run.seconds = seconds0 + time.perf_counter() - t0
                        _save(run)
                        last_save[0] = time.monotonic()

                scorer.score(prompts, on_scored)
        except KeyboardInterrupt:
            run.seconds = seconds0 + time.perf_counter() - t0
            _save(run)
            raise Interrupted(f"{done[0]} of {total} questions scored, kept in {run.path}; the same command "
                              "continues") from None
    run.seconds = seconds0 + time.perf_counter() - t0


def _save(run: EvalRun) -> None:
    assert run.path is not None
    with atomic_output(run.path) as tmp:
        tmp.write_text(json.dumps(run.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")


def compare(run: EvalRun, baseline: EvalRun) -> dict:
    """The paired comparison against a baseline run (same task and split)."""
    for key in ("task", "split", "shots", "template", "style"):
        if run.settings.get(key) != baseline.settings.get(key):
            raise InputError(f"the baseline run has {key} {baseline.settings.get(key)!r}, this run "
                             f"{run.settings.get(key)!r}", param="baseline")
    return paired(run.answers, baseline.answers).to_dict()


def request_dict(request: EvalRequest) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(request).items()}
