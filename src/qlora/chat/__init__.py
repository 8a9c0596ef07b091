"""Conversations as the model sees them: messages and their images and reasoning, chat templates' rendering and
its tokenization into ids and trained labels. Training and inference both need them, so they sit below ``train``,
``infer`` and ``serve``, which import them; they import only ``model``, ``nn``, ``quant`` and the top-level helpers.
"""
