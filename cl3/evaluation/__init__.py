"""Accuracy on multiple-choice exams (C-Eval, CMMLU, MMLU) the model authors' way: ``cl3 eval``.

- ``tasks``: the official file layouts and subject tables (``cl3/data/eval_tasks/``)
- ``prompts``: the prompts, transcribed from the authors' scripts (plain, their Llama-3 chat form, any chat template)
- ``engine``: choice scores from one forward pass per question, the shared few-shot prefix decoded once
- ``stats``: accuracy and standard errors, the paired comparison with a baseline (difference, flips)
- ``run``: the request, the resumable run file, :func:`evaluate`
- ``datasets``: the public copies fetched from the Hugging Face hub into the official layout
"""
