"""Which transformers model class generates text for a checkpoint's config.

``AutoModelForCausalLM`` covers decoder LMs and some vision-language models
(Gemma 3, Llama 4). Others that generate text from text just as well
(Mistral 3, Qwen2.5-VL, LLaVA) are listed only under
``AutoModelForImageTextToText``; qlora loads those with it and fine-tunes
their language model on text, as a transformers + PEFT user would.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from torch import nn

from ..errors import UsageError


def text_model_from_config(config, source: str | Path, **kwargs) -> nn.Module:
    """Build the model for ``config`` (under the current default device, e.g. ``meta``).

    Raises:
        UsageError: the config is neither a causal LM nor an image-text-to-text model, or its
            classes need a package that is missing.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    last: ValueError | None = None
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) not in auto._model_mapping:
            continue
        try:
            return auto.from_config(config, **kwargs)
        except ValueError as exc:  # e.g. an attn_implementation the class lacks
            last = exc
        except ImportError as exc:  # a tower built on an optional package (Gemma 3n's vision tower needs timm)
            said = " ".join(str(exc).split())
            raise UsageError(f"{source}: transformers needs a package that is not installed to build the "
                             f"{config.model_type!r} model: {said}") from None
    if last is not None:
        raise UsageError(f"{source}: transformers could not build the {config.model_type!r} model ({last}).")
    raise UsageError(f"{source}: model type {config.model_type!r} is not a text-generating model "
                     "(transformers lists it neither as a causal LM nor as an image-text-to-text model); qlora "
                     "fine-tunes decoder language models such as Llama, Qwen, Mistral, Gemma and Phi.")


def check_runs_on_text(model: nn.Module, source: str | Path) -> None:
    """Refuse a model whose ``forward`` cannot run on token ids alone.

    BLIP, BLIP-2 and InstructBLIP caption an image: their forward requires ``pixel_values`` (and InstructBLIP's
    ``qformer_input_ids``), as PI0 requires a robot ``state``. qlora trains, evaluates and decodes from token
    ids (images only where the model also runs without them), so each command would end in a ``TypeError``.

    Raises:
        UsageError: naming the inputs the forward requires.
    """
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "input_ids"]
    if "lang_ids" in {p.name for p in params}:
        _check_default_language(model.config, source)
    try:
        model.get_input_embeddings()
    except NotImplementedError:  # PP-FormulaNet: a decoder of image features, with no token embeddings to find
        raise UsageError(f"{source}: the {model.config.model_type!r} model ({type(model).__name__}) has no token "
                         "embeddings transformers can find (its get_input_embeddings is not implemented), so it "
                         "cannot run on text alone: it decodes what another input gives it, such as an image. "
                         "qlora fine-tunes and runs language models on token ids; use a model that generates text "
                         "from text, or transformers' own training code for this one.") from None
    _check_autoregressive(model, source)
    if required:
        raise UsageError(f"{source}: the {model.config.model_type!r} model ({type(model).__name__}) cannot run "
                         f"on text alone: its forward requires {', '.join(required)} beside the token ids. qlora "
                         "fine-tunes and runs language models on token ids (images only where the model also runs "
                         "without them); use a model that generates text from text, or transformers' own "
                         "training code for this one.")


def _check_autoregressive(model: nn.Module, source: str | Path) -> None:
    """Refuse a model that generates text by a method of its own instead of transformers' token-by-token
    ``generate`` (its class says it can generate, yet is no ``GenerationMixin``): DiffusionGemma refines a canvas of
    ``canvas_length`` tokens by block diffusion, and its logits are those of the canvas, not next-token predictions
    of its input. qlora's training loss and decoding are those of a model whose logits at each position predict the
    next token, so each command would end in an error far from the cause (a traceback while tying its weights).

    Raises:
        UsageError: naming the model's own generation method.
    """
    from transformers import GenerationMixin

    if isinstance(model, GenerationMixin) or not type(model).can_generate():
        return
    own = next((c.__name__ for c in type(model).__mro__ if "generate" in vars(c)), "its own generate")
    raise UsageError(f"{source}: the {model.config.model_type!r} model ({type(model).__name__}) is not an "
                     f"autoregressive language model: it generates text with a method of its own ({own}), not "
                     "transformers' token-by-token generate, and its logits are not predictions of the next token "
                     "of its input. qlora trains with the next-token loss and decodes token by token, so it can "
                     "neither fine-tune nor run this model; use transformers' own code for it, or a causal "
                     "language model.")


def _check_default_language(config, source: str | Path) -> None:
    """X-MOD passes every token through the adapter of one language: the ``lang_ids`` of its forward, which qlora
    never gives, else the config's ``default_language``. Without one its forward raises "Input language unknown"
    (and a name not among ``languages`` fails a list lookup) in every command that runs it.

    Raises:
        UsageError: naming the field to set in config.json and the languages to choose from.
    """
    languages = list(getattr(config, "languages", None) or ())
    chosen = getattr(config, "default_language", None)
    if chosen in languages:
        return
    file = Path(source) / "config.json" if Path(source).is_dir() else Path(source)
    said = "which is null there" if chosen is None else f"which is {chosen!r} there, none of them"
    shown = ", ".join(languages[:10]) + (f", ... ({len(languages)} in all)" if len(languages) > 10 else "")
    raise UsageError(f"{file}: the {config.model_type!r} model runs each token through the adapter of one of its "
                     f"languages ({shown}), chosen by a lang_ids input, which qlora does not give, or else by "
                     f"default_language, {said}. Set \"default_language\" in {file} to the "
                     "one your text is in (what transformers' set_default_language() does in Python).")
