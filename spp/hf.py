"""transformers' loading rules and every transformers internal spp leans on, in one place.

spp reads checkpoints exactly as transformers does (names, weight converters, the loader's own verdict), which
no public API exposes. Each such use is a function here, so an upgrade that moves one breaks one function, and
`tests/test_hf.py` names it. No other spp module imports from `transformers.core_model_loading`,
`transformers.conversion_mapping`, `transformers.integrations` or `transformers.quantizers`, or reads a private
attribute of a transformers class.

Hub kernels: since 5.25, `from_pretrained` defaults to `use_kernels=True` and lets the `kernels` package replace
modules (RMSNorm, MLPs, ...) with code fetched from the hub. spp never allows it: every load goes through
`from_pretrained` here, which passes `use_kernels=False`, so numerics (and spp's bitwise claims) do not depend on
whether `kernels` is installed or what it downloads, and no stage reaches for the network to fetch code.
"""

from __future__ import annotations

from typing import Any

from spp.errors import SppError, first_line

# The transformers releases the suite passed on (pyproject.toml admits this range, capped below the next minor).
TESTED = "5.17–5.25"


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def moved(api: str, exc: BaseException | None = None) -> SppError:
    """The one-line error for a transformers internal that is gone or changed: names the API and the versions spp
    was tested with, and points to `spp env`."""
    why = f": {first_line(exc)}" if exc is not None and str(exc) else ""
    return SppError(f"transformers {transformers_version()} changed {api}, which spp uses (tested with transformers "
                    f"{TESTED}){why}; install the pinned versions (constraints.txt) and see `spp env`")


def transformers_failed(exc: BaseException, doing: str) -> SppError:
    """The one-line error for an exception raised inside transformers itself (not a verdict on the user's files)."""
    first = first_line(exc)
    return SppError(f"transformers {transformers_version()} failed while {doing}: {type(exc).__name__}: {first} "
                    f"(spp is tested with transformers {TESTED}; `spp env` prints the versions for a bug report)")


def from_pretrained(model_class, *args, **kwargs):
    """`model_class.from_pretrained(*args, **kwargs)` with hub kernels off (see the module docstring)."""
    return model_class.from_pretrained(*args, use_kernels=False, **kwargs)


def causal_lm_class(config) -> type | None:
    """The causal-LM class transformers builds for `config` (`LlamaForCausalLM` for a `LlamaConfig`), or None.

    Internal: `AutoModelForCausalLM._model_mapping`.
    """
    from transformers import AutoModelForCausalLM

    try:
        mapping = AutoModelForCausalLM._model_mapping
    except AttributeError as exc:
        raise moved("AutoModelForCausalLM._model_mapping", exc) from exc
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def meta_load(model_class, config, state: dict) -> tuple[Any, dict]:
    """transformers' own loader on the meta device over `state` (tensors on the meta device, saved names): the
    model it builds and its loading report (`missing_keys`, `unexpected_keys`, `mismatched_keys`).

    Uses `from_pretrained(None, state_dict=..., device_map="meta")`, which is public but only stable as far as
    the tests in `tests/test_hf.py` show.
    """
    return from_pretrained(model_class, None, config=config, state_dict=state, device_map="meta",
                           output_loading_info=True, ignore_mismatched_sizes=True)


def meta_model(model_class, config, state: dict, dtype) -> Any:
    """The model `from_pretrained(dtype=dtype)` builds from `state` (meta tensors, saved names), left on the meta
    device: each parameter has the dtype a real load gives it (`spp.io.stream.skeleton`)."""
    return from_pretrained(model_class, None, config=config, state_dict=state, device_map="meta", dtype=dtype)


def init_non_persistent_buffers(model) -> None:
    """Give every non-persistent buffer still on the meta device (rotary frequencies) its value on the CPU, the way
    `from_pretrained` does: an empty tensor, then the model's own `_init_weights` on its module (internal:
    `PreTrainedModel._init_weights`; it also "initialises" the module's meta parameters, which costs nothing)."""
    import torch

    for module in model.modules():
        names = [n for n, b in module.named_buffers(recurse=False)
                 if n in module._non_persistent_buffers_set and b is not None and b.is_meta]
        if not names:
            continue
        for name in names:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        try:
            with torch.no_grad():
                model._init_weights(module)
        except AttributeError as exc:
            raise moved("PreTrainedModel._init_weights", exc) from exc


def load_generation_config(model, directory) -> None:
    """Load the generation config of a model directory as `from_pretrained` does (`generation_config.json`, or the
    one derived from `config.json`), for a model built without reading the directory. Internal:
    `GenerationMixin.adjust_generation_fn`."""
    if not model.can_generate():
        return
    try:
        adjust = model.adjust_generation_fn
    except AttributeError as exc:
        raise moved("GenerationMixin.adjust_generation_fn", exc) from exc
    adjust(None, True, False, str(directory), cache_dir=None, force_download=False, proxies=None,
           local_files_only=True, token=None, revision="main", subfolder="", trust_remote_code=False)


def state_to_save(model, state: dict) -> dict:
    """What `save_pretrained` writes from `state` (the model's state dict, or a part of it): without the keys it
    ignores on save and without tied duplicates, each fused weight split back into the saved layout it was loaded
    from, in the order `save_pretrained` shards it. Works on meta tensors (a plan) as on real ones (one part).

    Internals: `PreTrainedModel._keys_to_ignore_on_save`, `modeling_utils.remove_tied_weights_from_state_dict`,
    `core_model_loading.revert_weight_conversion`.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError as exc:
        raise moved("modeling_utils.remove_tied_weights_from_state_dict / revert_weight_conversion", exc) from exc
    state = {k: v for k, v in state.items() if k not in (model._keys_to_ignore_on_save or ())}
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def save_configs(model, directory) -> None:
    """Write `config.json` (with the weights' dtype and the class, as `save_pretrained` records them) and, for a
    generative model, `generation_config.json`: every file of `save_pretrained` but the weights."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def weight_conversions(model) -> tuple[list, list]:
    """(renamings, converters) transformers applies when it loads saved tensors into `model`.

    Internals: `conversion_mapping.get_model_conversion_mapping`, `core_model_loading.{WeightRenaming,
    WeightConverter}`.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError as exc:
        raise moved("transformers.conversion_mapping / core_model_loading", exc) from exc
    mapping = get_model_conversion_mapping(model)
    return ([m for m in mapping if isinstance(m, WeightRenaming)],
            [m for m in mapping if isinstance(m, WeightConverter)])


def loaded_key(saved: str, renamings: list, converters: list, prefix: str, state: dict) -> tuple[str, str | None]:
    """(the state-dict key a saved tensor is loaded into, the converter source pattern that takes it, or None).

    Internal: `core_model_loading.rename_source_key`.
    """
    try:
        from transformers.core_model_loading import rename_source_key
    except ImportError as exc:
        raise moved("transformers.core_model_loading.rename_source_key", exc) from exc
    return rename_source_key(saved, renamings, converters, prefix, state)


def stacked_expert_patterns(converters: list) -> dict[str, int]:
    """Source pattern -> its index among its converter's sources, for the converters spp can read backwards: they
    stack per-expert matrices along dim 0 (`MergeModulelist(dim=0)`), then optionally concatenate the sources
    along the rows (`Concatenate(dim=1)`), and each pattern has one `*` (the expert index).

    Internals: `core_model_loading.{MergeModulelist, Concatenate}`, `WeightConverter.{source_patterns,
    operations}`.
    """
    try:
        from transformers.core_model_loading import Concatenate, MergeModulelist
    except ImportError as exc:
        raise moved("transformers.core_model_loading.{MergeModulelist, Concatenate}", exc) from exc
    out = {}
    for conv in converters:
        ops, sources = list(conv.operations), list(conv.source_patterns)
        stacked = len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
        if not stacked or not (len(ops) == 1 or (len(ops) == 2 and isinstance(ops[1], Concatenate)
                                                  and ops[1].dim == 1)):
            continue
        out.update({pattern: i for i, pattern in enumerate(sources) if pattern.count("*") == 1})
    return out


def no_split_module_classes(model) -> set[str]:
    """The class names of the model's decoder blocks as it declares them (`_no_split_modules`), maybe empty."""
    return set(getattr(model, "_no_split_modules", None) or [])


def expert_gate_fn(experts):
    """An experts module's own gate function, (T, 2I) -> (T, I), or None when it has none (then spp applies
    act(gate) ⊙ up with the module's `act_fn`). Internal: `_apply_gate` of transformers 5's experts modules."""
    return getattr(experts, "_apply_gate", None)


def drop_quantization_config(model) -> None:
    """Forget the quantization config of a model loaded with `GgufConfig(dequantize=True)`, so it saves as a plain
    float checkpoint. Internal: `model.hf_quantizer.remove_quantization_config`."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    try:
        quantizer.remove_quantization_config(model)
    except AttributeError as exc:
        raise moved("hf_quantizer.remove_quantization_config", exc) from exc


def scores_chosen_positions(model) -> bool:
    """Whether the model's forward takes what `spp.eval.loglikelihood` passes: `logits_to_keep`, `position_ids` and a
    key/value cache (`cache` or `past_key_values`). transformers' own models do; older remote code may not."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep", "position_ids"} <= params.keys() and bool({"cache", "past_key_values"} & params.keys())


def forward_with_cache(model, cache=None, **kwargs):
    """`model(**kwargs, use_cache=True)` continuing the key/value cache `cache` (None: a new one).

    Returns:
        (the model's output, its cache). transformers 5.25 renamed the argument and output field
        `past_key_values` to `cache` (the old name is deprecated there); this passes whichever the model takes.
    """
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if cache is not None:
        kwargs[name] = cache
    out = model(use_cache=True, **kwargs)
    return out, out.get(name)


def select_cache_rows(cache, rows):
    """The key/value cache `cache` with batch rows `rows` (a LongTensor, repeats allowed), changed in place and
    returned. Public on `Cache` but undocumented (contrastive search uses it): `Cache.batch_select_indices`."""
    try:
        cache.batch_select_indices(rows)
    except AttributeError as exc:
        raise moved("Cache.batch_select_indices", exc) from exc
    return cache
