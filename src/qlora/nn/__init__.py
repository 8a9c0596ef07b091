"""Neural-network modules: the 4-bit linear layer, 4-bit MoE experts, LoRA (on linear layers,
embeddings, MoE experts and routers) and AdaLoRA adapters. Names are imported lazily, so that a light module of this package
(``residual_init_names``) does not import torch with the others."""

from qlora.lazy_names import lazy_attributes, lazy_dir

_LAZY = {
    "AdaLoraLinear": "qlora.nn.adalora",
    "Experts4bit": "qlora.nn.experts4bit",
    "ExpertsLayout": "qlora.nn.experts4bit",
    "ExpertsLora": "qlora.nn.experts_lora",
    "Linear4bit": "qlora.nn.linear4bit",
    "LoraEmbedding": "qlora.nn.lora_embedding",
    "LoraLinear": "qlora.nn.lora",
    "LoraSpec": "qlora.nn.lora",
    "RouterLora": "qlora.nn.router_lora",
    "SavedModules": "qlora.nn.saved_modules",
    "adapter_name_problem": "qlora.nn.adapter_name",
    "computed_experts": "qlora.nn.experts4bit",
    "dequantized": "qlora.nn.dequantized_modules",
    "expert_matrix": "qlora.nn.experts4bit",
    "expert_weight": "qlora.nn.experts4bit",
    "expert_weight_names": "qlora.nn.experts4bit",
    "experts_layout": "qlora.nn.experts4bit",
    "is_router": "qlora.nn.router_lora",
    "undequantizable": "qlora.nn.dequantized_modules",
}
__getattr__ = lazy_attributes(__name__, _LAZY)
__dir__ = lazy_dir(globals(), _LAZY)
__all__ = list(_LAZY)
