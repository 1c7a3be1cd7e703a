"""spp eval: perplexity against straightforward loops, text construction, local zero-shot vs lm-eval, CLI contract."""

import json
import math
import string
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_model
from spp.cli import app
from spp.errors import SppError
from spp.eval import perplexity as P
from spp.eval import zeroshot as Z
from spp.io.checkpoint import MANIFEST_FILE, RESULTS_FILE, read_json

runner = CliRunner()
ALL_TASKS = list(Z.LOCAL_TASKS)


def char_tokenizer():
    """A character-level fast tokenizer (103 ids < the tiny models' 128) that adds BOS like LLaMA's."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny LLaMA (context 128) with the character tokenizer."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.\n" * 12)
    return path


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def reference_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """One forward per window, float64 log-softmax, summed NLL over the seqlen−1 targets of each window."""
    total, count = 0.0, 0
    for w in range(ids.numel() // seqlen):
        x = ids[w * seqlen : (w + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(x[None]).logits[0].double(), dim=-1)
        total -= sum(logp[t, x[t + 1]].item() for t in range(seqlen - 1))
        count += seqlen - 1
    return math.exp(total / count)


# --------------------------------------------------------------------------- perplexity math


@pytest.mark.parametrize("seqlen,batch_size", [(32, 1), (30, 3)])  # 128 tokens: 30 leaves a partial tail of 8
def test_perplexity_equals_one_forward_per_window(seqlen, batch_size):
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (128,), generator=torch.Generator().manual_seed(1))
    res = P.perplexity(model, ids, seqlen, batch_size=batch_size)
    assert res.windows == 128 // seqlen and res.predicted_tokens == res.windows * (seqlen - 1)
    assert res.ppl == pytest.approx(reference_ppl(model, ids, seqlen), rel=1e-5)
    capped = P.perplexity(model, ids, seqlen, batch_size=batch_size, max_windows=2)
    assert capped.windows == 2
    assert capped.ppl == pytest.approx(reference_ppl(model, ids[: 2 * seqlen], seqlen), rel=1e-5)


def test_windows_are_consecutive_and_drop_the_tail():
    ids = torch.arange(23)
    w = P.perplexity_windows(ids, 5)
    assert w.tolist() == [list(range(k, k + 5)) for k in range(0, 20, 5)]
    assert P.perplexity_windows(ids, 5, max_windows=2).shape == (2, 5)
    with pytest.raises(SppError, match="shorter than one window"):
        P.perplexity(make_tiny_model("llama"), torch.arange(10), 16)


# --------------------------------------------------------------------------- text construction


class _FakeHub:
    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, **kwargs):
        import datasets

        self.calls.append(kwargs)
        return datasets.Dataset.from_dict({"text": self.rows})


def test_wikitext2_and_c4_hub_text(monkeypatch):
    import datasets

    monkeypatch.setattr("spp.hub.hub_unavailable", lambda: None)  # the hub "answers"; load_dataset is faked

    rows = ["", " = Title = ", "", " body line "]
    fake = _FakeHub(rows)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    text = P.ppl_text("wikitext2")
    assert text.text == "\n\n".join(rows)
    assert fake.calls[-1] == dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1", split="test")

    docs = [f"doc{i}" for i in range(1200)]
    fake = _FakeHub(docs)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    text = P.ppl_text("c4")
    assert fake.calls[-1] == dict(path="allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                  split="validation")
    assert text.text == " ".join(docs[:1100])
    ids = P.set_ids(char_tokenizer(), text, seqlen=4)
    assert ids.numel() == 256 * 4  # truncated to 256 windows


def test_hub_failure_and_ptb_explain_the_local_option(monkeypatch):
    import datasets

    monkeypatch.setattr("spp.hub.hub_unavailable", lambda: None)  # reachable, but the load fails

    def offline(**kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SppError, match=r"--ppl wikitext2:PATH"):
        P.ppl_text("wikitext2")
    with pytest.raises(SppError, match="script dataset"):
        P.ppl_text("ptb")
    with pytest.raises(SppError, match="did you mean 'wikitext2'"):
        P.ppl_text("wikitext")


def test_local_texts(tmp_path):
    raw = tmp_path / "wiki.txt"
    raw.write_bytes(b" = A = \r\n\r\n b \r\n")
    assert P.ppl_text(f"wikitext2:{raw}").text == " = A = \n\n b \n"  # text mode, as the protocol reads it
    ptb = tmp_path / "ptb.test.txt"
    ptb.write_text(" a b $\n c d \n")
    assert P.ppl_text(f"ptb:{ptb}").text == "a b $ c d"
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert P.ppl_text(str(docs)).text == "one\n\ntwo"
    ids = P.tokenize_text(char_tokenizer(), "ab")
    assert ids.tolist()[0] == 1 and ids.numel() == 3  # one BOS for the whole text, as the reference


# --------------------------------------------------------------------------- real model vs a transformers loop


def test_stories260k_perplexity_matches_a_transformers_loop(shared_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = shared_data / "stories260K-hf"
    full = (shared_data / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")
    data = tmp_path / "second_half.txt"
    data.write_text(full[len(full) // 2 :], encoding="utf-8")
    out = tmp_path / "out"
    result = cli("eval", "--model", model_dir, "--ppl", data, "--max-windows", 24, "--batch-size", 4,
                 "--output", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([RESULTS_FILE, MANIFEST_FILE])
    entry = read_json(out / RESULTS_FILE)["perplexity"][str(data)]
    assert entry["seqlen"] == 512 and entry["windows"] == 24  # default: the model's context

    # The reference loop: whole text tokenized once, mean loss per window times seqlen.
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(data.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    nlls = []
    for i in range(24):
        x = ids[:, i * 512 : (i + 1) * 512]
        with torch.no_grad():
            logits = model(x).logits
        loss = torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        nlls.append(loss.float() * 512)
    expected = torch.exp(torch.stack(nlls).sum() / (24 * 512)).item()
    assert entry["ppl"] == pytest.approx(expected, rel=1e-5)
    assert entry["total_tokens"] == ids.numel()
    assert read_json(out / MANIFEST_FILE)["stage"] == "eval"


# --------------------------------------------------------------------------- local zero-shot vs lm-eval directly


@pytest.fixture(scope="session")
def local_tasks(shared_data, tmp_path_factory):
    """Converted local data + one TaskManager over it, shared by the zero-shot tests."""
    from lm_eval.tasks import TaskManager

    workdir = tmp_path_factory.mktemp("tasks")
    names = Z.write_local_tasks(ALL_TASKS, shared_data / "eval", workdir)
    return names, TaskManager(include_path=str(workdir), include_defaults=False)


def test_local_zero_shot_equals_lm_eval_directly(shared_data, local_tasks, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names, manager = local_tasks
    model_dir = shared_data / "stories260K-hf"
    out = tmp_path / "zs"
    result = cli("eval", "--model", model_dir, "--tasks", ",".join(ALL_TASKS), "--task-data", shared_data / "eval",
                 "--limit", 20, "--output", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    ours = read_json(out / RESULTS_FILE)["zeroshot"]

    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(model_dir).eval(),
              tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=1)
    direct = simple_evaluate(model=lm, tasks=[names[n] for n in ALL_TASKS], num_fewshot=0, limit=20,
                             task_manager=manager, log_samples=False)["results"]
    for name in ALL_TASKS:
        theirs = direct[names[name]]
        assert ours["tasks"][name]["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12), name
        if "acc_norm,none" in theirs:
            assert ours["tasks"][name]["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12), name
        assert ours["tasks"][name]["n"] == 20
    assert ours["mean_acc"] == pytest.approx(sum(direct[names[n]]["acc,none"] for n in ALL_TASKS) / len(ALL_TASKS))
    assert ours["tasks"]["hellaswag"]["approximate"] and not ours["tasks"]["boolq"].get("approximate")
    assert "hellaswag is approximate" in result.output


def test_local_data_reaches_lm_eval_with_the_published_labels(shared_data, local_tasks):
    """The loaded tasks hold every record, and the target of item 0 is the label of the raw file."""
    names, manager = local_tasks
    tasks = manager.load([names[n] for n in ALL_TASKS])["tasks"]
    data = shared_data / "eval"
    raw_first = {
        "piqa": (1838, int((data / "piqa/valid-labels.lst").read_text().split()[0])),
        "arc_easy": (2376, "ABCD".index(json.loads((data / "arc/ARC-Easy-Test.jsonl").open().readline())["answerKey"])),
        "winogrande": (1267, None),
        "rte": (277, ["entailment", "not_entailment"].index(json.loads((data / "rte/val.jsonl").open().readline())["label"])),
        "openbookqa": (500, json.loads((data / "openbookqa/openbook_qa.jsonl").open().readline())["gold"]),
        "boolq": (3270, 0),  # first CSV row: label 0 ("no")
        "hellaswag": (10042, 3),
        "arc_challenge": (1172, None),
    }
    for name, (count, target) in raw_first.items():
        task = tasks[names[name]]
        docs = list(task.eval_docs)
        assert len(docs) == count, name
        if target is not None:
            assert task.doc_to_target(docs[0]) == target, name


def test_converters_map_published_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"query": "Q?", "choices": ["w", "x", "y", "z"], "gold": 2}\n')
    assert Z.openbookqa_rows([tmp_path / "a.jsonl"]) == [
        {"id": "0", "question_stem": "Q?", "choices": {"text": ["w", "x", "y", "z"], "label": list("ABCD")},
         "answerKey": "C"}]
    (tmp_path / "w.jsonl").write_text('{"sentence": "A _ b", "option1": "x", "option2": "y"}\n')
    (tmp_path / "w.lst").write_text("2\n")
    assert Z.winogrande_rows([tmp_path / "w.jsonl", tmp_path / "w.lst"])[0]["answer"] == "2"
    (tmp_path / "r.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": "not_entailment", "idx": 0}\n')
    assert Z.rte_rows([tmp_path / "r.jsonl"])[0] == {"sentence1": "p", "sentence2": "h", "label": 1, "idx": 0}
    (tmp_path / "b.csv").write_text('question,passage,idx,label\nq,"T -- p",0,1\n')
    assert Z.boolq_rows([tmp_path / "b.csv"])[0] == {"question": "q", "passage": "T -- p", "label": 1, "idx": 0}
    (tmp_path / "h.txt").write_text("Act: ctx here\n1\ne0\ne1\ne2\ne3\n")
    row = Z.hellaswag_rows([tmp_path / "h.txt"])[0]
    assert (row["activity_label"], row["ctx_a"], row["endings"], row["label"]) == ("Act", "ctx here", ["e0", "e1", "e2", "e3"], "1")
    (tmp_path / "p.lst").write_text("0\n1\n")
    with pytest.raises(SppError, match="2 labels but its data file has 1"):
        Z.piqa_rows([tmp_path / "w.jsonl", tmp_path / "p.lst"])


# --------------------------------------------------------------------------- CLI contract


def _bad_inputs(tiny_dir, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    partial = tmp_path / "td"
    (partial / "piqa").mkdir(parents=True)
    (partial / "piqa" / "valid.jsonl").write_text("{}\n")
    return {
        "unknown task": (["--tasks", "boolqq", "--task-data", partial], "close matches: boolq"),
        "task file missing": (["--tasks", "piqa", "--task-data", partial], "valid-labels.lst"),
        "ppl file missing": (["--ppl", tmp_path / "nope.txt"], "does not exist"),
        "ppl shorter than a window": (["--ppl", short], "fewer than one window"),
        "seqlen above context": (["--ppl", text_file, "--seqlen", 256], "--seqlen 256 is above the model's context of 128"),
        "ptb from the hub": (["--ppl", "ptb"], "ptb:PATH"),
        "unknown set name": (["--ppl", f"tinystories:{text_file}"], "'tinystories' is not a set name"),
        "nothing to evaluate": ([], "nothing to evaluate"),
    }


@pytest.mark.parametrize("case", ["unknown task", "task file missing", "ppl file missing", "ppl shorter than a window",
                                  "seqlen above context", "ptb from the hub", "unknown set name", "nothing to evaluate"])
def test_bad_inputs_fail_with_one_line(case, tiny_dir, text_file, tmp_path):
    args, expected = _bad_inputs(tiny_dir, text_file, tmp_path)[case]
    out = tmp_path / "out"
    result = cli("eval", "--model", tiny_dir, *args, "--output", out, "--device", "cpu")
    _assert_one_error(result, expected)
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_task_data_defaults_to_spp_task_data(tiny_dir, text_file, tmp_path, monkeypatch):
    args, expected = _bad_inputs(tiny_dir, text_file, tmp_path)["task file missing"]
    monkeypatch.setenv("SPP_TASK_DATA", str(args[-1]))  # no --task-data: $SPP_TASK_DATA is the directory read
    out = tmp_path / "out"
    result = cli("eval", "--model", tiny_dir, *args[:-2], "--output", out, "--device", "cpu")
    _assert_one_error(result, expected)
    assert f"--task-data {args[-1]}" in result.stderr and not out.exists()


def _assert_one_error(result, expected):
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_tiny_model_run_writes_results_and_compare_lines_them_up(tiny_dir, text_file, tmp_path):
    a, b = tmp_path / "dense", tmp_path / "other"
    assert cli("eval", "--model", tiny_dir, "--ppl", text_file, "--output", a, "--device", "cpu").exit_code == 0
    assert cli("eval", "--model", tiny_dir, "--ppl", text_file, "--seqlen", 64, "--output", b,
               "--device", "cpu").exit_code == 0
    ra, rb = read_json(a / RESULTS_FILE), read_json(b / RESULTS_FILE)
    assert ra["seqlen"] == 128 and rb["seqlen"] == 64
    again = cli("eval", "--model", tiny_dir, "--ppl", text_file, "--output", a, "--device", "cpu")
    _assert_one_error(again, "already exists")
    result = cli("eval", "--compare", a, b / RESULTS_FILE)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "dense" in lines[0] and "other" in lines[0]
    row128 = next(line for line in lines if "@128" in line)
    assert f"{ra['perplexity'][str(text_file)]['ppl']:.4f}" in row128 and "—" in row128
    _assert_one_error(cli("eval", "--compare", tmp_path / "missing"), "no results.json")


# --------------------------------------------------------------------------- adapter


@pytest.fixture(scope="session")
def pruned_adapter_merged(tmp_path_factory, tiny_dir):
    """A magnitude-pruned tiny model with its mask file, an SPP adapter with non-zero β, and the merged model."""
    pytest.importorskip("spp.adapter.model")
    from spp.adapter.config import AdapterConfig
    from spp.adapter.model import add_adapter, merge_adapter, save_adapter
    from spp.io.checkpoint import MASK_FILE, save_model, sha256_file
    from spp.io.maskfile import save_masks
    from spp.models import decoder_targets
    from spp.prune.masks import apply_mask, unstructured_mask

    root = tmp_path_factory.mktemp("spp")
    model, tok = make_tiny_model("llama"), char_tokenizer()
    masks = {}
    with torch.no_grad():
        for targets in decoder_targets(model):
            for target in targets.values():
                keep = unstructured_mask(target.weight.abs(), 0.5)
                target.weight.copy_(apply_mask(target.weight, keep))
                masks[target.param] = keep
    pruned = root / "pruned"
    save_model(model, tok, pruned)
    save_masks(pruned / MASK_FILE, masks, {k: "linear" for k in masks})
    cfg = AdapterConfig(spp_row_groups=4, mask_sha256=sha256_file(pruned / MASK_FILE), base_model=str(pruned))
    add_adapter(model, cfg, masks)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("spp_alpha", "spp_beta")):
                p.copy_(torch.randn_like(p) * 0.5)
    adapter = root / "adapter"
    save_adapter(model, cfg, adapter)
    merged = root / "merged"
    save_model(merge_adapter(model, masks), tok, merged)
    (merged / MASK_FILE).parent.mkdir(exist_ok=True)
    (merged / MASK_FILE).write_bytes((pruned / MASK_FILE).read_bytes())
    return pruned, adapter, merged


def test_adapter_equals_merged_model(pruned_adapter_merged, text_file, tmp_path):
    pruned, adapter, merged = pruned_adapter_merged
    ppl = {}
    for name, args in {"unmerged": ["--model", pruned, "--adapter", adapter], "merged": ["--model", merged],
                       "base": ["--model", pruned]}.items():
        out = tmp_path / name
        result = cli("eval", *args, "--ppl", text_file, "--output", out, "--device", "cpu")
        assert result.exit_code == 0, result.output
        results = read_json(out / RESULTS_FILE)
        ppl[name] = results["perplexity"][str(text_file)]["ppl"]
        assert results["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert ppl["unmerged"] == pytest.approx(ppl["merged"], rel=1e-5)
    assert abs(ppl["unmerged"] - ppl["base"]) > 1e-3 * ppl["base"]  # the adapter does something


def test_adapter_for_another_base_is_refused(pruned_adapter_merged, tiny_dir, text_file, tmp_path):
    pruned, adapter, _ = pruned_adapter_merged
    other = tmp_path / "other_adapter"
    other.mkdir()
    config = read_json(adapter / "adapter_config.json")
    config["mask_sha256"] = "0" * 64
    (other / "adapter_config.json").write_text(json.dumps(config))
    (other / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    out = tmp_path / "out"
    _assert_one_error(cli("eval", "--model", pruned, "--adapter", other, "--ppl", text_file, "--output", out),
                      "different base")
    _assert_one_error(cli("eval", "--model", tiny_dir, "--adapter", adapter, "--ppl", text_file, "--output", out),
                      "masks.safetensors")
    assert not out.exists()


def test_an_adapter_is_not_applied_to_the_model_it_is_merged_into(pruned_adapter_merged, text_file, tmp_path):
    """`spp merge` keeps the mask file byte for byte, so only the merge manifest's record of the adapter file tells
    the merged model from its base: --adapter on it would add the adapter twice."""
    from spp.config import MergeConfig
    from spp.merge import run_merge

    pruned, adapter, _ = pruned_adapter_merged
    merged = tmp_path / "merged"
    run_merge(MergeConfig(model=str(pruned), adapter=str(adapter), output=str(merged)))
    out = tmp_path / "out"
    _assert_one_error(cli("eval", "--model", merged, "--adapter", adapter, "--ppl", text_file, "--output", out),
                      f"is already merged into {merged}")
    assert not out.exists()


def test_lm_eval_wikitext_is_labelled_word_perplexity():
    from spp.eval import results_rows

    metrics = Z.task_metrics({"word_perplexity,none": 31.5, "byte_perplexity,none": 1.9, "alias": "wikitext",
                              "acc,other_filter": 0.1}, {"effective": 62})
    assert metrics == {"word_perplexity": 31.5, "byte_perplexity": 1.9, "n": 62}
    rows = dict(results_rows({"zeroshot": {"tasks": {"wikitext": {**metrics, "note": Z.WORD_PPL_NOTE}}, "mean_acc": None}}))
    assert rows == {"wikitext word_perplexity (lm-eval; not token ppl)": "31.5000",
                    "wikitext byte_perplexity (lm-eval; not token ppl)": "1.9000"}


def test_boolq_jsonl_labels(tmp_path):
    (tmp_path / "val.jsonl").write_text('{"question": "q", "passage": "p", "label": true}\n'
                                        '{"question": "q", "passage": "p", "label": false}\n')
    assert [r["label"] for r in Z.boolq_rows([tmp_path / "val.jsonl"])] == [1, 0]


# --------------------------------------------------------------------------- set names are protocols


def test_wiki_test_raw_layout_becomes_the_hub_rows():
    raw = " \n = A = \n \n b \n"  # wiki.test.raw: one row per line, " " for an empty row
    assert P.wikitext_raw_rows(raw) == "\n\n".join(["", " = A = \n", "", " b \n"])  # the hub's rows joined


def test_wikitext2_local_copies_share_one_label_and_one_perplexity(shared_data, tmp_path):
    """wiki.test.raw and the hub's wikitext-test.txt (CRLF) are the same test set: same label, same number."""
    raw_dir = shared_data / "wikitext-2-raw"
    out = tmp_path / "out"
    specs = [f"wikitext2:{raw_dir / 'wiki.test.raw'}", f"wikitext2:{raw_dir / 'wikitext-test.txt'}"]
    result = cli("eval", "--model", shared_data / "stories260K-hf", "--ppl", ",".join(specs), "--seqlen", 256,
                 "--max-windows", 3, "--output", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    first, second = read_json(out / RESULTS_FILE)["perplexity"].values()
    for entry in (first, second):
        assert (entry["set"], entry["label"], entry["protocol_verified"]) == ("wikitext2", "wikitext2", True)
        assert entry["text_sha256"] == P.PROTOCOL_SHA256["wikitext2"] and entry["windows"] == 3
    assert first["ppl"] == second["ppl"]
    crlf_raw = tmp_path / "wiki.test.raw"  # the CRLF copies of wiki.test.raw found in the wild
    crlf_raw.write_bytes((raw_dir / "wiki.test.raw").read_bytes().replace(b"\n", b"\r\n"))
    assert P.ppl_text(f"wikitext2:{crlf_raw}").text_sha256 == P.PROTOCOL_SHA256["wikitext2"]


def test_other_texts_are_labelled_by_their_file_name(shared_data, tmp_path, capsys):
    other = tmp_path / "notes.txt"
    other.write_text(" = Not WikiText = \n\n some other text \n")
    text = P.ppl_text(f"wikitext2:{other}")
    warnings = capsys.readouterr().err.strip().splitlines()
    assert text.name == str(other) and text.protocol == "wikitext2" and text.verified is False
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and f"labelled {other}, not wikitext2" in warnings[0]

    c4 = P.ppl_text(f"c4:{shared_data / 'c4' / 'c4_sample.jsonl'}")  # a train sample: spp has no c4 hash anyway
    assert c4.name.endswith("c4_sample.jsonl") and c4.verified is None
    assert "no canonical hash" in capsys.readouterr().err

    ptb = P.ppl_text(f"ptb:{shared_data / 'ptb' / 'ptb.test.txt'}")  # the file ptb_text_only downloads
    assert (ptb.name, ptb.verified) == ("ptb", True) and capsys.readouterr().err == ""
    valid = P.ppl_text(f"ptb:{shared_data / 'ptb' / 'ptb.valid.txt'}")  # not the test set
    assert valid.name.endswith("ptb.valid.txt") and valid.verified is False
