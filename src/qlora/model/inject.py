"""add_lora: freeze the base and wrap the chosen linear layers with adapters."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import numbers
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
from torch import nn

from ..errors import UsageError
from ..float_dtype import float_dtype
from ..nn import (AdaLoraLinear, Experts4bit, ExpertsLora, Linear4bit, LoraEmbedding, LoraLinear, LoraSpec,
                  RouterLora, SavedModules, adapter_name_problem, dequantized, expert_weight_names, experts_layout,
                  is_router, undequantizable)
from ..nn.experts_lora import expert_shapes
from ..nn.residual_init_names import is_residual_init
from .quantize import (is_linear_like, kept_dense_names, matches_any, non_text_names, output_embedding_names,
                       weight_count)
from .target_hints import unmatched_hint, weight_modules
from .tied_tables import untie_trained_whole, with_tied_partner

if TYPE_CHECKING:
    from .streamed_init import StreamedInit

log = logging.getLogger("qlora")


@dataclass
class AdapterConfig:
    """What ``save_adapter`` writes to adapter_config.json (PEFT's fields)."""

    spec: LoraSpec
    target_modules: list[str]
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    layers: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)  # full paths, trained whole (PEFT's modules_to_save)
    target_parameters: list[str] = field(default_factory=list)  # PEFT's target_parameters, as given
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT's: layer-name regex -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # PEFT's: layer-name regex -> alpha
    bias: str = "none"  # PEFT's: "none", "all" (every bias trained) or "lora_only" (the adapted layers' biases)
    trainable_tokens: dict[str, list[int]] = field(default_factory=dict)  # PEFT's trainable_token_indices, by path
    ensure_weight_tying: bool = False  # PEFT's: a tied embedding and head trained whole stay one table


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The adapters attached by :func:`add_lora`, by name."""
    return model.__dict__.setdefault("_qlora_adapters", {})


def pending_modules_to_save(model: nn.Module) -> list[str]:
    """Module paths the next :func:`add_lora` trains whole besides those it is given
    (:func:`qlora.model.tokens.add_special_tokens` marks the embeddings it grew)."""
    return model.__dict__.setdefault("_qlora_modules_to_save", [])


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def embedding_lora_layers(model: nn.Module) -> dict[str, LoraEmbedding]:
    """The token embeddings carrying LoRA (PEFT's ``lora_embedding_A/B``), by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraEmbedding)}


def experts_lora_layers(model: nn.Module) -> dict[str, ExpertsLora]:
    """The experts modules carrying LoRA on their 3-D weights (``target_parameters``), by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertsLora)}


def router_lora_layers(model: nn.Module) -> dict[str, RouterLora]:
    """The MoE routers carrying LoRA on their 2-D weight (``target_parameters``), by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RouterLora)}


def adapter_layers(model: nn.Module) -> list[LoraLinear | LoraEmbedding | ExpertsLora | RouterLora]:
    """Every layer holding named adapters: linear, embedding, expert and router ones."""
    return [*lora_layers(model).values(), *embedding_lora_layers(model).values(), *experts_lora_layers(model).values(),
            *router_lora_layers(model).values()]


def saved_module_layers(model: nn.Module) -> dict[str, SavedModules]:
    """The modules trained whole by adapters, each holding a copy per adapter (PEFT's ``modules_to_save``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SavedModules)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every adapter layer of ``model`` (LoRA, DoRA, AdaLoRA) off for the block: the base model,
    as PEFT's ``disable_adapter()``. The DPO reference model is this, so no second copy is loaded."""
    layers = [m for m in model.modules()
              if isinstance(m, (LoraLinear, LoraEmbedding, AdaLoraLinear, ExpertsLora, RouterLora, SavedModules))]
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, prev in zip(layers, previous):
            m.disabled = prev


def target_paths(model: nn.Module, target_modules: str | list[str], adapt_towers: bool = False) -> list[str]:
    head = output_embedding_names(model)
    # An Experts4bit's per-expert layers are its storage, not linear layers PEFT knows (it names 3-D weights).
    experts = tuple(n + "." for n, m in model.named_modules() if isinstance(m, Experts4bit))
    # A vision or audio tower gets no gradient from text: adapting it would only add dead weights (unless an adapter
    # loaded trained it on images: adapt_towers).
    towers = () if adapt_towers else tuple(n + "." for n in non_text_names(model))
    layers = [(n, m) for n, m in model.named_modules() if n and not n.endswith(".base_layer")
              and ".lora_" not in n and not f"{n}.".startswith(experts + towers)]  # a tower may be one linear
    candidates = [n for n, m in layers if (isinstance(m, LoraLinear) or is_linear_like(m)) and n not in head]
    if target_modules != "all-linear":
        # Named explicitly (as PEFT allows), the output head and token embeddings are adapted too.
        candidates += [n for n, m in layers if n in head or isinstance(m, (nn.Embedding, LoraEmbedding))]
    if target_modules == "all-linear":  # MoE routers excluded, unlike PEFT's: adapting one reroutes tokens
        dense = kept_dense_names(model)
        # A sparse-attention indexer (DeepSeek-V3.2, GLM-5) only ranks keys for a top-k choice: no gradient
        # reaches it from the loss, so an adapter there would stay zero.
        chosen = [n for n in candidates if n not in dense and ".indexer." not in f".{n}."]
    elif isinstance(target_modules, str):
        chosen = [n for n in candidates if re.fullmatch(target_modules, n)]
    else:
        chosen = [n for n in candidates if matches_any(n, target_modules)]
        unmatched = [t for t in target_modules if not any(matches_any(n, [t]) for n in candidates)]
        if unmatched and chosen:  # one typo next to a valid name must not silently adapt fewer layers
            import difflib

            leaf_names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            others = _other_modules(model, candidates, experts, towers)
            named = {t for t in unmatched if any(matches_any(p, [t]) for p in others)}  # no typo: the hint says why
            hints = [f"{t!r} (did you mean {', '.join(close)}?)" if t not in named and (
                close := difflib.get_close_matches(t, leaf_names, n=2, cutoff=0.6)) else repr(t) for t in unmatched]
            raise UsageError(f"target modules {', '.join(hints)} match no linear layer of this model. "
                             + unmatched_hint(unmatched, leaf_names, others))
    if not chosen:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        others = _other_modules(model, candidates, experts, towers)
        raise UsageError(f"target modules {target_modules!r} match no linear layer of this model. "
                         + unmatched_hint(target_modules, leaf_names, others))
    return chosen


def _other_modules(model: nn.Module, candidates: list[str], experts: tuple[str, ...],
                   towers: tuple[str, ...]) -> dict[str, str]:
    """:func:`weight_modules` of the model beside ``candidates``, noting the experts' storage and the towers."""
    notes = {p: "(storage of 3-D expert weights: adapt those with target_parameters)" for p in experts}
    notes.update({p: "(in a vision or audio tower, which text training never reaches)" for p in towers})
    return weight_modules(model, candidates, notes)


def target_names(target_modules: list[str] | str | None, paths: list[str]) -> list[str]:
    """An adapter config's target modules as layer names; a PEFT regex (a string) by the layers it adapted."""
    if isinstance(target_modules, str):
        return sorted({p.rsplit(".", 1)[-1] for p in paths})
    return list(target_modules or [])


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Experts modules with 3-D weights (4-bit, 16-bit, or already carrying expert LoRA), by path."""
    out: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p in out):
            continue
        if isinstance(m, (ExpertsLora, Experts4bit)) or expert_weight_names(m):
            out[path] = m
    return out


def _has_experts_modules() -> bool:
    """Whether transformers defines MoE experts modules (v5's ``transformers.integrations.moe``)."""
    import importlib.util

    return importlib.util.find_spec("transformers.integrations.moe") is not None


def _select_parameters(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """``{experts path: [weight names]}`` matched by PEFT's ``target_parameters`` rule (a target equals
    ``<module path>.<parameter>`` or its end), weights in the module's registration order."""
    experts = expert_modules(model)
    own = {path for path, m in experts.items() if not experts_layout(m).standard}
    for path in own:
        hit = [w for w in experts_layout(experts[path]).names if matches_any(f"{path}.{w}", targets)]
        if hit:
            kind = type(getattr(experts[path], "_source", experts[path])).__name__
            raise UsageError(f"target parameters name {path}.{hit[0]}, an expert weight of {kind}, whose experts "
                             "have a layout of their own (DBRX's 2-D stacks, JetMoE's parallel experts, "
                             "LongCat-Flash's zero experts); LoRA on expert weights (target_parameters) covers "
                             "transformers' standard experts modules (3-D weights, one slice per routed expert) only. "
                             "Adapt the model's linear layers (attention, shared experts) with target_modules instead.")
    keys = {f"{path}.{w}": (path, w) for path, m in experts.items() if path not in own
            for w in (m.shapes if isinstance(m, ExpertsLora) else expert_shapes(m))}
    routers = {f"{path}.weight": (path, "weight") for path in router_modules(model, experts)}
    chosen: dict[str, list[str]] = {}
    for key, (path, w) in (keys | routers).items():
        if matches_any(key, targets):
            chosen.setdefault(path, []).append(w)
    unmatched = [t for t in targets if not any(matches_any(k, [t]) for k in keys | routers)]
    if unmatched:
        others = [n for n, _ in model.named_parameters() if ".lora_" not in n and not n.startswith(
            tuple(p + "." for p in experts))] + [f"{n}.weight" for n, m in model.named_modules()
                                                 if isinstance(m, Linear4bit) and not n.startswith(tuple(experts))]
        wrong = {t: next(k for k in others if matches_any(k, [t])) for t in unmatched
                 if any(matches_any(k, [t]) for k in others)}
        exist = (f"Its expert weights are named: {', '.join(sorted({k.rsplit('.', 1)[-1] for k in keys}))} "
                 f"(e.g. {', '.join(sorted(keys)[:2])})." if keys else "This model has no 3-D expert weights "
                 "(transformers' MoE experts modules); adapt its linear layers with target_modules."
                 + ("" if _has_experts_modules() else " LoRA on expert weights needs transformers 5, whose MoE "
                    "models hold their experts in such modules; this transformers (4.x) keeps them as per-expert "
                    "linear layers (adapted through target_modules) or in layouts qlora does not adapt."))
        if routers:
            exist += f" Its MoE routers' weights, which LoRA may adapt too, are e.g. {', '.join(sorted(routers)[:2])}."
        detail = "; ".join(f"{t!r} names {wrong[t]}, which is neither an expert weight nor a router's (linear "
                           "layers are adapted through target_modules)" for t in wrong)
        raise UsageError(f"target parameters {', '.join(map(repr, unmatched))} match no expert or router weight of "
                         f"this model"
                         f"{': ' + detail if detail else ''}. {exist}")
    return chosen


def parameter_keys(model: nn.Module) -> list[str]:
    """``<module path>.<weight>`` of every weight ``target_parameters`` may name: the experts modules' 3-D weights
    (those of a layout of their own too, which :func:`add_lora` refuses by name) and the routers' 2-D weights."""
    experts = expert_modules(model)
    names = {path: m.shapes if isinstance(m, ExpertsLora) else getattr(experts_layout(m), "names", None)
             or expert_shapes(m) for path, m in experts.items()}
    keys = [f"{path}.{w}" for path, ws in names.items() for w in ws]
    return keys + [f"{path}.weight" for path in router_modules(model, experts)]


def router_modules(model: nn.Module, experts: dict[str, nn.Module] | None = None) -> list[str]:
    """Paths of the MoE routers (2-D weights of modules that are no linear layer, outside experts modules) that
    PEFT's ``target_parameters`` may adapt, as :class:`RouterLora` does."""
    skip = tuple(p + "." for p in (expert_modules(model) if experts is None else experts))
    inner = tuple(n + ".base_layer" for n, m in model.named_modules() if isinstance(m, RouterLora))
    return [n for n, m in model.named_modules() if n and not n.startswith(skip) and n not in inner
            and adaptable_router(m)]


def adaptable_router(module: nn.Module) -> bool:
    """A router :class:`RouterLora` adapts (or already adapts): no layer qlora adapts as linear (Falcon's
    ``FalconLinear``, GPT-2's ``Conv1D``) or embedding."""
    return isinstance(module, RouterLora) or (is_router(module) and not is_linear_like(module))


def _modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    if names is None:
        return list(pending_modules_to_save(model))
    paths = [n for n, m in model.named_modules() if n and matches_any(n, names) and not isinstance(m, LoraLinear)]
    unmatched = [n for n in names if not any(matches_any(p, [n]) for p in paths)]
    if unmatched:
        raise UsageError(f"modules_to_save {unmatched} match no module of this model.")
    check_trainable_whole(model, paths, "modules_to_save")
    return paths


def check_trainable_whole(model: nn.Module, paths: list[str], source: str) -> None:
    """Refuse training whole (``modules_to_save``, named by ``source``) a module with a 4-bit part no dense layer
    replaces (:func:`qlora.nn.undequantizable`); 4-bit linear layers are trained dense (:func:`train_whole`).

    Raises:
        UsageError: naming the part.
    """
    for path in paths:
        part = undequantizable(model.get_submodule(path))
        if part is not None:
            where = f"{path}.{part}" if part else path
            raise UsageError(f"{source} names {path}, but {where} is stored in 4 bits as MoE experts or as a "
                             "GPT-2 Conv1D layer, which qlora cannot train whole. Keep it dense when loading "
                             "(skip_modules / quantize_experts=False, or a checkpoint that lists it in "
                             "llm_int8_skip_modules), or leave it out of modules_to_save.")


def train_whole(model: nn.Module, paths: list[str], ensure_weight_tying: bool) -> None:
    """Make the modules at ``paths`` trainable (PEFT's ``modules_to_save``), their 4-bit linear layers replaced
    by dense ones of the dequantized weights (:func:`qlora.nn.dequantized`): packed codes take no gradient; a
    tied embedding and head untied unless ``ensure_weight_tying`` (:mod:`qlora.model.tied_tables`)."""
    if not ensure_weight_tying:
        untie_trained_whole(model, paths, both=False)
    for path in paths:
        current = model.get_submodule(path)
        module = dequantized(current)
        if module is not current:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
        module.requires_grad_(True)


def trained_biases(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """The biases PEFT's ``bias`` mode trains, by state-dict key: ``"all"`` every parameter named
    ``bias`` outside the adapters, ``"lora_only"`` those of the layers LoRA wraps."""
    if bias == "none":
        return {}
    if bias == "all":
        return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and ".lora_" not in n}
    return {f"{path}.base_layer.bias": m.base_layer.bias for path, m in lora_layers(model).items()
            if getattr(m.base_layer, "bias", None) is not None}


def pattern_key(patterns: Iterable[str], path: str) -> str | None:
    """The first key of a PEFT ``rank_pattern``/``alpha_pattern`` that matches a module path
    (PEFT's rule: the key is a regex matching the whole path or a ``.``-separated tail of it)."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), None)


def layer_spec(spec: LoraSpec, path: str, rank_pattern: dict, alpha_pattern: dict) -> LoraSpec:
    r_key, alpha_key = pattern_key(rank_pattern, path), pattern_key(alpha_pattern, path)
    if r_key is None and alpha_key is None:
        return spec
    return dataclasses.replace(spec, r=int(rank_pattern[r_key]) if r_key is not None else spec.r,
                               alpha=float(alpha_pattern[alpha_key]) if alpha_key is not None else spec.alpha)


def _check_adapter_fits(model: nn.Module, paths: list[str], spec: LoraSpec, rank_pattern: dict,
                        alpha_pattern: dict) -> None:
    """Refuse LoRA factors on the CPU larger than the memory it has left (a rank of 999999): Linux would grant
    them and kill the process as they are filled, with no message (:mod:`qlora.cpu_memory`)."""
    from ..cpu_memory import available_bytes

    first = next(model.parameters(), None)
    if not paths or first is None or first.device.type != "cpu":
        return
    numel, smallest = 0, None  # A is r x in, B is out x r, whichever way the weight is stored
    for path in paths:
        module = model.get_submodule(path)
        base = getattr(module, "base_layer", module)
        if isinstance(base, nn.Embedding):
            dims = (base.num_embeddings, base.embedding_dim)
        elif hasattr(base, "in_features"):
            dims = (base.in_features, base.out_features)
        else:  # transformers' Conv1D: a [in, out] weight
            dims = tuple(base.weight.shape)
        numel += layer_spec(spec, path, rank_pattern, alpha_pattern).r * sum(dims)
        smallest = min(dims) if smallest is None else min(smallest, *dims)
    need = numel * torch.empty((), dtype=spec.dtype).element_size()
    available = available_bytes()
    if available is not None and need > available:
        raise UsageError(f"rank {spec.r} (--rank): the LoRA factors of the {len(paths)} adapted layers would take "
                         f"{need / 2**30:.1f} GiB, and the CPU has {available / 2**30:.1f} GiB available. Lower the "
                         "rank: a layer's update B A has rank at most min(in, out), here as low as "
                         f"{smallest}, so a larger rank adds memory, not capacity.")


def check_patterns(rank_pattern: dict, alpha_pattern: dict, paths: list[str], warn: bool = True) -> None:
    for what, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise UsageError(f"{what} key {key!r} is not a valid regular expression ({exc}).") from None
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and (
                what == "alpha_pattern" or float(value).is_integer())
            if not valid:
                raise UsageError(f"{what}[{key!r}] must be a positive {'integer' if what == 'rank_pattern' else 'number'}"
                                 f", got {value!r}.")
            if warn and not any(pattern_key([key], p) for p in paths):
                log.warning("qlora: %s key %r matches none of the adapted layers", what, key)


def _check_unshared(model: nn.Module, paths: list[str], init: str) -> None:
    """PiSSA/OLoRA rewrite the base weight in place: refuse embeddings and a weight that
    another module shares (an output head tied to the embedding would change it too)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not name.endswith(".base_layer"):
            owners.setdefault(id(weight), []).append(name)
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, (nn.Embedding, LoraEmbedding)):
            raise UsageError(f"{path} is a token embedding; init {init!r} works on linear layers only (PEFT's "
                             "PiSSA/OLoRA too). Leave it out of the target modules.")
        shared = [n for n in owners.get(id(module.weight), []) if n != path and not n.startswith(path + ".")]
        if shared:
            raise UsageError(f"{path} shares its weight with {shared[0]} (tied embeddings); init {init!r} would "
                             "rewrite both. Leave it out of the target modules, or untie the weights first.")


def check_init(init: str, loftq_iter: int) -> None:
    """Refuse an unknown init, or LoftQ steps out of range."""
    if init == "loftq" and not 1 <= loftq_iter <= 5:
        raise UsageError(f"loftq_iter must be 1 to 5 (each step is an SVD of every adapted layer), got {loftq_iter}")
    if init not in ("kaiming", "gaussian", "loftq") and not is_residual_init(init):
        raise UsageError(f"unknown init {init!r}: use kaiming, gaussian, loftq, pissa, pissa_niter_K (K >= 0: "
                         "randomized SVD with K subspace iterations) or olora (PEFT's init_lora_weights).")


def _adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The factors (and DoRA magnitudes) of every adapter on ``model``, not their base layers."""
    layers = [m for m in model.modules()
              if isinstance(m, (LoraLinear, LoraEmbedding, AdaLoraLinear, ExpertsLora, RouterLora))]
    return [p for m in layers for n, p in m.named_parameters() if n.startswith("lora_")]


def _checked_hyperparameters(r: int, alpha: float, dropout: float, init: str | bool,
                             dtype: torch.dtype | str) -> tuple[int, float, float, str, torch.dtype]:
    """``r``, ``alpha``, ``dropout``, ``init`` and ``dtype`` as the layers (and adapter_config.json) take them, each
    refused by name when invalid, before any layer is touched. ``init=True`` is PEFT's ``init_lora_weights=True``:
    the default Kaiming init."""
    def number(value) -> bool:  # numbers.Real: NumPy's scalars too, as a hyper-parameter sweep may give them
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    if not (number(r) and r > 0 and float(r).is_integer()):
        raise UsageError(f"r (the LoRA rank) must be a positive integer, got {r!r}.")
    if not number(alpha):
        raise UsageError(f"alpha (PEFT's lora_alpha) must be a number, got {alpha!r}.")
    if not (number(dropout) and 0 <= dropout < 1):
        raise UsageError(f"dropout (PEFT's lora_dropout) must be a number in [0, 1), got {dropout!r}.")
    if init is True:
        init = "kaiming"
    if not isinstance(init, str):
        raise UsageError(f"init must be the name of a LoRA init ('kaiming', 'gaussian', 'loftq', 'pissa', 'olora', ...)"
                         f" or True (the default init, PEFT's init_lora_weights=True), got {init!r}.")
    return int(r), float(alpha), float(dropout), init.strip().lower(), float_dtype(dtype, "dtype")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, 4-bit weights counted as their element count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, weight_count(model)


def check_language_model(model: nn.Module, call: str) -> None:
    """Refuse, before any layer is changed, a torch module that is not a transformers model: adapters here are
    PEFT's causal-LM ones, found through the model's embedding and head (``get_output_embeddings``)."""
    if not hasattr(model, "get_output_embeddings"):
        raise UsageError(f"{call} adapts transformers language models (a PreTrainedModel, as qlora.load_model "
                         f"returns); {type(model).__name__} is a torch module of another kind, left as it was. For "
                         "LoRA on a model of your own, use PEFT (get_peft_model with task_type=None); "
                         "qlora.quantize_model and qlora.nn.Linear4bit work on any torch model.")


def check_adapter_name(name: str) -> None:
    """Refuse a name torch cannot key the adapter layers with, before any layer is changed."""
    problem = adapter_name_problem(name)
    if problem:
        raise UsageError(f"{name!r} cannot name an adapter: {problem}; choose another name (letters, digits, "
                         "'-' and '_').")


def add_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target_modules: str | Iterable[str] | None = "all-linear",
    rslora: bool = False,
    adapter_name: str = "default",
    init: str | bool = "kaiming",
    dtype: torch.dtype | str = torch.float32,
    verbose: bool = True,
    modules_to_save: str | list[str] | None = None,
    use_dora: bool = False,
    loftq_iter: int = 1,
    loftq_quant: tuple[str, int, bool] = ("nf4", 64, True),
    target_parameters: list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    lora_bias: bool = False,
    bias: str = "none",
    initial: StreamedInit | None = None,
    ensure_weight_tying: bool = False,
    adapt_towers: bool = False,
) -> nn.Module:
    """Attach a LoRA adapter to the matching linear layers; freeze everything else.

    Args:
        model: a transformers model (4-bit from :func:`qlora.load_model` or dense).
        r, alpha, dropout, rslora, init, dtype: adapter hyper-parameters (PEFT's meaning: ``r``, ``lora_alpha``,
            ``lora_dropout``, ``use_rslora``, ``init_lora_weights`` with ``True`` the default init); ``dtype``
            of the LoRA weights, a torch float dtype or its name (``"bfloat16"``);
            ``init="loftq"`` needs a dense model (``load_model(quant=None)``) and
            quantizes each adapted layer to the LoftQ base ``loftq_quant`` =
            (quant_type, blocksize, double_quant) in ``loftq_iter`` steps; the other
            linear layers stay dense (``quantize_model`` them). The adapter is valid
            only on that base: save it with ``save_quantized`` next to the adapter.
            ``init="pissa"``, ``"pissa_niter_K"`` or ``"olora"`` (PEFT's, see
            :mod:`qlora.nn.residual_init`) need dense adapted layers, start the adapter as
            ``s B0 A0`` of each weight and leave ``W - s B0 A0`` in the base (``quantize_model``
            it afterwards for QPiSSA); :func:`qlora.save_adapter` then writes the adapter
            converted to LoRA on the original weights. ``pissa_niter_K`` draws from torch's
            generator: seed it for a reproducible init.
        use_dora: DoRA (a trained magnitude per output row); composes with rslora.
        target_modules: ``"all-linear"`` (any case), a list of names (``["q_proj", "v_proj"]``,
            matched against the end of module paths) or one string as a regex over full paths (PEFT's
            rules); ``None`` (or ``[]``) with ``target_parameters``: the MoE experts only.
        adapter_name: adapters of several names can live on one model.
        modules_to_save: other modules trained whole and saved with the adapter
            (PEFT's meaning, e.g. ``["embed_tokens", "lm_head"]``; one string is one name); by default
            those that :func:`qlora.model.tokens.add_special_tokens` resized.
            They are trained in place, so adapters of one model share them. Of a tied embedding and head, the
            one saved is untied first, as PEFT trains its own copy, unless ``ensure_weight_tying`` (PEFT's
            option: the pair stays one table, saved under both keys); both saved are trained as the one table
            they are (:mod:`qlora.model.tied_tables`).
        target_parameters: 3-D MoE expert weights (and MoE routers' 2-D weights) to adapt, PEFT's
            ``target_parameters`` (``["mlp.experts.gate_up_proj", "7.mlp.experts.down_proj", "gate.weight"]``:
            a name equal to ``<module path>.<weight>`` or its end). Each expert gets its own rank-``r``
            adapter, laid out as PEFT's ``ParamWrapper`` (A ``(r * E, in)``, B ``(out, r * E)``); a router
            one rank-``r`` adapter (:class:`qlora.nn.RouterLora`), as PEFT's all-linear makes on
            transformers 5. PEFT allows no dropout, DoRA or LoftQ with them.
            ``target_modules`` may then be ``None`` or ``[]`` (experts only).
        rank_pattern, alpha_pattern: PEFT's per-layer rank and alpha: ``{regex: value}``,
            a key matching a module path or a ``.``-separated tail of it
            (``{"v_proj": 8, "layers\\.0\\.self_attn\\.q_proj": 32}``); other layers get ``r``/``alpha``.
        lora_bias: PEFT's ``lora_bias``: B gets a trained bias (merging needs a base bias).
        bias: PEFT's ``bias``: ``"none"``, ``"all"`` (every bias of the model is trained) or
            ``"lora_only"`` (the adapted layers' own biases); trained in place and saved with
            the adapter, so adapters of one model share them, as ``modules_to_save``.
        initial: the LoftQ/PiSSA/OLoRA init computed layer by layer while the model was loaded 4-bit
            (``load_model(weight_hook=initial)``, :mod:`qlora.model.streamed_init`): the adapted layers
            start from its factors, their bases already holding Q or the residual: bit for bit those of
            ``add_lora(init=...)`` on the dense model and ``quantize_model``, without the whole 16-bit
            model in memory. Give ``torch.manual_seed`` the seed it was given, and the same options.
        adapt_towers: let ``target_modules`` match layers of a vision or audio tower and its projector, left out
            otherwise (text gives them no gradient): for an adapter PEFT trained there on images.

    Returns:
        The same model, modified in place.

    Raises:
        UsageError: nothing matches (the message lists the layer names that exist), or an option is invalid
            (named in the message); the model is then left as it was.
    """
    check_language_model(model, "add_lora")
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise UsageError(f"the model already has an adapter named {adapter_name!r}")
    check_adapter_name(adapter_name)
    r, alpha, dropout, init, dtype = _checked_hyperparameters(r, alpha, dropout, init, dtype)
    if isinstance(target_modules, str) and target_modules.strip().lower() == "all-linear":
        target_modules = "all-linear"  # PEFT's shorthand, in any case as PEFT reads it
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    check_init(init, loftq_iter)
    if is_residual_init(init) and (use_dora or lora_bias):
        raise UsageError(f"init {init!r} does not combine with {'DoRA' if use_dora else 'lora_bias'}: its adapter is "
                         "saved converted to plain LoRA on the original weights (B A - B0 A0), which DoRA's "
                         "magnitudes and a LoRA bias do not survive. Drop one of them.")
    if bias not in ("none", "all", "lora_only"):
        raise UsageError(f"bias must be 'none', 'all' or 'lora_only' (PEFT's meaning), got {bias!r}.")
    if lora_bias and use_dora:
        raise UsageError("lora_bias does not combine with DoRA (PEFT refuses it too): drop one of them.")
    spec = LoraSpec(r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init, dtype=dtype, use_dora=use_dora,
                    loftq_iter=loftq_iter, loftq_quant=loftq_quant, lora_bias=lora_bias)
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    target_parameters = [t for t in (target_parameters or []) if t]
    if target_parameters and (dropout or use_dora or lora_bias or init not in ("kaiming", "gaussian")):
        what = "lora dropout" if dropout else "DoRA" if use_dora else "lora_bias" if lora_bias else f"init {init!r}"
        raise UsageError(f"target_parameters (LoRA on expert weights) does not work with {what}: PEFT refuses it "
                         "for these adapters, so the adapter could not be loaded there. Set dropout to 0 "
                         "(--dropout 0), no DoRA or lora_bias, and init 'kaiming' or 'gaussian'.")
    no_modules = target_modules is None or (not isinstance(target_modules, str) and not target_modules)
    if no_modules and not target_parameters:
        raise UsageError("nothing to adapt: give target_modules (or 'all-linear') or target_parameters.")
    experts = _select_parameters(model, target_parameters) if target_parameters else {}
    paths = [] if no_modules else target_paths(model, target_modules, adapt_towers)
    save_paths = _modules_to_save(model, modules_to_save)
    if ensure_weight_tying:
        save_paths = with_tied_partner(model, save_paths)
    # PEFT's rule: a module trained whole (an embedding grown by added tokens) gets no LoRA, nor do its parts
    paths = [p for p in paths if not any(p == s or p.startswith(s + ".") for s in save_paths)]
    if not paths and not no_modules and not experts:
        raise UsageError(f"target modules {target_modules!r} match only modules trained whole "
                         f"({', '.join(save_paths)}: modules_to_save, or the embedding and head grown by added "
                         "tokens), which get no LoRA (PEFT's rule): target other layers as well.")
    if is_residual_init(init):
        _check_unshared(model, paths, init)
    check_patterns(rank_pattern, alpha_pattern, paths + [f"{p}.{w}" for p, ws in experts.items() for w in ws])
    rank_pattern = {k: int(v) for k, v in rank_pattern.items()}  # (a rank of 4.0 written back would fail in PEFT)
    _check_adapter_fits(model, paths, spec, rank_pattern, alpha_pattern)
    # Adapters already attached keep their trainability (a frozen loaded adapter stays frozen), as PEFT's add_adapter.
    earlier = {p: p.requires_grad for p in _adapter_parameters(model)}
    for p in model.parameters():  # frozen once the options are known good: a refused call leaves the model as it was
        p.requires_grad_(False)
    fan_in_fan_out = False
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, (LoraLinear, LoraEmbedding)):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            module = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
            setattr(parent, child, module)
        own = layer_spec(spec, path, rank_pattern, alpha_pattern)
        start = initial.start(path, own) if initial is not None else None
        try:
            if start is not None:  # a linear layer whose base the streamed init already rewrote
                module.add_adapter(adapter_name, own, start)
            else:  # an init computed here draws as it would in this order (pissa_niter_K), however it was streamed
                with initial.draws(path) if initial is not None else contextlib.nullcontext():
                    module.add_adapter(adapter_name, own)
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from exc
        fan_in_fan_out |= getattr(module, "fan_in_fan_out", False) or getattr(module.base_layer, "from_conv1d", False)
        module.train(model.training)  # new dropout modules follow the model's train/eval mode
    if initial is not None and initial.factors:
        raise UsageError(f"the init streamed while loading was computed for {', '.join(sorted(initial.factors)[:3])}, "
                         "which this adapter does not target; give add_lora the target_modules given to StreamedInit.")
    for path, weights in experts.items():
        module = model.get_submodule(path)
        if adaptable_router(module):  # a router: its one 2-D weight
            if not isinstance(module, RouterLora):
                parent_path, _, child = path.rpartition(".")
                module = RouterLora(module)
                setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
            try:
                module.add_adapter(adapter_name, layer_spec(spec, f"{path}.weight", rank_pattern, alpha_pattern))
            except ValueError as exc:
                raise UsageError(f"{path}: {exc}") from exc
            continue
        if not isinstance(module, ExpertsLora):
            parent_path, _, child = path.rpartition(".")
            module = ExpertsLora(module)
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
        # PEFT matches the patterns against each parameter's name, <module path>.<weight>
        module.add_adapter(adapter_name, {w: layer_spec(spec, f"{path}.{w}", rank_pattern, alpha_pattern)
                                          for w in weights}, weights)
    for layer in [*experts_lora_layers(model).values(), *router_lora_layers(model).values()]:
        for p in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters()):
            p.requires_grad_(True)
    for layer in lora_layers(model).values():
        for p in layer.lora_A.parameters():
            p.requires_grad_(True)
        for p in layer.lora_B.parameters():
            p.requires_grad_(True)
        for p in layer.lora_magnitude_vector.parameters():
            p.requires_grad_(True)
    for layer in embedding_lora_layers(model).values():
        for p in list(layer.lora_embedding_A.parameters()) + list(layer.lora_embedding_B.parameters()):
            p.requires_grad_(True)
    train_whole(model, save_paths, ensure_weight_tying)
    for p in trained_biases(model, bias).values():
        p.requires_grad_(True)
    for p, trainable in earlier.items():
        p.requires_grad_(trainable)
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    configs[adapter_name] = AdapterConfig(spec, names, fan_in_fan_out, getattr(model, "name_or_path", None), paths,
                                          save_paths, list(target_parameters), rank_pattern, alpha_pattern, bias,
                                          ensure_weight_tying=ensure_weight_tying and bool(save_paths))
    if verbose:
        trainable, total = count_parameters(model)
        log.info("qlora: %d layers and %d experts modules or routers adapted; trainable params %s of %s (%.4f%%)",
                 len(paths), len(experts), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model

