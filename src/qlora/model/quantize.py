"""Swap a model's linear layers for 4-bit ones, explicitly and per instance.

One replace function walks the module tree; callers decide per layer what to
put in its place. No transformers code is patched.
"""

from __future__ import annotations

import ast
import functools
import inspect
import numbers
import operator
import re
import textwrap
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import UsageError
from ..float_dtype import float_dtype
from ..nn import Experts4bit, Linear4bit, computed_experts, expert_weight, expert_weight_names, experts_layout
from ..quant import BLOCKSIZES, NonFiniteError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer with weight ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` that computes ``x @ W^T + b`` and nothing else: ``nn.Linear``
    itself, or a subclass whose own forward gives the same result (Falcon's
    ``FalconLinear``), but not one that does more (MoE routers returning top-k
    indices, DeepSeek-V4's grouped linear)."""
    return isinstance(module, nn.Linear) and _computes_linear(type(module))


@functools.lru_cache(maxsize=None)
def _computes_linear(cls: type) -> bool:
    """Run the class's forward on a small probe instance and compare it with ``F.linear``."""
    if cls.forward is nn.Linear.forward:
        return True
    try:
        probe = cls.__new__(cls)
        nn.Linear.__init__(probe, 8, 4, bias=True, device="cpu", dtype=torch.float32)
        x = torch.randn(3, 8, device="cpu", generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = probe(x)
            return (torch.is_tensor(out) and out.shape == (3, 4)
                    and torch.allclose(out, nn.functional.linear(x, probe.weight, probe.bias), atol=1e-5))
    except Exception:  # a forward that needs more than a linear layer's state is not one
        return False


def tied_keys(model: nn.Module) -> dict[str, str]:
    """``{target: source}`` of the tensors ``tie_weights`` ties: transformers 5 lists them all; 4.x ties the
    output embedding to the input one where the config ties word embeddings."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)  # transformers 5
    if expand is not None:
        return expand(all_submodels=True)
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return {}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    if head is None or embed is None or head is embed or id(head) not in names or id(embed) not in names:
        return {}
    return {f"{names[id(head)]}.weight": f"{names[id(embed)]}.weight"}


def weight_count(model: nn.Module) -> int:
    """The model's parameter count, a 4-bit layer's weight counted as its elements (its codes are a buffer)."""
    return (sum(p.numel() for p in model.parameters())
            + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit)))


def is_linear_like(module: nn.Module) -> bool:
    return is_plain_linear(module) or isinstance(module, Linear4bit) or is_conv1d(module)


def router_names(model: nn.Module) -> set[str]:
    """Paths of MoE routers and gates: linear layers beside an ``experts`` module
    (``mlp.gate``, ``mlp.shared_expert_gate``), or the one linear layer of a gate module
    beside it when that has one output per expert (Hunyuan's ``mlp.gate.wg``). They stay 16-bit and are
    not LoRA targets: quantizing or adapting them changes which experts a token reaches."""
    names = set()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        grouped = [n for n, c in module.named_children() if getattr(experts_layout(c), "grouped", False)]
        if grouped:  # JetMoE: parallel experts gated by the module holding them, its router beside them
            count = _expert_count(module.get_submodule(grouped[0]))
            names.update(f"{prefix}{n}" for n, m in module.named_modules() if n and not n.startswith(tuple(grouped))
                         and _is_linear_or_wrapped(m) and getattr(m, "out_features", None) == count)
            continue
        experts = module._modules.get("experts")
        if experts is None or any(getattr(experts_layout(c), "grouped", False) for c in experts.children()):
            continue  # (JetMoE's mixture of attention heads, named experts, holds its own router)
        count = _expert_count(experts)
        for child_name, child in module.named_children():
            if child_name == "experts":
                continue
            if _is_linear_or_wrapped(child):
                names.add(prefix + child_name)
                continue
            inner = [(n, m) for n, m in child.named_modules() if n and _is_linear_or_wrapped(m)]
            if len(inner) == 1:  # a gate module holds its one projection; a shared expert is an MLP of several
                # (Qwen3-Next's is 512 wide for its 512 experts: its gate_proj and up_proj are no routers)
                names.update(f"{prefix}{child_name}.{n}" for n, m in inner
                             if count is not None and getattr(m, "out_features", None) == count)
    return names


def _is_linear_or_wrapped(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Linear4bit)) or type(getattr(m, "base_layer", None)) in (nn.Linear, Linear4bit)


def _expert_count(experts: nn.Module) -> int | None:
    """How many experts an experts module's router chooses from (its ``num_experts``, list length, or the experts
    its layout computes plus its identity experts)."""
    if isinstance(experts, Experts4bit):
        return experts.num_experts + experts.layout.identity_experts
    n = getattr(experts, "num_experts", None)
    if isinstance(n, int):
        return n
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    layout = experts_layout(experts)
    if layout is not None:
        return computed_experts(layout, experts) + layout.identity_experts
    return None


def text_decoder_path(model: nn.Module) -> str:
    """Module path of the text decoder (``model``; ``model.language_model`` in a
    vision-language model), ``""`` when the model does not say."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return ""
    if decoder is None:
        return ""
    decoder = _text_part(decoder, model)
    return next((n for n, m in model.named_modules() if m is decoder), "")


def _text_part(decoder: nn.Module, model: nn.Module) -> nn.Module:
    """The text decoder inside ``decoder`` where that is still the multimodal body (its config has vision or audio
    sub-configs; BLT's text-only patcher/encoder/decoder/global configs are not): transformers 4.x's
    ``get_decoder`` returns the whole body of Idefics2/3, SmolVLM and DeepSeek-VL, whose text decoder is the
    sub-model holding the input embeddings (transformers 5 returns that one itself)."""
    while any(w in k for k in getattr(getattr(decoder, "config", None), "sub_configs", None) or {} for w in _MEDIA):
        embeddings = model.get_input_embeddings()
        child = next((c for c in decoder.children() if hasattr(c, "config") and c is not embeddings
                      and any(m is embeddings for m in c.modules())), None)
        if child is None:
            break
        decoder = child
    return decoder


def non_text_names(model: nn.Module) -> set[str]:
    """Paths of the towers a multimodal model keeps beside its text decoder (vision and
    audio encoders, their projectors). Text never flows through them: they stay 16-bit,
    exact for image use after a merge, and are never LoRA targets. Empty for text-only
    models (a config without vision or audio sub-configs)."""
    subs = getattr(getattr(model, "config", None), "sub_configs", None) or {}
    path = text_decoder_path(model) if any(k != "text_config" for k in subs) else ""
    if not path:
        return set()
    head = output_embedding_names(model)
    names, parent, prefix = set(), model, ""
    for part in path.split("."):
        names.update(prefix + child for child in parent._modules if child != part and prefix + child not in head)
        parent, prefix = parent._modules[part], f"{prefix}{part}."
    return names | _towers_inside(model, path)


_MEDIA = ("vision", "visual", "image", "audio", "speech", "video")  # in the names of media sub-configs


def _towers_inside(model: nn.Module, decoder: str) -> set[str]:
    """Towers that sit inside the text decoder's module (GIT's ``git.image_encoder``, Phi-4-multimodal's
    image and audio embedders, beside their text layers): the outermost modules built from a vision or audio
    sub-config of the model's config (not BLT's encoder, decoder and global configs: all text)."""
    config = model.config
    text = config.get_text_config()
    others = [c for k in config.sub_configs if (c := getattr(config, k, None)) is not None and c is not text
              and c is not config and any(w in k for w in _MEDIA)]
    if not others:
        return set()
    found: set[str] = set()
    for name, module in model.named_modules():
        if not name.startswith(decoder + ".") or any(name.startswith(f + ".") for f in found):
            continue
        if any(getattr(module, "config", None) is c for c in others):
            found.add(name)
    return found


def kept_in_fp32(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """Tensors the model's class keeps in fp32 whatever the load dtype, as transformers' ``from_pretrained``
    does: ``_keep_in_fp32_modules_strict`` under bf16 and fp16 (DeepSeek-V3's ``e_score_correction_bias``,
    whose bf16 rounding would change which experts are chosen), ``_keep_in_fp32_modules`` under fp16
    (gpt-oss's norms). Names are transformers' globs, searched in each tensor's key; transformers 4.x (no
    ``_get_dtype_plan``) matches them as whole dotted parts instead (its Ernie 4.5 lists ``gate``, which must
    not match the experts' ``gate_proj``)."""
    names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (
        torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not names:
        return None
    if not hasattr(model, "_get_dtype_plan"):
        return re.compile("|".join(rf"((^|\.){n}($|\.))" for n in sorted(names)))
    return re.compile("|".join(n.replace("*", ".*") for n in sorted(names)))


def fp32_linear_names(model: nn.Module, dtype: torch.dtype) -> set[str]:
    """Linear layers the model computes in fp32 at ``dtype`` (Ernie 4.5's router): not quantized either."""
    fp32 = kept_in_fp32(model, dtype)
    if fp32 is None:
        return set()
    return {n for n, m in model.named_modules() if n and fp32.search(f"{n}.weight") and is_plain_linear(m)}


def bnb_kept_names(model: nn.Module) -> set[str]:
    """Linear layers the model's class names in ``_keep_in_fp32_modules`` (DeepSeek-V4's attention compressor,
    T5's ``wo``), which transformers + bitsandbytes never quantizes, at any dtype (its quantizer adds them to
    ``modules_to_not_convert``): not quantized either, so a 4-bit file of the model loads there and computes as
    it does. Matched as transformers matches skipped modules."""
    names = sorted(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not names:
        return set()
    return {n for n, m in model.named_modules() if n and is_plain_linear(m) and is_skipped(n, names)}


def output_embedding_names(model: nn.Module) -> set[str]:
    """Module paths of the output head (never quantized or adapted by default)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


# ``self.<child>.weight`` used as a tensor (not only its dtype/device/shape), or the layer's input cast to
# its weight's dtype (DeepSeek-V3.2's ``self.weights_proj(x.to(self.weights_proj.weight.dtype))``), which
# a packed 4-bit weight (uint8) would turn into garbage.
_WEIGHT_READ = re.compile(r"self\.(\w+)\.weight\b(?!\.(?:dtype|device|shape|is_meta)\b)"
                          r"|self\.(\w+)\([^()]*\.to\((?:dtype=)?self\.\2\.weight\.dtype")
# A descendant's weight changed in place through an attribute chain (RWKV's ``_rescale_layers``:
# ``block.attention.output.weight.mul_(2 ** k)`` over ``self.blocks``), which 4-bit codes cannot take
# and which an adapter beside the weight would not follow.
_WEIGHT_MUTATED = re.compile(r"\b\w+((?:\.\w+)+)\.weight(?:\.data)?\.\w+_\(")


@functools.lru_cache(maxsize=None)
def _children_read_as_tensors(cls: type) -> tuple[tuple[str, bool, tuple[tuple[ast.expr, bool], ...]], ...]:
    """What a module class's own methods (not its initializers) do with layer weights
    besides calling the layers: ``(name, False, guards)`` for a child whose ``.weight`` they hand
    to other code (a fused Mamba kernel, ``weight @ x``), ``(suffix, True, guards)`` for a dotted
    path suffix of descendants whose weight they change in place. ``guards`` are the enclosing
    ``if`` tests and the truth each must have for the code to run (BLOOM slices its ``dense``
    weights only ``if self.pretraining_tp > 1 and self.slow_but_exact``)."""
    found: list[tuple[str, bool, tuple[tuple[ast.expr, bool], ...]]] = []
    for attr, fn in vars(cls).items():
        if not inspect.isfunction(fn) or attr == "__init__" or attr.lstrip("_").startswith("init"):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(fn))
        except (OSError, TypeError):
            continue
        reads = [(m, False) for m in _WEIGHT_READ.finditer(source)] + [(m, True) for m in _WEIGHT_MUTATED.finditer(source)]
        if not reads:
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            tree = None
        for match, mutated in reads:
            line = source.count("\n", 0, match.start()) + 1
            guards = _guards_at(tree, line) if tree is not None else ()
            names = [match.group(1).lstrip(".")] if mutated else [n for n in match.groups() if n]
            found.extend((name, mutated, guards) for name in names)
    return tuple(found)


def _guards_at(tree: ast.AST, line: int) -> tuple[tuple[ast.expr, bool], ...]:
    """The tests of the ``if`` statements whose body (True) or ``else`` (False) holds ``line``."""
    guards = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            for branch, truth in ((node.body, True), (node.orelse, False)):
                if branch and branch[0].lineno <= line <= branch[-1].end_lineno:
                    guards.append((node.test, truth))
    return tuple(guards)


_UNKNOWN = object()


def _guard_value(test: ast.expr, module: nn.Module, settings: dict[str, object]) -> object:
    """The value of an ``if`` test over the module's configuration (``self.config.x``, or ``self.x`` holding the
    config's value of the same name), or ``_UNKNOWN`` where it reads anything else (state such as
    ``self.training``, locals, calls): only a test known to be false rules code out."""
    if isinstance(test, ast.Constant):
        return test.value
    if isinstance(test, ast.Attribute) and isinstance(test.value, ast.Name) and test.value.id == "self":
        value = getattr(module, test.attr, _UNKNOWN)
        plain = (bool, int, float, str, type(None))
        same = (test.attr != "training" and isinstance(value, plain) and isinstance(settings.get(test.attr, _UNKNOWN), plain)
                and settings[test.attr] == value)
        return value if same else _UNKNOWN
    if (isinstance(test, ast.Attribute) and isinstance(test.value, ast.Attribute)
            and test.value.attr == "config" and isinstance(test.value.value, ast.Name) and test.value.value.id == "self"):
        return settings.get(test.attr, _UNKNOWN)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        value = _guard_value(test.operand, module, settings)
        return _UNKNOWN if value is _UNKNOWN else not value
    if isinstance(test, ast.BoolOp):
        values = [_guard_value(v, module, settings) for v in test.values]
        decisive = False if isinstance(test.op, ast.And) else True
        if any(v is not _UNKNOWN and bool(v) is decisive for v in values):
            return decisive
        return _UNKNOWN if any(v is _UNKNOWN for v in values) else not decisive
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, right = _guard_value(test.left, module, settings), _guard_value(test.comparators[0], module, settings)
        compare = _COMPARE.get(type(test.ops[0]))
        if compare is None or left is _UNKNOWN or right is _UNKNOWN:
            return _UNKNOWN
        try:
            return compare(left, right)
        except TypeError:
            return _UNKNOWN
    return _UNKNOWN


_COMPARE: dict[type, Callable[[object, object], bool]] = {
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Is: operator.is_, ast.IsNot: operator.is_not}


def _config_settings(model: nn.Module) -> dict[str, object]:
    """The model's configuration values by name (its text config's over the top level's)."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    settings = dict(vars(config))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        settings.update(vars(text))
    return settings


def _may_run(guards: tuple[tuple[ast.expr, bool], ...], module: nn.Module, settings: dict[str, object]) -> bool:
    """Whether code under ``guards`` may run for this module: False only when a test is known to have the
    other truth."""
    for test, truth in guards:
        value = _guard_value(test, module, settings)
        if value is not _UNKNOWN and bool(value) is not truth:
            return False
    return True


def kept_dense_names(model: nn.Module) -> set[str]:
    """Linear layers that stay 16-bit and outside ``all-linear``: the output head,
    MoE routers (:func:`router_names`), those of a multimodal model's vision or audio
    towers (:func:`non_text_names`) and their MoE experts, layers whose weight the model's code
    reads directly instead of calling the layer (Mamba mixers' ``out_proj``),
    where a packed 4-bit weight or a LoRA wrapper would be read as if it were
    the dense matrix, and layers whose weight it rescales in place (RWKV's
    ``attention.output`` and ``feed_forward.value`` when it switches between
    training and inference). Code that this model's configuration rules out
    (a branch whose test is false for it) does not count."""
    kept = output_embedding_names(model) | router_names(model)
    towers = tuple(t + "." for t in non_text_names(model))
    # a tower may itself be one linear layer (Llama 3.2 Vision's multi_modal_projector), or hold MoE experts of its
    # own (dots3-note's vision tower), kept 16-bit as its linear layers are
    kept.update(n for n, m in model.named_modules()
                if f"{n}.".startswith(towers) and (is_linear_like(m) or expert_weight_names(m)))
    return kept | read_as_tensors_names(model)


def read_as_tensors_names(model: nn.Module) -> set[str]:
    """The linear layers whose weight the model's code reads directly (Mamba mixers' ``out_proj``, Jamba's
    ``dt_proj``) or rescales in place, which no 4-bit layer can stand in for, whatever a checkpoint stores."""
    kept: set[str] = set()
    settings = _config_settings(model)
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for name, mutated, guards in _children_read_as_tensors(type(module)):
            if not _may_run(guards, module, settings):
                continue
            if not mutated:
                sub = module._modules.get(name)
                if sub is not None and is_linear_like(sub):
                    kept.add(prefix + name)
            else:
                kept.update(prefix + n for n, sub in module.named_modules()
                            if n and is_linear_like(sub) and (n == name or n.endswith("." + name)))
    return kept


def replace_modules(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> list[str]:
    """Replace every module for which ``make(path, module)`` returns a new one.

    Returns the replaced paths. Children are visited before being replaced, so
    ``make`` sees original modules only.
    """
    replaced = []
    for path, module in list(model.named_modules()):
        if not path:
            continue
        new = make(path, module)
        if new is None:
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, new)
        replaced.append(path)
    return replaced


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    """PEFT-style name match: a pattern equals the last path component(s) or the whole path."""
    return any(path == p or path.endswith("." + p) for p in patterns)


def checked_format(blocksize: int, double_quant: bool) -> tuple[int, bool]:
    """``blocksize`` and ``double_quant`` as :func:`quantize_model` and :func:`qlora.load_model` take them (NumPy
    scalars too), each refused by name before any layer changes: a string such as ``"no"`` would read as true."""
    if not (isinstance(blocksize, numbers.Real) and not isinstance(blocksize, bool) and blocksize in BLOCKSIZES):
        raise UsageError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))} (a power of two from 32 to "
                         f"4096, as bitsandbytes accepts), got {blocksize!r}.")
    if type(double_quant).__name__ not in ("bool", "bool_"):  # Python's or NumPy's
        raise UsageError(f"double_quant must be True or False (bitsandbytes' bnb_4bit_use_double_quant), got "
                         f"{double_quant!r}.")
    return int(blocksize), bool(double_quant)


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    skip_modules: str | Iterable[str] = ("lm_head",),
) -> list[str]:
    """Quantize every linear layer, and the 3-D experts of MoE layers, of an in-memory model in place,
    as :func:`qlora.model.load.load_model` quantizes them while loading.

    The output head and modules matching ``skip_modules`` (by name or regex; ``None``: no others)
    stay dense, as do layers in :func:`kept_dense_names`. Returns the quantized module paths.
    ``quant_type`` and ``compute_dtype`` take the spellings :func:`qlora.load_model` takes.

    Raises:
        UsageError: an option that is not one of its values, named, before any layer changes.
    """
    if not isinstance(quant_type, str) or quant_type.strip().lower() not in ("nf4", "fp4"):
        raise UsageError(f"quant_type must be nf4 or fp4, got {quant_type!r}")
    quant_type, compute_dtype = quant_type.strip().lower(), float_dtype(compute_dtype, "compute_dtype")
    blocksize, double_quant = checked_format(blocksize, double_quant)
    skip = {skip_modules} if isinstance(skip_modules, str) else set(skip_modules or ())
    skip |= kept_dense_names(model) | bnb_kept_names(model)

    def make(path: str, module: nn.Module) -> nn.Module | None:
        if expert_weight_names(module) and not is_skipped(path, skip):
            return _experts_4bit(path, module, quant_type, blocksize, double_quant, compute_dtype)
        if not (is_plain_linear(module) or is_conv1d(module)) or is_skipped(path, skip):
            return None
        try:
            layer = Linear4bit.from_linear(module, quant_type, blocksize, double_quant, compute_dtype,
                                           transposed=is_conv1d(module))
        except NonFiniteError as exc:
            raise NonFiniteError(f"module {path}: {exc}") from None
        layer.from_conv1d = is_conv1d(module)
        return layer

    return replace_modules(model, make)


def _experts_4bit(path: str, experts: nn.Module, quant_type: str, blocksize: int, double_quant: bool,
                  compute_dtype: torch.dtype) -> Experts4bit:
    """An experts module's 4-bit replacement holding its weights (its 16-bit 3-D weights are released)."""
    weights = {n: expert_weight(experts, n).detach() for n in expert_weight_names(experts)}
    biases = {n: b.detach() for n in weights if (b := experts._parameters.get(n + "_bias")) is not None}
    layer = Experts4bit(experts, compute_dtype, quant_type, blocksize, double_quant,
                        device=next(iter(weights.values())).device)
    for name, weight in weights.items():
        try:
            layer.set_weight(name, weight)
        except NonFiniteError as exc:
            raise NonFiniteError(f"module {path}: {exc}") from None
    for name, bias in biases.items():
        getattr(layer, name + "_bias").data.copy_(bias)
    return layer


def is_skipped(path: str, skip: Iterable[str]) -> bool:
    """``path`` is named by a skip entry: as its suffix, as a regex, or as an enclosing
    module (``model.vision_tower``), the ways transformers reads ``llm_int8_skip_modules``."""
    return any(matches_any(path, [s]) or re.fullmatch(s, path) or path.startswith(s + ".") for s in skip)
