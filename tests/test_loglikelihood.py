"""spp.eval.loglikelihood: each distinct context run once gives lm-eval's batch_size=1 answers, item by item."""

import pytest

from spp.eval import zeroshot as Z


def test_batched_equals_batch_size_one_item_by_item(shared_data, tmp_path):
    """BoolQ (long passages, some truncated to the 512-token context; one-token answers) and ARC-Easy (3 to 5
    answers of several tokens: the cached second pass), 12 items each, 5 contexts per forward, against HFLM at
    batch_size=1. (HellaSwag would take 20 s more to prepare.)"""
    import torch
    from lm_eval.models.huggingface import HFLM

    from spp.eval.loglikelihood import SharedContextLM, chosen_answers
    from spp.models import load_model, load_tokenizer

    model_dir = shared_data / "stories260K-hf"
    setup = Z.prepare_tasks(["boolq", "arc_easy"], str(shared_data / "eval"), tmp_path)
    model = load_model(str(model_dir), "float32", torch.device("cpu"))
    tokenizer = load_tokenizer(str(model_dir))
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    batched = SharedContextLM(model, tokenizer, batch_size=5)
    for name, lm_name in setup.lm_eval_names.items():
        task = setup.loaded[lm_name]
        task.build_all_requests(limit=12, rank=0, world_size=1)
        instances = [inst for inst in task.instances if inst.request_type == "loglikelihood"]
        pairs = [reference._encode_pair(*inst.args) for inst in instances]
        if name == "boolq":  # the cases the two passes must get right are really there
            assert any(len(c) + len(y) > reference.max_length + 1 for c, y in pairs), "no truncated request"
        else:
            assert min(len(y) for _, y in pairs) > 1 and len({len(c) for c, _ in pairs}) > 1
        ours = batched.loglikelihood(instances)
        theirs = reference.loglikelihood(instances, disable_tqdm=True)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs):
            assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-4), name
            assert greedy == ref_greedy, name
        a, b = chosen_answers(instances, theirs), chosen_answers(instances, ours)
        changed = [doc for doc in a if a[doc][0] != b[doc][0]]
        assert all(min(a[doc][1], b[doc][1]) < Z.NEAR_TIE for doc in changed), (name, changed)
        assert len(a) == 12


def test_a_forward_without_logits_to_keep_is_scored_by_lm_eval_itself(shared_data, tmp_path, monkeypatch):
    """Older remote code takes neither `logits_to_keep` nor a cache: such a model gets HFLM's own path (the same
    numbers as batch_size=1 HFLM) instead of a TypeError from the shared-context path."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from spp.eval import loglikelihood as L
    from spp.hf import scores_chosen_positions
    from spp.models import load_model, load_tokenizer

    class OldForward(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    model_dir = shared_data / "stories260K-hf"
    model = load_model(str(model_dir), "float32", torch.device("cpu"))
    assert scores_chosen_positions(model) and not scores_chosen_positions(OldForward())
    setup = Z.prepare_tasks(["boolq"], str(shared_data / "eval"), tmp_path)
    task = setup.loaded[setup.lm_eval_names["boolq"]]
    task.build_all_requests(limit=4, rank=0, world_size=1)
    instances = [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    tokenizer = load_tokenizer(str(model_dir))
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(instances, disable_tqdm=True)
    monkeypatch.setattr(L, "scores_chosen_positions", lambda model: False)
    monkeypatch.setattr(L, "continuation_logprobs", lambda *a, **k: pytest.fail("the shared-context path ran"))
    assert L.SharedContextLM(model, tokenizer, batch_size=1).loglikelihood(instances) == theirs
