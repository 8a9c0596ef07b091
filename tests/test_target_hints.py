"""Target module names that adapt nothing are told why: what they match, and what the model has instead."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.architecture import text_model_from_config
from qlora.model.estimate import ModelCounts, select_targets
from qlora.model.inject import target_paths


@pytest.fixture(scope="module")
def deepseek_v4(tmp_path_factory):
    """A tiny DeepSeek-V4 config: its o_a_proj is a DeepseekV4GroupedLinear (an nn.Linear with its own forward)."""
    if "deepseek_v4" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no DeepSeek-V4")
    path = tmp_path_factory.mktemp("dsv4")
    AutoConfig.for_model(
        "deepseek_v4", vocab_size=400, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, head_dim=32, q_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2, o_groups=2,
        o_lora_rank=32, index_n_heads=2, index_head_dim=16, index_topk=4, qk_rope_head_dim=8,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"], mlp_layer_types=["moe", "moe"],
        num_nextn_predict_layers=0, max_position_embeddings=256).save_pretrained(path)
    return path


def test_estimate_says_a_named_module_is_no_linear_layer(deepseek_v4, capsys):
    assert main(["estimate", "--model", str(deepseek_v4), "--target-modules", "o_a_proj"]) == 2
    err = capsys.readouterr().err
    assert "'o_a_proj' matches 2 modules (model.layers.0.self_attn.o_a_proj, ...) of type DeepseekV4GroupedLinear, " \
           "not a linear layer qlora can adapt" in err, err
    assert "o_b_proj" in err  # the names that do work


def test_training_says_a_named_module_is_no_linear_layer(deepseek_v4):
    with torch.device("meta"):
        model = text_model_from_config(AutoConfig.from_pretrained(deepseek_v4), "dsv4")
    for targets in (["o_a_proj"], ["q_a_proj", "o_a_proj"], r".*\.o_a_proj"):
        with pytest.raises(UsageError) as err:
            target_paths(model, targets)
        text = str(err.value)
        assert "of type DeepseekV4GroupedLinear, not a linear layer qlora can adapt" in text, text
        assert "did you mean" not in text  # the name is right; the module is what it is


class _NoLinear(nn.Module):
    """Weights in an embedding and a convolution only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3)


def test_a_model_without_linear_layers_says_so():
    with pytest.raises(UsageError) as err:
        target_paths(_NoLinear(), "all-linear")
    assert "It has no linear layer qlora can adapt: its weights are in Conv1d (1), Embedding (1)." in str(err.value)
    assert "named: (" not in str(err.value)


def test_estimate_of_a_model_without_linear_layers_says_so():
    counts = ModelCounts(linears=(), other_tensors=(40, 48), num_layers=1,
                         other_modules={"embed": "Embedding", "conv": "Conv1d"})
    with pytest.raises(UsageError) as err:
        select_targets(counts, ("q_proj",))
    assert str(err.value) == ("--target-modules q_proj match no linear layer of this model. It has no linear layer "
                              "qlora can adapt: its weights are in Conv1d (1), Embedding (1).")
