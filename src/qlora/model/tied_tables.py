"""An output head that is the input embedding's table (tied weights), and untying the two.

PEFT trains a module saved whole (``modules_to_save``) as its own copy: of a tied embedding and head, an adapter
that saves one changes that one only (the other stays the base's table), and one that saves both trains two
tables, unless its ``ensure_weight_tying`` keeps them one. qlora trains such modules in place, so it unties the
pair first, giving the saved one a table of its own, and records the untie in the config (or loading would tie
them again). Both saved: a loaded adapter's two tables are untied (they differ); a new adapter trains them as
the one table they are (saved under both keys, equal: what PEFT and qlora load from the file is the model
trained), rather than paying for a second vocabulary-sized table and its optimizer state.
"""

from __future__ import annotations

from torch import nn

from ..nn import SavedModules


def shares_table(model: nn.Module, originals: bool = False) -> bool:
    """Whether the output head and the input embedding are one tensor (tied); with ``originals``, those the
    adapters' copies wrap (:class:`qlora.nn.SavedModules`, whose weight is the running copy's)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if originals:
        out, inp = (m.original_module if isinstance(m, SavedModules) else m for m in (out, inp))
    return out is not None and inp is not None and getattr(out, "weight", None) is inp.weight


def untie_config(model: nn.Module) -> None:
    """Record in the config that head and embedding now differ, or loading would tie them again."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def untie_trained_whole(model: nn.Module, save_paths: list[str], both: bool) -> None:
    """Untie a tied embedding and head one of which (or, with ``both``, each of which) is trained whole in place
    (``save_paths``), as PEFT's copies are: the first saved one gets its own table."""
    if not shares_table(model):
        return
    pair = (model.get_input_embeddings(), model.get_output_embeddings())
    saved = [m for m, path in zip(pair, _paths(model, pair)) if path in save_paths]
    if len(saved) == 1 or (saved and both):
        module = saved[0]
        module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
        untie_config(model)


def with_tied_partner(model: nn.Module, save_paths: list[str]) -> list[str]:
    """``save_paths`` and, where it names one of a tied embedding and head, the other: with ``ensure_weight_tying``
    the pair is one table trained whole, which PEFT saves under both modules' keys."""
    if not shares_table(model):
        return save_paths
    pair = _paths(model, (model.get_input_embeddings(), model.get_output_embeddings()))
    if any(p in save_paths for p in pair):
        return save_paths + [p for p in pair if p is not None and p not in save_paths]
    return save_paths


def _paths(model: nn.Module, modules: tuple[nn.Module, ...]) -> list[str | None]:
    """The path of each of ``modules`` in ``model`` (None for one not in it)."""
    paths = {id(m): p for p, m in model.named_modules()}
    return [paths.get(id(m)) for m in modules]
