"""Zero-shot accuracy through lm-eval's own registered tasks, from the hub or from local files.

The model is evaluated in memory (`HFLM(pretrained=<loaded model>)`) with lm-eval's
`simple_evaluate`, so prompts and metrics are exactly lm-eval's. Offline, a local copy
of each data set in its published format is converted to the columns the registered
task reads, and a task YAML is written that `include:`s the registered YAML and only
swaps the data: `dataset_path: json`, `dataset_kwargs.data_files`, `training_split: null`
(else lm-eval looks for a train split even at 0-shot), renamed `<task>_local`. lm-eval is
imported inside the functions so that `spp --help` stays fast.

Expected files under the task-data directory (the layout of `shared/data/eval/`):

    boolq/boolq_validation.csv (or boolq/val.jsonl)   piqa/valid.jsonl + piqa/valid-labels.lst
    arc/ARC-Easy-Test.jsonl  arc/ARC-Challenge-Test.jsonl   winogrande/dev.jsonl + winogrande/dev-labels.lst
    rte/val.jsonl            openbookqa/openbook_qa.jsonl   hellaswag/hellaswag_val_full.txt.bz2 (approximate)
"""

from __future__ import annotations

import bz2
import csv
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from spp.data import read_jsonl
from spp.errors import SppError, first_line

LOCAL_SUFFIX = "_local"
WORD_PPL_NOTE = "lm-eval's word perplexity over whole documents, not the Wanda/SparseGPT token perplexity"


@dataclass(frozen=True)
class LocalTask:
    """How one registered lm-eval task is fed from local files."""

    yaml: str  # the registered task's YAML, relative to lm_eval/tasks
    files: tuple[tuple[str, ...], ...]  # alternatives of required files, relative to the task-data dir
    split: str  # the split the registered task evaluates: "validation" or "test"
    convert: Callable[[list[Path]], list[dict]]
    approximate: str | None = None  # why the local copy cannot match the hub data exactly


# --------------------------------------------------------------------------- converters (pure: files -> rows)


def _labels(path: Path, n: int) -> list[str]:
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != n:
        raise SppError(f"{path} has {len(labels)} labels but its data file has {n} records")
    return labels


def _need(row: dict, keys: tuple[str, ...], path: Path, i: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise SppError(f"{path}: record {i} lacks {', '.join(missing)}")


def boolq_rows(paths: list[Path]) -> list[dict]:
    """SuperGLUE BoolQ validation (CSV question,passage,idx,label with 1 = yes; or JSONL with true/false)."""
    (path,) = paths
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f))
    else:
        records = read_jsonl(path)
    rows = []
    for i, r in enumerate(records):
        _need(r, ("question", "passage", "label"), path, i)
        label = r["label"]  # CSV: "0"/"1"; SuperGLUE JSONL: false/true
        if isinstance(label, str):
            label = label.strip().lower() in ("1", "true")
        rows.append({"question": r["question"], "passage": r["passage"], "label": int(label), "idx": i})
    return rows


def piqa_rows(paths: list[Path]) -> list[dict]:
    """PIQA `valid.jsonl` + `valid-labels.lst` -> goal, sol1, sol2, label (0/1)."""
    data, labels_path = paths
    records = read_jsonl(data)
    labels = _labels(labels_path, len(records))
    for i, r in enumerate(records):
        _need(r, ("goal", "sol1", "sol2"), data, i)
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(records, labels)]


def arc_rows(paths: list[Path]) -> list[dict]:
    """ARC `ARC-*-Test.jsonl` (nested question.stem/choices) -> question, choices{text,label}, answerKey."""
    (path,) = paths
    rows = []
    for i, r in enumerate(read_jsonl(path)):
        _need(r, ("question", "answerKey"), path, i)
        q = r["question"]
        rows.append({
            "id": r.get("id", str(i)),
            "question": q["stem"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
            "answerKey": r["answerKey"],
        })
    return rows


def winogrande_rows(paths: list[Path]) -> list[dict]:
    """WinoGrande `dev.jsonl` + `dev-labels.lst` -> sentence, option1, option2, answer ("1"/"2")."""
    data, labels_path = paths
    records = read_jsonl(data)
    labels = _labels(labels_path, len(records))
    rows = []
    for i, (r, y) in enumerate(zip(records, labels)):
        _need(r, ("sentence", "option1", "option2"), data, i)
        rows.append({"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y})
    return rows


def rte_rows(paths: list[Path]) -> list[dict]:
    """SuperGLUE-style RTE (premise, hypothesis, entailment/not_entailment) -> GLUE columns, label 0 = entailment."""
    (path,) = paths
    rows = []
    for i, r in enumerate(read_jsonl(path)):
        _need(r, ("premise", "hypothesis", "label"), path, i)
        label = r["label"]
        if isinstance(label, str):
            if label not in ("entailment", "not_entailment"):
                raise SppError(f"{path}: record {i} has label {label!r}, expected entailment or not_entailment")
            label = int(label == "not_entailment")
        rows.append({"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": int(label), "idx": i})
    return rows


def openbookqa_rows(paths: list[Path]) -> list[dict]:
    """OpenBookQA as {query, choices[4], gold} -> question_stem, choices{text,label A-D}, answerKey."""
    (path,) = paths
    rows = []
    for i, r in enumerate(read_jsonl(path)):
        _need(r, ("query", "choices", "gold"), path, i)
        letters = [chr(ord("A") + k) for k in range(len(r["choices"]))]
        rows.append({"id": str(i), "question_stem": r["query"], "choices": {"text": list(r["choices"]), "label": letters},
                     "answerKey": letters[int(r["gold"])]})
    return rows


def hellaswag_rows(paths: list[Path]) -> list[dict]:
    """The pre-joined HellaSwag text (6 lines per item: "label: context", gold, 4 endings) -> lm-eval's columns.

    Approximate: the context arrives already joined, so `ctx_b` is empty and lm-eval's
    `ctx_a + " " + ctx_b.capitalize()` cannot be reproduced.
    """
    (path,) = paths
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) % 6:
        raise SppError(f"{path} has {len(lines)} lines; expected 6 per item (context, label, 4 endings)")
    rows = []
    for k in range(0, len(lines), 6):
        head, gold, endings = lines[k], lines[k + 1].strip(), lines[k + 2 : k + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or gold not in ("0", "1", "2", "3"):
            raise SppError(f"{path}:{k + 1} is not an item header ('activity: context' then a label 0-3)")
        rows.append({"ind": k // 6, "activity_label": activity, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": endings, "label": gold, "split": "val", "split_type": "indomain", "source_id": ""})
    return rows


LOCAL_TASKS: dict[str, LocalTask] = {
    "boolq": LocalTask("super_glue/boolq/default.yaml", (("boolq/boolq_validation.csv",), ("boolq/val.jsonl",)),
                       "validation", boolq_rows),
    "piqa": LocalTask("piqa/piqa.yaml", (("piqa/valid.jsonl", "piqa/valid-labels.lst"),), "validation", piqa_rows),
    "arc_easy": LocalTask("arc/arc_easy.yaml", (("arc/ARC-Easy-Test.jsonl",),), "test", arc_rows),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", (("arc/ARC-Challenge-Test.jsonl",),), "test", arc_rows),
    "winogrande": LocalTask("winogrande/default.yaml", (("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),),
                            "validation", winogrande_rows),
    "rte": LocalTask("glue/rte/default.yaml", (("rte/val.jsonl",),), "validation", rte_rows),
    "openbookqa": LocalTask("openbookqa/openbookqa.yaml", (("openbookqa/openbook_qa.jsonl",),), "test",
                            openbookqa_rows),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml",
                           (("hellaswag/hellaswag_val_full.txt.bz2",), ("hellaswag/hellaswag_val_full.txt",)),
                           "validation", hellaswag_rows,
                           approximate="local HellaSwag text is pre-joined; lm-eval's ctx_a + ctx_b.capitalize() "
                                       "preprocessing cannot be reproduced, so this is close to but not the "
                                       "published number"),
}


# --------------------------------------------------------------------------- task setup


def _close(name: str, choices) -> str:
    matches = difflib.get_close_matches(name, list(choices), n=5, cutoff=0.6)
    return f"; close matches: {', '.join(matches)}" if matches else ""


def local_task_files(name: str, task_data: Path) -> list[Path]:
    """The files of `name` under `task_data` (the first complete alternative).

    Raises:
        SppError: an unknown task (with close matches) or a missing file (naming the file expected).
    """
    if name not in LOCAL_TASKS:
        raise SppError(
            f"unknown task {name!r} for --task-data{_close(name, LOCAL_TASKS)} "
            f"(tasks with local data: {', '.join(LOCAL_TASKS)})"
        )
    alternatives = LOCAL_TASKS[name].files
    for files in alternatives:
        paths = [task_data / f for f in files]
        if all(p.is_file() for p in paths):
            return paths
    missing = next(p for p in (task_data / f for f in alternatives[0]) if not p.is_file())
    return_hint = f" (or {' + '.join(alternatives[1])})" if len(alternatives) > 1 else ""
    raise SppError(f"--task-data {task_data}: task {name} needs {missing}{return_hint}, which does not exist")


def registered_yaml(relative: str) -> Path | None:
    """Absolute path of a registered task YAML inside the installed lm_eval (found without importing it), or None
    when lm_eval is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    return Path(spec.origin).parent / "tasks" / relative if spec is not None and spec.origin else None


def write_local_tasks(names: list[str], task_data: Path, workdir: Path) -> dict[str, str]:
    """Convert the local data of each task and write a task YAML for it into `workdir`.

    Returns:
        requested name -> the lm-eval task name to run (`<name>_local`).

    Raises:
        SppError: unknown task, missing or malformed file.
    """
    import yaml

    task_data, workdir = Path(task_data), Path(workdir)
    if not task_data.is_dir():
        raise SppError(f"--task-data {task_data} is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        spec = LOCAL_TASKS.get(name)
        paths = local_task_files(name, task_data)
        try:
            rows = spec.convert(paths)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SppError(f"--task-data: {paths[0]} is not in the expected {name} format ({exc!r})") from exc
        except UnicodeDecodeError as exc:
            raise SppError(f"--task-data: {paths[0]} is not UTF-8 text") from exc
        data_file = workdir / f"{name}.jsonl"
        with open(data_file, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        task = name + LOCAL_SUFFIX
        config = {
            "include": str(registered_yaml(spec.yaml)),
            "task": task,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.split: str(data_file)}, "cache_dir": str(workdir / "hf_cache")},
            "training_split": None,
            "validation_split": "validation" if spec.split == "validation" else None,
            "test_split": "test" if spec.split == "test" else None,
        }
        (workdir / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        out[name] = task
    return out


@dataclass
class TaskSetup:
    """What `evaluate_tasks` runs: lm-eval task names, their manager, and where their data came from."""

    task_manager: object
    lm_eval_names: dict[str, str]  # requested name -> lm-eval task name
    sources: dict[str, dict] = field(default_factory=dict)  # requested name -> {files: {path: sha256}, approximate}
    loaded: dict = field(default_factory=dict)  # lm-eval task name -> Task


def registered_dataset(name: str) -> str | None:
    """The hub dataset a registered task of LOCAL_TASKS reads (its YAML's `dataset_path`), else None."""
    import re

    task_yaml = registered_yaml(LOCAL_TASKS[name].yaml) if name in LOCAL_TASKS else None
    if task_yaml is None:
        return None
    for _ in range(3):  # a task YAML may take its dataset from the file it `include:`s (arc_challenge)
        text = task_yaml.read_text(encoding="utf-8") if task_yaml.is_file() else ""
        found = re.search(r"^dataset_path:\s*(\S+)", text, re.M)
        if found:
            return found.group(1).strip("'\"")
        included = re.search(r"^include:\s*(\S+)", text, re.M)
        if not included:
            return None
        task_yaml = task_yaml.parent / included.group(1).strip("'\"")
    return None


def check_hub_tasks(names: list[str]) -> None:
    """`--tasks` without `--task-data` reads the hub: stop at once, naming --task-data, when it cannot be used.

    Raises:
        SppError: the hub cannot be used and a task's dataset is not in the local cache.
    """
    from spp.hub import require_hub

    for name in names:
        require_hub(f"--tasks {name} (without --task-data)", registered_dataset(name) or name, "dataset",
                    "pass --task-data DIR (or set $SPP_TASK_DATA) with local copies; see README, spp eval")


def prepare_tasks(names: list[str], task_data: str | None, workdir: Path) -> TaskSetup:
    """Check the task names and load their data (before the model is loaded), local or from the hub.

    Raises:
        SppError: unknown task (with close matches), missing local file, or data that cannot be loaded.
    """
    from lm_eval.tasks import TaskManager

    from spp.io.checkpoint import sha256_file

    if task_data is not None:
        mapping = write_local_tasks(names, Path(task_data), workdir)
        manager = TaskManager(include_path=str(workdir), include_defaults=False)
        sources = {}
        for name in names:
            files = local_task_files(name, Path(task_data))
            sources[name] = {"files": {str(p): sha256_file(p) for p in files}, "approximate": LOCAL_TASKS[name].approximate}
    else:
        manager = TaskManager()
        for name in names:
            if name not in manager.all_tasks:
                raise SppError(f"unknown task {name!r}{_close(name, manager.all_tasks)}")
        mapping = {name: name for name in names}
        sources = {name: {"hub": True, "approximate": None} for name in names}
    try:
        loaded = manager.load(list(mapping.values()))["tasks"]
    except SppError:
        raise
    except Exception as exc:  # hub unreachable, dataset missing: tell the user how to run offline
        first = first_line(exc)
        hint = "" if task_data is not None else "; without internet pass --task-data DIR (see README, spp eval)"
        raise SppError(f"cannot load the data of tasks {', '.join(names)}: {first}{hint}") from exc
    return TaskSetup(manager, mapping, sources, loaded)


def evaluate_tasks(model, tokenizer, setup: TaskSetup, limit: int | None = None, batch_size: int | None = None,
                   num_fewshot: int = 0) -> dict:
    """Run every prepared task in one `simple_evaluate` call on the in-memory model, one progress bar per task.

    Args:
        batch_size: distinct contexts per forward pass (`spp.eval.loglikelihood`); None: the device's default.

    Returns:
        {"tasks": {name: {acc, acc_stderr, acc_norm?, acc_norm_stderr?, n, lm_eval_task, item_acc, baseline, ...}},
         "mean_acc": mean of `acc` over the tasks that report it, "lm_eval_version": str}; `item_acc` and the
        baseline fields are those of `item_scores`.
    """
    import lm_eval
    from lm_eval import simple_evaluate
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from spp.eval.loglikelihood import SharedContextLM
    from spp.eval.uncertainty import headline_tasks

    labels = {lm_name: name for name, lm_name in setup.lm_eval_names.items()}
    columns = (TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        lm = SharedContextLM(model, tokenizer, batch_size, progress, labels)
        out = simple_evaluate(model=lm, tasks=list(setup.loaded.values()), num_fewshot=num_fewshot, limit=limit,
                              task_manager=setup.task_manager, log_samples=True)
    tasks = {}
    for name, lm_name in setup.lm_eval_names.items():
        tasks[name] = task_metrics(out["results"][lm_name], out.get("n-samples", {}).get(lm_name, {}))
        tasks[name]["lm_eval_task"] = lm_name
        tasks[name].update({k: v for k, v in setup.sources.get(name, {}).items() if v is not None})
        if lm_name == "wikitext":
            tasks[name]["note"] = WORD_PPL_NOTE
        elif "acc" in tasks[name]:
            tasks[name].update(item_scores(out["samples"][lm_name]))
    accs = [t["acc"] for t in tasks.values() if "acc" in t]
    headline = headline_tasks(tasks)
    return {"tasks": tasks, "mean_acc": sum(accs) / len(accs) if accs else None,
            "headline_tasks": headline,  # above their baseline by 2 stderrs (spp.eval.uncertainty)
            "headline_mean_acc": sum(tasks[n]["acc"] for n in headline) / len(headline) if headline else None,
            "lm_eval_version": lm_eval.__version__}


NEAR_TIE = 1e-4  # nats: choices closer than this may swap under float rounding (another batch shape, device)


def item_scores(samples: list[dict]) -> dict:
    """Per-item results of one multiple-choice task from lm-eval's logged samples, in item order.

    Returns:
        item_acc (and item_acc_norm): 0/1 per item, for paired comparisons (`spp.eval.uncertainty`);
        near_ties: items whose two best choices' log-likelihoods differ by less than `NEAR_TIE`;
        baseline: chance, the mean over items of 1/(number of choices); or, when every item offers the same
        answers (BoolQ's yes/no, RTE's True/False), the larger of chance and the majority-class rate, the share of
        items whose answer is the most common one; baseline_kind: "chance" or "majority".
    """
    samples = sorted(samples, key=lambda sample: sample["doc_id"])
    out = {"item_acc": [int(sample["acc"]) for sample in samples]}
    if all("acc_norm" in sample for sample in samples):
        out["item_acc_norm"] = [int(sample["acc_norm"]) for sample in samples]
    lls = [sorted((float(resp[0]) for resp in sample["filtered_resps"]), reverse=True) for sample in samples]
    out["near_ties"] = sum(1 for ll in lls if len(ll) > 1 and ll[0] - ll[1] < NEAR_TIE)
    out["baseline"], out["baseline_kind"] = sum(1 / len(ll) for ll in lls) / len(samples), "chance"
    if len({tuple(str(arg[-1]) for arg in sample["arguments"]) for sample in samples}) == 1:  # one answer set
        targets = [str(sample["target"]) for sample in samples]
        majority = max(targets.count(t) for t in set(targets)) / len(samples)
        if majority > out["baseline"]:
            out["baseline"], out["baseline_kind"] = majority, "majority"
    return out


def task_metrics(result: dict, n_samples: dict) -> dict:
    """lm-eval's `{"acc,none": x, "acc_stderr,none": s, ...}` -> `{"acc": x, "acc_stderr": s, ...}` (filter "none")."""
    metrics = {}
    for key, value in result.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)):
            metrics[metric] = float(value)
    if "effective" in n_samples:
        metrics["n"] = int(n_samples["effective"])
    return metrics
