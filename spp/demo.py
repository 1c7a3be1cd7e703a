"""The embedded default: a corpus, a tokenizer and a small LLaMA model built in code, cached on disk.

`spp demo` must work on a fresh machine with no network, no GPU and no files. This
module makes everything it needs: a seeded grammar of short stories with real
structure (names that recur through a story, pronouns that agree with them,
subject-verb number agreement, adjective-noun phrases), a word-level tokenizer
over that grammar's words, and a small `LlamaForCausalLM` trained on the stories
for about a minute on two CPU cores. The result is an ordinary `save_pretrained`
directory (with the tokenizer and the corpus files `train.txt` / `heldout.txt`)
in `demo-<settings hash>/` under spp's cache root (`spp.io.gguf.cache_root`: `$SPP_CACHE`,
else `$XDG_CACHE_HOME/spp`), written atomically and reused when present. It does not
prune, train adapters or evaluate: `spp.pipeline` does that.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

from spp.io.checkpoint import MANIFEST_FILE, atomic_dir
from spp.io.gguf import cache_root
from spp.io.manifest import Manifest, peak_memory_bytes, settings_sha256, write_manifest

TRAIN_TEXT = "train.txt"
HELDOUT_TEXT = "heldout.txt"
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo model; its sha256 names the cache directory."""

    seed: int = 0
    train_stories: int = 4000
    heldout_stories: int = 300
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    context: int = 128
    batch_size: int = 16
    steps: int = 600
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    version: int = 1  # bump when the grammar or the training code changes

    def sha256(self) -> str:
        return settings_sha256(dataclasses.asdict(self))


# --------------------------------------------------------------------------- corpus

NAMES = {
    "he": ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Finn", "Theo"],
    "she": ["Lily", "Mia", "Anna", "Emma", "Zoe", "Lucy", "Rose", "Ella"],
}
POSSESSIVE = {"he": "his", "she": "her"}
# noun -> (plural, kind) ; kind decides which verbs make sense with it
ANIMALS = {"cat": "cats", "dog": "dogs", "bird": "birds", "fox": "foxes", "bunny": "bunnies",
           "frog": "frogs", "duck": "ducks", "bear": "bears"}
THINGS = {"ball": "balls", "kite": "kites", "box": "boxes", "hat": "hats", "book": "books",
          "cake": "cakes", "apple": "apples", "boat": "boats", "drum": "drums", "key": "keys"}
PLACES = ["park", "garden", "forest", "house", "river", "hill", "school", "farm"]
SIZES = ["big", "little", "small", "tiny", "huge"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "brown", "white"]
FEELINGS = ["happy", "sad", "scared", "proud", "sleepy", "surprised"]
ANIMAL_VERBS = [("runs", "run"), ("jumps", "jump"), ("sings", "sing"), ("sleeps", "sleep"), ("hides", "hide")]
THING_VERBS = [("found", "find"), ("liked", "like"), ("carried", "carry"), ("lost", "lose"), ("painted", "paint")]
PLACE_PHRASE = {"park": "in the park", "garden": "in the garden", "forest": "in the forest",
                "house": "in the house", "river": "by the river", "hill": "on the hill",
                "school": "at school", "farm": "on the farm"}
REASONS = {"happy": "because the sun was warm", "sad": "because it started to rain",
           "scared": "because the night was dark", "proud": "because the work was done",
           "sleepy": "because the day was long", "surprised": "because the door was open"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: random.Random, noun: str, definite: bool = False) -> str:
    """An optional size and colour before the noun (size first, as English orders them)."""
    words = []
    if rng.random() < 0.6:
        words.append(rng.choice(SIZES))
    if rng.random() < 0.5:
        words.append(rng.choice(COLOURS))
    words.append(noun)
    det = "the" if definite else _article(words[0])
    return f"{det} {' '.join(words)}"


TIMES = ["One day", "One morning", "That night", "After lunch", "Later"]
ADVERBS = ["quickly", "slowly", "quietly", "happily", "carefully"]
OPENINGS = [
    "Once upon a time , there was {a_size} {kid} named {hero} .",
    "There once was {a_size} {kid} called {hero} .",
    "Long ago , in a {size2} town , lived {a_size} {kid} named {hero} .",
]


def _events(rng: random.Random, s: dict) -> list[str]:
    """The middle of a story: two or three events drawn from a pool, all about the same cast."""
    pool = [
        "{Time} , {hero} {thing_past} {thing_np} {place_phrase} .",
        "{Time} , {hero} and {friend} {animal_pl_verb} {adverb} {place_phrase} .",
        "{Pron} showed the {thing} to {friend} , and {friend} {laughed} .",
        "{friend} asked , \" Can I {thing_base} the {thing} with you ? \" {hero} said yes .",
        "{friend} smiled and said , \" I {thing_base} {things} too ! \"",
        "The {animals} {animal_pl_verb} {adverb} , and {hero} watched them .",
        "The {animal} {animal_sg_verb} {adverb} , so {hero} followed it .",
        "{hero} gave {poss} {thing} to the {animal} , and it was {feeling} .",
        "{Pron} looked for {poss} {thing} , but it was gone .",
    ]
    picks = rng.sample(pool, rng.choice([2, 3]))
    return [p.format(**s, Time=rng.choice(TIMES), adverb=rng.choice(ADVERBS)) for p in picks]


def _story(rng: random.Random) -> str:
    """One mini-story: a hero (name and pronouns kept consistent), a friend, an animal, a thing, a place."""
    gender = rng.choice(["he", "she"])
    hero = rng.choice(NAMES[gender])
    friend = rng.choice([n for g in ("he", "she") for n in NAMES[g] if n != hero])
    animal, thing, place = rng.choice(list(ANIMALS)), rng.choice(list(THINGS)), rng.choice(PLACES)
    feeling = rng.choice(FEELINGS)
    thing_past, thing_base = rng.choice(THING_VERBS)
    animal_sg_verb, animal_pl_verb = rng.choice(ANIMAL_VERBS)
    size = rng.choice(SIZES)
    s = dict(
        hero=hero, friend=friend, Pron=gender.capitalize(), poss=POSSESSIVE[gender], animal=animal,
        animals=ANIMALS[animal], thing=thing, things=THINGS[thing], thing_np=_noun_phrase(rng, thing),
        thing_past=thing_past, thing_base=thing_base, animal_sg_verb=animal_sg_verb,
        animal_pl_verb=animal_pl_verb, place_phrase=PLACE_PHRASE[place], feeling=feeling,
        laughed=rng.choice(["laughed", "clapped", "cheered"]), a_size=f"{_article(size)} {size}",
        size2=rng.choice(SIZES), kid="boy" if gender == "he" else "girl",
    )
    sentences = [rng.choice(OPENINGS).format(**s)]
    sentences.append("{Pron} lived near the {place} with {poss} friend {friend} .".format(**s, place=place))
    if rng.random() < 0.5:
        sentences.append("Every day , the {animals} {animal_pl_verb} {place_phrase} .".format(**s))
    else:
        sentences.append("Every day , the {animal} {animal_sg_verb} {place_phrase} .".format(**s))
    sentences += _events(rng, s)
    sentences.append("{hero} felt {feeling} {reason} .".format(**s, reason=REASONS[feeling]))
    sentences.append("The end .")
    return " ".join(sentences)


def demo_corpus(seed: int, n_stories: int) -> list[str]:
    """`n_stories` seeded stories (the same seed gives the same list)."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n_stories)]


# --------------------------------------------------------------------------- tokenizer


def demo_tokenizer(texts: list[str]):
    """A word-level tokenizer whose vocabulary is every word of `texts` (sorted) plus the special tokens.

    Returns:
        A `PreTrainedTokenizerFast` with bos/eos/unk/pad, loadable by `AutoTokenizer` once saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in text.split()})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
    )


# --------------------------------------------------------------------------- model


def demo_model_config(settings: DemoSettings, tokenizer):
    """The LlamaConfig of the demo model (hidden and intermediate sizes divisible by 16)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_attention_heads,
        max_position_embeddings=settings.context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to 10% of `peak` at `steps`: `spp train`'s cosine
    schedule (`spp.train.loop.lr_factor`) with a floor of 0.1."""
    from spp.train.loop import lr_factor

    if step < warmup:  # peak·(t+1)/w in this order, not peak·lr_factor (1 ulp apart): the demo model's bytes
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * lr_factor(step, steps, warmup, "cosine"))


def train_demo_model(settings: DemoSettings, tokenizer, train_ids, log=print):
    """Train the demo LLaMA from scratch on random windows of the token stream `train_ids` (n_tokens,).

    Each step takes `batch_size` windows of `context` tokens at seeded random offsets and
    minimises the mean next-token cross-entropy with AdamW (β = 0.9, 0.95), gradients
    clipped to norm 1, learning rate from `lr_at`.

    Returns:
        The trained model in eval mode (float32, CPU).
    """
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(demo_model_config(settings, tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    n_windows = len(train_ids) - settings.context - 1
    warmup = max(1, settings.steps // 20)
    start = time.perf_counter()
    for step in range(settings.steps):
        starts = torch.randint(0, n_windows, (settings.batch_size,), generator=generator)
        batch = torch.stack([train_ids[s : s + settings.context] for s in starts.tolist()])  # (B, T)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.steps, settings.learning_rate, warmup)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if log and (step % 100 == 0 or step == settings.steps - 1):
            log(f"demo model: step {step + 1}/{settings.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)")
    return model.eval()


def demo_model_dir(settings: DemoSettings = DemoSettings()) -> Path:
    """Where the demo model for `settings` lives (whether or not it has been built)."""
    return cache_root() / f"demo-{settings.sha256()[:12]}"


def ensure_demo_model(settings: DemoSettings = DemoSettings(), log=print) -> Path:
    """Build the demo model directory unless a complete one is cached; return its path.

    The directory holds the model, its tokenizer, `train.txt` (training and
    calibration text), `heldout.txt` (perplexity text) and a manifest. It is built
    in a sibling `.partial` directory and renamed at the end, so an interrupted
    build leaves nothing that looks complete.
    """
    import torch

    from spp.data import tokenize_stream
    from spp.io.checkpoint import save_model
    from spp.io.conditions import run_conditions

    log = log or (lambda line: None)
    output = demo_model_dir(settings)
    if (output / MANIFEST_FILE).is_file():
        return output
    log(f"building the demo model in {output} (once; cached afterwards)")
    start = time.perf_counter()
    train_text = demo_corpus(settings.seed, settings.train_stories)
    heldout_text = demo_corpus(settings.seed + 1_000_003, settings.heldout_stories)
    tokenizer = demo_tokenizer(train_text + heldout_text)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, 4)))  # a model this small gains nothing from more
    try:
        # one document, exactly as the later stages read train.txt
        train_ids = tokenize_stream(tokenizer, ["\n".join(train_text)])
        model = train_demo_model(settings, tokenizer, train_ids, log)
        conditions = run_conditions("cpu", "float32")  # the thread count it was trained with, not the caller's
    finally:
        torch.set_num_threads(threads)
    with atomic_dir(output, overwrite=True) as partial:
        save_model(model, tokenizer, partial)
        (partial / TRAIN_TEXT).write_text("\n".join(train_text) + "\n", encoding="utf-8")
        (partial / HELDOUT_TEXT).write_text("\n".join(heldout_text) + "\n", encoding="utf-8")
        write_manifest(partial, Manifest(
            stage="demo-model",
            settings=dataclasses.asdict(settings),
            details={"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)},
            conditions=conditions,
            wall_time_s=time.perf_counter() - start,
            peak_memory=peak_memory_bytes(),
        ))
    return output


# --------------------------------------------------------------------------- the demo run

PIPELINE_FILE = "pipeline.yaml"


def demo_pipeline(model_dir: Path, output: Path) -> dict:
    """The `spp run` file of the demo: Wanda at 2:4 and at 50%, SPP training, merge, held-out perplexity."""
    train_text, heldout_text = str(model_dir / TRAIN_TEXT), str(model_dir / HELDOUT_TEXT)
    return {
        "model": str(model_dir),
        "output": str(output),
        "prune": {"method": "wanda", "calib": train_text, "nsamples": 64, "seqlen": 128},
        "sweep": [{"pattern": "2:4"}, {"pattern": "unstructured", "sparsity": 0.5}],
        # the learning rate is tinystories.yaml's for the adapter (chosen by scripts/study.py's sweep)
        "train": {"config": "tinystories.yaml", "data_path": train_text, "cutoff_len": 128, "micro_batch_size": 16,
                  "batch_size": 16, "max_steps": 150, "lr_scheduler": "cosine", "warmup_ratio": 0.05,
                  "val_set_size": 0, "logging_steps": 25, "save_steps": 50, "eval_steps": 1000, "seed": 0,
                  "spp_row_groups": 16, "lora_alpha": 16.0, "lora_r": 8},
        "eval": {"ppl": [heldout_text], "seqlen": 128},
    }


def run_demo(output: Path, settings: DemoSettings = DemoSettings(), log=print):
    """Build (or reuse) the demo model, write `OUTPUT/pipeline.yaml` and run it with `spp.pipeline`.

    Returns:
        The `PipelineReport` (its `table` is what `spp demo` prints).
    """
    import yaml

    from spp.io.checkpoint import check_output_dir
    from spp.pipeline import run_pipeline

    output = Path(output).expanduser().resolve()
    check_output_dir(output, overwrite=True)  # a file there or an unwritable parent: refused before any work
    model_dir = ensure_demo_model(settings, log)
    output.mkdir(parents=True, exist_ok=True)
    header = (f"# The pipeline `spp demo` ran on its built-in model; run it again with:\n"
              f"#   spp run {output / PIPELINE_FILE}\n")
    (output / PIPELINE_FILE).write_text(header + yaml.safe_dump(demo_pipeline(model_dir, output), sort_keys=False))
    return run_pipeline(output / PIPELINE_FILE, log=log)
