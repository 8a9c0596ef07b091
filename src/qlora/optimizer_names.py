"""The optimizer names ``--optim`` takes: qlora's, and other tools' names for the same maths.

Apart from :mod:`qlora.optim.factory`, which builds them, so that checking a name does not import torch; beside
the layers, since the memory estimate (:mod:`qlora.model.estimate`) and the training config read them too.
"""

from __future__ import annotations

from .errors import UsageError

# qlora's optimizers, in the order of :data:`qlora.optim.factory.OPTIMIZERS`.
OPTIMIZER_NAMES = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")

# transformers' optim names whose update is exactly one of ours.
OPTIMIZER_ALIASES = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw",  # torch.optim.AdamW (foreach or fused kernel)
    "adamw_bnb_8bit": "adamw_8bit",  # bitsandbytes' AdamW8bit; transformers' adamw_8bit is the same
}
# The classes' own names (qlora.optim.PagedAdamW, bitsandbytes' PagedAdamW32bit, ...), in lower case.
_CLASS_NAMES = {"adamw8bit": "adamw_8bit", "pagedadamw": "paged_adamw_32bit", "pagedadamw32bit": "paged_adamw_32bit",
                "pagedadamw8bit": "paged_adamw_8bit"}
# Names of other tools whose maths differ from every optimizer qlora has: why not.
_NOT_THE_SAME = {
    "adamw_hf": "transformers' own (removed) AdamW adds eps before the bias correction, so its steps differ "
                "from torch's",
    "adamw_torch_8bit": "torchao's 8-bit AdamW quantizes its states differently from bitsandbytes' (qlora's "
                        "adamw_8bit)",
    "adamw_torch_4bit": "torchao's 4-bit AdamW is not implemented",
    "adamw_torch_xla": "it is torch's AdamW for TPUs, which qlora does not run on (adamw is the same update on CUDA "
                       "and the CPU)",
    "adamw_torch_npu_fused": "it is torch's AdamW fused for Ascend NPUs, which qlora does not run on (adamw is the "
                             "same update on CUDA and the CPU)",
}


def optimizer_name(name: str) -> str:
    """Our name of the optimizer ``name`` (ours, another tool's name for the same maths, or the class name:
    ``PagedAdamW``), in any letter case.

    Raises:
        UsageError (a ValueError): for any other name, saying what qlora has instead.
    """
    name = name.strip().lower() if isinstance(name, str) else name
    name = _CLASS_NAMES.get(name, OPTIMIZER_ALIASES.get(name, name))
    if name in OPTIMIZER_NAMES:
        return name
    aliases = {ours: [a for a, o in OPTIMIZER_ALIASES.items() if o == ours] for ours in OPTIMIZER_NAMES}
    have = ", ".join(f"{ours}{' (= ' + ', '.join(aliases[ours]) + ')' if aliases[ours] else ''}"
                     for ours in OPTIMIZER_NAMES)
    why = _NOT_THE_SAME.get(name, "qlora trains with AdamW only (torch's update, with 32-bit or bitsandbytes' 8-bit "
                                  "states, resident or paged)")
    raise UsageError(f"{name!r} is not available: {why}. Optimizers: {have}.")
