"""lm-evaluation-harness model `infill-rl`: lm-eval's generation tasks through the project's sampler.

    python -m rl.harness --model infill-rl --device cpu --batch_size 64 \\
        --model_args pretrained=outputs/tiny/sft_answer/final,policy=med,med_lambda=0.2,block_length=8 \\
        --include_path recipes/lm_eval --tasks gsm8k_local

`python -m rl.harness ARGS` is lm-eval's own command line (`lm_eval ARGS`) with this model registered first:
lm-eval 0.4.x finds models only in its registry and discovers no plugins, so a bare `lm_eval --model infill-rl`
does not know the name. From Python, `import rl.harness` registers it, then
`lm_eval.simple_evaluate(model="infill-rl", model_args={...})` works (or pass an `InfillRLM` instance).

How a request maps onto the sampler (docs/lm_eval.md has the details):

- `generate_until`: the request's context is the prompt of one canvas row (`TemplateConfig`: the 'infill' layout
  `[prompt][R masks][delimiter][A masks][suffix]` or the 'plain' one `[prompt][R masks]`), sampled by
  `rollout.sample` with `SamplerConfig`. The returned text is the decoded reasoning, then (infill) the delimiter,
  the answer block and the suffix; each decoded block is cut at the first of the request's `until` strings.
  The canvas and the sampler are set by model_args only: gen_kwargs other than `until` (max_gen_toks,
  temperature, do_sample, ...) are ignored, with a warning naming them, so one set of keys (the same as
  scripts/evaluate.py's) decides what runs.
- Seeds: request for document `doc_id` uses `rl.evaluate.row_seed(seed, doc_id)`, the seed scripts/evaluate.py
  gives dataset row `doc_id`, whatever order lm-eval passes the requests in; the r-th repeat of a document
  (`repeats` > 1) uses `row_seed(seed + r, doc_id)`, i.e. the evaluate.py run with `--seed seed+r`.
- NFE: every request's trace (nfe, exit step, decode steps, H_UB) goes to `output_file` (JSONL) when it is set;
  per-task totals (mean NFE, exit rate, tokens per NFE) are logged after each `generate_until` call and returned by
  `get_model_info`, which lm-eval copies into `results["config"]["infill_rl"]`.
- `loglikelihood` / `loglikelihood_rolling` raise NotImplementedError: a masked diffusion LM has no exact token
  log-likelihood (only an ELBO), so multiple-choice and perplexity tasks are out of scope.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
import typing
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from lm_eval.api.model import LM

from rl.evaluate import row_seed
from rl.models import ModelConfig
from rollout.sampler import SamplerConfig
from rollout.template import TemplateConfig

logger = logging.getLogger(__name__)

MODEL_NAME = "infill-rl"
ALIASES = {"pretrained": "model_name_or_path", "tokenizer": "tokenizer_name_or_path"}
"""lm-eval's usual model_args names for the project's ModelConfig fields."""
IGNORED_ARGS = ("max_batch_size",)
"""Passed by lm-eval's command line to every model; the sampler's batch is `batch_size`."""


@dataclass
class HarnessConfig:
    """The adapter's own settings. Field names are model_args keys."""

    batch_size: int = field(default=64, metadata={"help": "Rows per sampler call ('auto': 64); no effect on outputs."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 (None: cuda if available)."})
    output_file: str | None = field(
        default=None, metadata={"help": "JSONL of per-request traces (task, doc_id, seed, text, nfe, ...)."}
    )
    recipe: str | None = field(
        default=None,
        metadata={"help": "A scripts/evaluate.py recipe whose model, template, sampler, batch_size and device keys "
                          "are the defaults (explicit model_args win; task keys are lm-eval's job and ignored)."},
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")


CONFIGS = (ModelConfig, TemplateConfig, SamplerConfig, HarnessConfig)


def valid_args() -> list[str]:
    """Every model_args key the adapter accepts."""
    names = {f.name for cls in CONFIGS for f in dataclasses.fields(cls) if f.init}
    return sorted(names | set(ALIASES) | set(IGNORED_ARGS))


def _coerce(value, hint, name: str):
    """A model_args value (already typed by lm-eval's parser, JSON or YAML) as the field's declared type."""
    if value is None:
        return None
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    kind = kinds[0] if kinds else hint
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
    elif kind is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str:
        return str(value)
    else:
        return value
    raise ValueError(f"model_args {name}={value!r}: expected {kind.__name__}.")


def parse_model_args(args: dict) -> tuple[ModelConfig, TemplateConfig, SamplerConfig, HarnessConfig]:
    """(ModelConfig, TemplateConfig, SamplerConfig, HarnessConfig) from lm-eval's model_args.

    Keys are the config field names (`pretrained` and `tokenizer` are accepted for `model_name_or_path` and
    `tokenizer_name_or_path`); an unknown key is an error that lists the valid ones.
    """
    args = dict(args)
    for alias, name in ALIASES.items():
        if alias in args:
            if name in args:
                raise ValueError(f"model_args sets both {alias} and {name}; they are the same setting, keep one.")
            args[name] = args.pop(alias)
    for name in IGNORED_ARGS:
        args.pop(name, None)
    valid = valid_args()
    unknown = sorted(set(args) - set(valid))
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=2) for k in unknown}
        raise ValueError(
            f"Unknown {MODEL_NAME} model_args: "
            + "; ".join(f"{k!r} (did you mean {', '.join(h)}?)" if h else repr(k) for k, h in hints.items())
            + f". Valid keys: {', '.join(valid)}."
        )
    if args.get("batch_size") is not None and str(args["batch_size"]).startswith("auto"):
        args["batch_size"] = HarnessConfig.batch_size  # no OOM probing: per-row seeds make it speed-only
    if args.get("recipe"):
        args = {**_recipe_defaults(args["recipe"]), **args}
    configs = []
    for cls in CONFIGS:
        hints = typing.get_type_hints(cls)
        kwargs = {f.name: _coerce(args[f.name], hints[f.name], f.name)
                  for f in dataclasses.fields(cls) if f.init and f.name in args}
        configs.append(cls(**kwargs))
    sampler = configs[2]
    if sampler.prune_phi is not None:
        raise ValueError("prune_phi reads the gold answer: it is for training rollouts, not for evaluation.")
    return tuple(configs)


def _recipe_defaults(path: str) -> dict:
    """The keys of a scripts/evaluate.py recipe that configure the model, canvas and sampler."""
    from rl.evaluate import EvalConfig
    from rl.recipe import field_names, load_recipe
    from rl.tasks import TaskConfig

    recipe = load_recipe(path)
    ours = set(valid_args()) - {"recipe", "output_file"}
    theirs = field_names([TaskConfig, EvalConfig])
    unknown = sorted(set(recipe) - ours - theirs)
    if unknown:
        raise ValueError(f"Recipe {path} has key(s) {unknown} that are neither model_args nor evaluate.py keys.")
    return {k: v for k, v in recipe.items() if k in ours}


def cut_at(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any stop string (lm-eval's `until`)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def answer_of(text: str, template: TemplateConfig | None = None) -> str:
    """The answer in a returned text: what follows the last delimiter, minus the suffix (the whole text if the
    delimiter is absent). The same rule as scripts/evaluate.py's 'plain' layout; on the 'infill' canvas it is the
    answer block unless the answer block itself repeats the delimiter."""
    template = template or TemplateConfig()
    marker = template.delimiter.strip()
    if not marker or marker not in text:
        return text.strip()
    return text.rpartition(marker)[2].strip().removesuffix(template.suffix.strip()).strip()


class InfillRLM(LM):
    """lm-eval `LM` over a masked diffusion model: `generate_until` runs `rollout.sample` on the canvas.

    Args: the model_args (see `parse_model_args` and `valid_args`).
    """

    def __init__(self, **model_args) -> None:
        super().__init__()
        from rl.evaluate import default_device
        from rl.models import load_for_inference
        from rollout.adapter import MDLMAdapter

        self.model_config, self.template, self.sampler, self.config = parse_model_args(model_args)
        device = self.config.device
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes --device cuda:0 unless told otherwise.
            logger.warning("device=%s but CUDA is not available; using the CPU (pass --device cpu).", device)
            device = "cpu"
        self._device = default_device(device)
        model, self.tokenizer = load_for_inference(self.model_config, self._device)
        self.adapter = MDLMAdapter.from_pretrained(model, self.tokenizer)
        self.max_length = self.adapter.max_length
        self.totals: dict[str, Counter] = defaultdict(Counter)
        self._ignored_gen_kwargs: set[str] = set()
        self._chat_rendered = False
        if self.config.output_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.config.output_file)), exist_ok=True)
            open(self.config.output_file, "w").close()

    # lm-eval's chat templating (--apply_chat_template): contexts arrive rendered, so they are encoded as-is.
    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.template.chat_template:
            raise ValueError("Both lm-eval's --apply_chat_template and model_args chat_template=True render the "
                             "prompt; use one (chat_template=True renders it as scripts/evaluate.py does).")
        self._chat_rendered = True
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            f"{MODEL_NAME} cannot score loglikelihood requests: a masked diffusion LM has no exact token "
            "log-likelihood (only a Monte Carlo ELBO bound). Use generate_until tasks (gsm8k, ...)."
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            f"{MODEL_NAME} cannot score loglikelihood_rolling (perplexity) requests: a masked diffusion LM has no "
            "exact token log-likelihood (only a Monte Carlo ELBO bound). Use generate_until tasks."
        )

    def _seeds(self, requests) -> list[tuple[str, int, int]]:
        """(task, doc_id, repeat) of each request; a repeated document counts its repeats in request order."""
        seen: Counter = Counter()
        keys = []
        for j, req in enumerate(requests):
            doc_id = req.doc_id if req.doc_id is not None else j
            task = req.task_name or ""
            keys.append((task, doc_id, seen[task, doc_id]))
            seen[task, doc_id] += 1
        return keys

    def _warn_gen_kwargs(self, gen_kwargs: dict) -> None:
        ignored = set(gen_kwargs) - {"until"} - self._ignored_gen_kwargs
        if ignored:
            self._ignored_gen_kwargs |= ignored
            logger.warning("%s ignores gen_kwargs %s: the canvas and sampler come from model_args "
                           "(reasoning_length, answer_length, temperature, ...).", MODEL_NAME, sorted(ignored))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        keys = self._seeds(requests)
        # Rows in (task, doc_id) order, batched as scripts/evaluate.py batches its dataset rows.
        order = sorted(range(len(requests)), key=lambda j: (keys[j][0], keys[j][2], keys[j][1]))
        results: list[str | None] = [None] * len(requests)
        bs = self.config.batch_size
        with tqdm(total=len(requests), desc=MODEL_NAME, unit="req", disable=disable_tqdm) as bar:
            for lo in range(0, len(order), bs):
                chunk = order[lo : lo + bs]
                texts, records = self._sample([requests[j] for j in chunk], [keys[j] for j in chunk])
                for j, text in zip(chunk, texts):
                    results[j] = text
                    self.cache_hook.add_partial("generate_until", requests[j].args, text)
                if self.config.output_file:
                    with open(self.config.output_file, "a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in records)
                bar.update(len(chunk))
        for task, stats in self.nfe_summary().items():
            logger.info("%s %s: %d requests, mean NFE %.2f, exit rate %.3f, tokens/NFE %.2f", MODEL_NAME, task,
                        stats["requests"], stats["mean_nfe"], stats["exit_rate"], stats["tokens_per_nfe"])
        return results

    def _sample(self, requests, keys) -> tuple[list[str], list[dict]]:
        from rollout.sampler import sample
        from rollout.template import build_canvas, decode_block, layout_canvas

        contexts, stops = [], []
        for req in requests:
            context, gen_kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {}) or {}
            self._warn_gen_kwargs(gen_kwargs)
            until = gen_kwargs.get("until") or []
            contexts.append(context)
            stops.append([until] if isinstance(until, str) else list(until))
        if self._chat_rendered:
            encoded = [list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in contexts]
            canvas = layout_canvas(self.tokenizer, encoded, self.template, self.adapter.mask_id,
                                   max_length=self.adapter.max_length)
        else:
            canvas = build_canvas(self.tokenizer, contexts, self.template, self.adapter.mask_id,
                                  max_length=self.adapter.max_length)
        seeds = [row_seed(self.sampler.seed + repeat, doc_id) for _, doc_id, repeat in keys]
        out = sample(self.adapter, canvas, self.sampler, seeds=seeds)
        texts, records = [], []
        for j, ((task, doc_id, repeat), until) in enumerate(zip(keys, stops)):
            gen = out.generation[j]  # [G]
            blocks = [decode_block(self.tokenizer, gen[out.reasoning], self.adapter.eos_ids, out.mask_id)]
            if out.answer is not None:
                blocks.append(decode_block(self.tokenizer, gen[out.answer], self.adapter.eos_ids, out.mask_id))
            reasoning, *answer = [cut_at(b, until) for b in blocks]
            text = reasoning if not answer else reasoning + self.template.delimiter + answer[0] + self.template.suffix
            texts.append(text)
            records.append({"task": task, "doc_id": doc_id, "repeat": repeat, "seed": seeds[j],
                            "context": contexts[j], "reasoning": reasoning, "answer": answer[0] if answer else None,
                            "text": text, **out.row(j)})
            stats = self.totals[task]
            stats["requests"] += 1
            stats["nfe"] += int(out.nfe[j])
            stats["exited"] += int(out.exit_step[j] >= 0)
        task_counts = Counter(task for task, _, _ in keys)
        if len(task_counts) == 1:  # batch accounting is per call; only attributable when one task fills it
            (task,) = task_counts
            self.totals[task]["tokens"] += out.stats["tokens_decoded"]
            self.totals[task]["row_forwards"] += out.stats["row_forwards"]
        return texts, records

    def nfe_summary(self) -> dict[str, dict]:
        """Per task: requests, mean NFE, exit rate, tokens decoded per row-forward."""
        return {
            task: {"requests": s["requests"], "mean_nfe": s["nfe"] / max(1, s["requests"]),
                   "exit_rate": s["exited"] / max(1, s["requests"]),
                   "tokens_per_nfe": s["tokens"] / max(1, s["row_forwards"])}
            for task, s in self.totals.items()
        }

    def get_model_info(self) -> dict:
        """What lm-eval adds to results['config']: the resolved settings and the NFE per task."""
        return {"infill_rl": {"model": dataclasses.asdict(self.model_config),
                              "template": dataclasses.asdict(self.template),
                              "sampler": dataclasses.asdict(self.sampler),
                              "output_file": self.config.output_file, "nfe": self.nfe_summary()}}


def register() -> None:
    """Register `infill-rl` in lm-eval's model registry (idempotent).

    A lazy 'rl.harness:InfillRLM' target, so `python -m rl.harness` (this file as `__main__`) does not register a
    second copy of the class.
    """
    import lm_eval.models  # noqa: F401  (lm-eval fills its built-in names only while the registry is empty)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="rl.harness:InfillRLM")


register()


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `infill-rl` registered."""
    from lm_eval.__main__ import cli_evaluate

    handler = logging.StreamHandler()  # lm-eval configures only its own logger; show this adapter's NFE lines too
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("rl").addHandler(handler)
    logging.getLogger("rl").setLevel(logging.INFO)
    logging.getLogger("rl").propagate = False
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
