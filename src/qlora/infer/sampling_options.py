"""How the next token is chosen (:class:`SamplingOptions`), apart from the sampling code of
:mod:`qlora.infer.generate` so that ``qlora generate`` and ``qlora chat`` build their options from it without
importing torch and transformers.

A checkpoint's ``generation_config.json`` may say how its authors want it sampled (Qwen3: temperature 0.6, top-k
20, top-p 0.95; Gemma 3: top-k 64, top-p 0.95; a length limit). :func:`model_defaults` reads those values, which
replace qlora's own defaults wherever the user gives none; ``repetition_penalty`` is read with the model's other
token rules (:class:`qlora.infer.model_rules.ModelRules`). ``qlora serve`` reads what vLLM's default sampling
parameters read (its ``--generation-config auto``: temperature, top-p, top-k, min-p, ``max_new_tokens``);
``qlora generate`` and ``qlora chat``, which load a checkpoint as transformers does, also read what its ``generate``
reads: ``typical_p``, ``max_length`` (the prompt and reply together, where ``max_new_tokens`` is not set) and
``do_sample: false`` (greedy decoding; transformers 5 keeps it apart from an unset one, 4.x does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ..errors import UsageError
from ..option_range import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range

PENALTY_RANGE = Range(-2, 2)  # OpenAI's presence_penalty / frequency_penalty
BIAS_RANGE = Range(-100, 100)  # OpenAI's logit_bias values


@dataclass
class SamplingOptions:
    """How the next token is chosen; each field's help is the CLI's help text."""

    max_new_tokens: int = field(default=256, metadata={"help": "stop after this many new tokens", "range": AT_LEAST_1})
    temperature: float = field(default=0.7, metadata={"help": "softmax temperature; 0 = greedy (deterministic)",
                                                      "range": NON_NEGATIVE})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling: smallest token set with this probability mass",
                                                "range": Range(0, 1, low_open=True)})
    top_k: int = field(default=0, metadata={"help": "sample only among the k most likely tokens; 0 = all",
                                            "range": NON_NEGATIVE})
    seed: int | None = field(default=None, metadata={"help": "random seed, for reproducible sampling",
                                                     "range": NON_NEGATIVE})
    min_p: float = field(default=0.0, metadata={
        "help": "drop tokens less likely than min_p times the most likely one (after temperature); 0 = off",
        "range": Range(0, 1)})
    repetition_penalty: float | None = field(default=None, metadata={
        "help": "penalize tokens already in the prompt or the reply: a logit above 0 is divided by this, one below "
                "0 multiplied (transformers' repetition_penalty); 1 = off, above 1 repeats less; default: the "
                "model's generation_config value, else off",
        "range": POSITIVE})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "subtract this from the logit of every token already in the reply (OpenAI's); 0 = off",
        "range": PENALTY_RANGE})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "subtract this times its count in the reply from each token's logit (OpenAI's); 0 = off",
        "range": PENALTY_RANGE})
    logit_bias: dict[int, float] = field(default_factory=dict, metadata={
        "help": "token id -> value added to its logit before sampling, in [-100, 100] (OpenAI's logit_bias)",
        "cli": False})
    typical_p: float = field(default=1.0, metadata={
        "help": "typical sampling: keep the tokens whose surprise is closest to the distribution's entropy, up to "
                "this probability mass (transformers' typical_p, after min-p); 1 = off",
        "range": Range(0, 1, low_open=True)})
    max_length: int | None = field(default=None, metadata={
        "help": "prompt and reply together stop at this many tokens, in place of max_new_tokens (transformers' "
                "max_length, from a generation config that sets no max_new_tokens)", "range": AT_LEAST_1,
        "cli": False})

    def new_tokens(self, prompt_length: int) -> "SamplingOptions":
        """These options for a prompt of ``prompt_length`` tokens: ``max_length`` turned into the reply's
        ``max_new_tokens`` (at least 1, as transformers' ``generate`` still makes one token past it)."""
        if self.max_length is None:
            return self
        return replace(self, max_new_tokens=max(1, self.max_length - prompt_length), max_length=None)

    def __post_init__(self) -> None:
        for f in fields(self):
            if "range" in f.metadata:
                f.metadata["range"].check(f"--{f.name.replace('_', '-')}", getattr(self, f.name))
        self.logit_bias = dict(self.logit_bias or {})
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise UsageError(f"logit_bias keys must be token ids (integers, at least 0); got {token!r}")
            BIAS_RANGE.check(f"logit_bias[{token}]", bias)


MODEL_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_new_tokens")  # what vLLM reads of a generation config
GENERATE_FIELDS = (*MODEL_FIELDS, "typical_p", "max_length")  # what transformers' generate reads of it besides


def model_defaults(model, vllm: bool = False) -> dict[str, float | int]:
    """The :class:`SamplingOptions` that ``model.generation_config`` sets (those a transformers ``GenerationConfig``
    holds apart from its own defaults; a temperature of 0 is greedy decoding, as vLLM reads it); a value outside
    the option's range is left out. ``vllm``: only :data:`MODEL_FIELDS`, as vLLM reads them; else also
    ``typical_p``, ``max_length`` where no ``max_new_tokens`` is set, and ``do_sample: false`` as a temperature
    of 0, as transformers' ``generate`` reads them."""
    config = getattr(model, "generation_config", None)
    shipped = config.to_diff_dict() if config is not None else {}
    ranges = {f.name: f.metadata["range"] for f in fields(SamplingOptions) if f.name in GENERATE_FIELDS}
    kept = {}
    for name in MODEL_FIELDS if vllm else GENERATE_FIELDS:
        value = shipped.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value in ranges[name]:
            kept[name] = int(value) if name in ("top_k", "max_new_tokens", "max_length") else float(value)
    if "max_new_tokens" in kept:  # transformers: max_new_tokens wins over max_length
        kept.pop("max_length", None)
    if not vllm and shipped.get("do_sample") is False:
        kept["temperature"] = 0.0
    return kept


def merged(shipped: dict, given: dict) -> dict:
    """``given`` options over a model's ``shipped`` ones (:func:`model_defaults`): a ``max_new_tokens`` given
    replaces a shipped ``max_length`` too."""
    if "max_new_tokens" in given:
        shipped = {k: v for k, v in shipped.items() if k != "max_length"}
    return {**shipped, **given}


def cli_fields() -> list:
    """The :class:`SamplingOptions` fields that are command-line options (``logit_bias`` is not)."""
    return [f for f in fields(SamplingOptions) if f.metadata.get("cli", True)]
