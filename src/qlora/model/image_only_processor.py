"""A vision-language model's processor for images alone, for when ``AutoProcessor`` fails for want of torchvision.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM2, InternVL, LLaVA-OneVision, LLaVA-NeXT-Video and Gemma 4 processors take a
video processor, and every transformers video processor needs torchvision, so ``AutoProcessor`` cannot build them
without it although their image processors have a PIL implementation. Images need no video processor: this builds
the family's own processor class with the folder's image processor (``AutoImageProcessor``, which picks the PIL one
when torchvision is missing), the run's tokenizer and the folder's processor settings and chat template, leaving the
video processor out (an audio feature extractor beside them, Gemma 4's, needs no torchvision: it is read from the
folder as transformers reads it). The class is subclassed only to declare that it holds no video processor
(transformers checks each declared sub-processor's type); every method is transformers', so the ids and tensors are
too. Families whose processor class or image processor needs torchvision itself (Mistral 3's ``PixtralProcessor``,
Llama 4's image processor) cannot be built this way.
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path


class NeedsTorchvision(ValueError):
    """The processor cannot be built without torchvision even for images alone; the message says why."""


def for_want_of_torchvision(exc: BaseException) -> bool:
    """Whether ``exc`` or an error it was raised from says torchvision is missing (transformers 4.x wraps the
    import error of a processor module that imports torchvision, SmolVLM's, in one naming only the class)."""
    seen: BaseException | None = exc
    while seen is not None:
        if "torchvision" in str(seen).lower() or getattr(seen, "name", None) == "torchvision":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def image_only_processor(model_dir: str | Path, model_type: str, tokenizer):
    """``model_type``'s processor from ``model_dir`` with ``tokenizer`` and no video processor.

    Args:
        model_dir: the model folder or hub name.
        model_type: the model's ``config.model_type``, naming its processor class when the folder does not.
        tokenizer: the run's tokenizer.

    Raises:
        NeedsTorchvision: the class or its image processor needs torchvision itself, or the class takes other
            sub-processors.
        Exception: what transformers raises reading the folder or building the class (SmolVLM's ImportError
            for num2words, ...).
    """
    import transformers
    from transformers import AutoFeatureExtractor, AutoImageProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.processing_utils import ProcessorMixin

    settings = dict(ProcessorMixin.get_processor_dict(str(model_dir))[0])
    name = settings.pop("processor_class", None) or PROCESSOR_MAPPING_NAMES.get(model_type)
    try:
        base = getattr(transformers, name, None) if isinstance(name, str) else None
    except ImportError as exc:  # 4.x: the class's module imports torchvision (SmolVLM's)
        if not for_want_of_torchvision(exc):
            raise
        raise NeedsTorchvision(f"transformers' {name} itself needs it") from None
    if not isinstance(base, type):
        raise NeedsTorchvision(f"transformers has no processor class for {model_type} models")
    try:
        attributes = _attributes(base)
    except ImportError:  # transformers' placeholder for a class whose module imports torchvision
        raise NeedsTorchvision(f"transformers' {name} itself needs it") from None
    kept = tuple(a for a in attributes if "video" not in a)
    if not {"image_processor", "tokenizer"} <= set(kept) <= {"image_processor", "tokenizer", "feature_extractor"}:
        raise NeedsTorchvision(f"{name} takes {', '.join(attributes)}, not only an image processor, a tokenizer "
                               "and an audio feature extractor")
    accepted = {n for n, p in inspect.signature(base.__init__).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - set(attributes) - {"self"}
    try:
        images = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=False)  # no code from the folder
    except (ImportError, ValueError) as exc:  # 5 raises ImportError, 4.x ValueError
        if "torchvision" not in str(exc).lower():
            raise
        raise NeedsTorchvision(f"{model_type}'s image processor has no version without it") from None
    parts = dict(image_processor=images, tokenizer=tokenizer)
    if "feature_extractor" in kept:  # audio (Gemma 4's, Gemma 3n's): numpy, read from the folder as transformers does
        parts["feature_extractor"] = AutoFeatureExtractor.from_pretrained(model_dir, trust_remote_code=False)
    return _without_videos(base, kept, tuple(a for a in attributes if a not in kept))(
        **parts, **{k: v for k, v in settings.items() if k in accepted})


def _attributes(cls) -> list[str]:
    """The sub-processors ``cls`` takes, in order (transformers 5 reads them from ``__init__``; 4.x lists them)."""
    return list(cls.get_attributes() if hasattr(cls, "get_attributes") else cls.attributes)


@cache
def _without_videos(base: type, kept: tuple[str, ...], dropped: tuple[str, ...]) -> type:
    """``base`` declaring only the ``kept`` sub-processors; the ``dropped`` ones are given as None. A class between
    ``base`` and ``ProcessorMixin`` in the method order takes them off what ``base`` hands on, by keyword (Gemma 4's
    ``super().__init__(..., video_processor=video_processor)``) or by position in ``base``'s own order of them
    (LLaVA-NeXT-Video's ``super().__init__(video_processor, image_processor, tokenizer)``)."""
    from transformers.processing_utils import ProcessorMixin

    order = _attributes(base)

    def __init__(self, *args, **kwargs):
        base.__init__(self, **dict(zip(kept, args)), **kwargs, **dict.fromkeys(dropped))

    def hand_on(self, *args, **kwargs):
        given = {**dict(zip(order, args)), **kwargs}
        ProcessorMixin.__init__(self, **{k: v for k, v in given.items() if k not in dropped})

    def get_attributes(cls) -> list[str]:
        return list(kept)

    without = type(f"{base.__name__}Without", (ProcessorMixin,), {"__init__": hand_on, "__module__": __name__})
    return type(base.__name__, (base, without), {"__init__": __init__, "get_attributes": classmethod(get_attributes),
                                                 "attributes": list(kept), "__module__": __name__,
                                                 "__doc__": f"{base.__name__} without its {', '.join(dropped)}."})
