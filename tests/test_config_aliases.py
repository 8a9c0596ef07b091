"""YAML configs written for PEFT/TRL/axolotl/LLaMA-Factory load; errors name the file and line."""

from __future__ import annotations

import re

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import ALIASES, TrainConfig, load_config
from qlora.train.strategy import steps_of


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_keys_of_other_tools_are_accepted(tmp_path):
    axolotl = _yaml(tmp_path, """
base_model: ./models/llama
dataset: data.jsonl
output_dir: ./out
learning_rate: 2e-5
lora_r: 32
lora_alpha: 64
lora_dropout: 0.1
num_epochs: 3
sequence_len: 1024
micro_batch_size: 4
gradient_accumulation_steps: 8
lora_target_modules: [q_proj, v_proj]
lr_scheduler: cosine
optimizer: paged_adamw_8bit
train_on_inputs: false
bf16: true
sample_packing: true
""")
    cfg = load_config(axolotl, {})
    assert (cfg.model, cfg.data, cfg.output) == ("./models/llama", "data.jsonl", "./out")
    assert (cfg.lr, cfg.rank, cfg.alpha, cfg.dropout, cfg.epochs) == (2e-5, 32, 64.0, 0.1, 3.0)
    assert (cfg.seq_len, cfg.batch_size, cfg.grad_accum) == (1024, 4, 8)
    assert cfg.target_modules == "q_proj,v_proj" and cfg.lr_scheduler == "cosine" and cfg.optim == "paged_adamw_8bit"
    assert cfg.train_on == "assistant" and cfg.precision == "bf16" and cfg.packing

    trl = _yaml(tmp_path, """
model_name_or_path: m
dataset: d.jsonl
output_dir: o
per_device_train_batch_size: 2
num_train_epochs: 1
cutoff_len: 256
lora_rank: 8
lr_scheduler_type: linear
overwrite_output_dir: true
fp16: false
""")
    cfg = load_config(trl, {"lr": "1e-3"})  # flags still win
    assert (cfg.model, cfg.batch_size, cfg.seq_len, cfg.rank, cfg.lr_scheduler) == ("m", 2, 256, 8, "linear")
    assert cfg.overwrite and cfg.precision == "auto" and cfg.lr == 1e-3
    assert all(v in TrainConfig.__dataclass_fields__ for v in ALIASES.values())


@pytest.mark.parametrize("text, message", [
    ("model: m\ndata: d\noutput: o\nlearning_rat: 1e-4\n", "run.yaml line 4: unknown option 'learning_rat'; did you mean lr"),
    ("model: m\ndata: d\noutput: o\nlora_alpa: 16\n", "did you mean alpha"),
    ("model: m\ndata: d\noutput: o\nlr: 1e-4\nlearning_rate: 2e-4\n", "run.yaml line 5: learning_rate and lr both set lr"),
    ("model: m\ndata: d\noutput: o\nrank: 8\nrank: 16\n", "run.yaml line 5: 'rank' is given twice (first on line 4)"),
    ("model: m\ndata: d\n  output: [o\n", "run.yaml line 3"),
    ("model: m\nrank: eight\n", "run.yaml line 2: rank expects int"),
    ("- a\n- b\n", "run.yaml: expected a mapping"),
])
def test_yaml_errors_name_the_file_and_line(tmp_path, text, message):
    with pytest.raises(UsageError) as info:
        load_config(_yaml(tmp_path, text), {})
    assert message in str(info.value), str(info.value)


def test_cli_reports_yaml_errors_and_suggests_flags(tmp_path, capsys):
    path = _yaml(tmp_path, "model: m\ndata: d\noutput: o\nnum_epoch: 2\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 4" in err and "epochs" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "m", "--learning-rate", "1e-4"])
    assert exc.value.code == 2 and "did you mean --lr" in capsys.readouterr().err


_LLAMA_FACTORY = """
### model
model_name_or_path: ./models/llama
quantization_bit: 4
quantization_method: bnb
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
### dataset
dataset: data.jsonl
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4
### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""


def test_a_llama_factory_qlora_example_loads_as_it_trains_there(tmp_path, capsys):
    """LLaMA-Factory's QLoRA example file, keys and values as it ships them: its values are translated
    (lora_target all, template llama3, stage sft), its runtime-only settings passed over by name."""
    cfg = load_config(_yaml(tmp_path, _LLAMA_FACTORY), {})
    assert (cfg.model, cfg.data, cfg.output, cfg.method) == ("./models/llama", "data.jsonl", "saves/llama3-8b/lora/sft",
                                                             "sft")
    assert (cfg.quant, cfg.double_quant, cfg.rank, cfg.target_modules, cfg.template) == (
        "nf4", True, 8, "all-linear", "llama-3")
    assert (cfg.seq_len, cfg.max_samples, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.epochs) == (
        2048, 1000, 1, 8, 1e-4, 3.0)
    assert (cfg.lr_scheduler, cfg.warmup_ratio, cfg.precision, cfg.overwrite, cfg.save_steps) == (
        "cosine", 0.1, "bf16", True, 500)
    err = capsys.readouterr().err
    assert "passing over" in err and "preprocessing_num_workers" in err and "ddp_timeout" in err
    assert "lora_rank" not in err and "template" not in err
    # quantization_bit: 4 chose the 4-bit base (without it the file trains a 16-bit one): not "passed over"
    passing = next(line for line in err.splitlines() if "passing over" in line)
    assert "quantization_bit" not in passing and "quantization_method" in passing, passing

    # the other quantization settings LLaMA-Factory has, and a family template
    cfg = load_config(_yaml(tmp_path, _LLAMA_FACTORY.replace("template: llama3", "template: qwen")
                            + "quantization_type: fp4\ndouble_quantization: false\n"), {})
    assert (cfg.quant, cfg.double_quant, cfg.template) == ("fp4", False, "auto")
    assert "template 'qwen' is a LLaMA-Factory name" in capsys.readouterr().err
    assert load_config(_yaml(tmp_path, _LLAMA_FACTORY.replace("stage: sft", "stage: dpo")), {}).method == "dpo"
    assert load_config(_yaml(tmp_path, _LLAMA_FACTORY.replace("stage: sft", "stage: pt")), {}).format == "text"


def test_transformers_step_options_of_any_file_read_as_transformers_reads_them(tmp_path, capsys):
    """TrainingArguments' max_steps -1 (its default, which files dump with the rest) is the epochs' steps, and a
    logging_steps below 1 a share of the run's steps, in a LLaMA-Factory file as in TRL's."""
    text = _LLAMA_FACTORY.replace("logging_steps: 10", "logging_steps: 0.05") + "max_steps: -1\n"
    cfg = load_config(_yaml(tmp_path, text), {})
    assert (cfg.max_steps, cfg.epochs, cfg.logging_steps, steps_of(cfg.logging_steps, 90)) == (0, 3.0, 0.05, 5)


@pytest.mark.parametrize("edit,message", [
    (("quantization_bit: 4", "quantization_bit: 8"), r"line 4: quantization_bit 8: qlora stores the base model in 4 bits"),
    (("quantization_method: bnb", "quantization_method: hqq"), r"line 5: quantization_method 'hqq'"),
    (("finetuning_type: lora", "finetuning_type: full"), r"line 10: finetuning_type 'full': qlora trains LoRA"),
    (("stage: sft", "stage: ppo"), r"line 8: stage 'ppo' has no qlora counterpart"),
    (("resume_from_checkpoint: null", "resume_from_checkpoint: saves/x/checkpoint-500"),
     r"resume_from_checkpoint 'saves/x/checkpoint-500'.*set resume: true"),
    (("stage: sft", "stage: sft\nmethod: orpo"), r"method and LLaMA-Factory's stage both set the method"),
])
def test_llama_factory_values_without_an_equivalent_are_refused_by_line(tmp_path, capsys, edit, message):
    path = _yaml(tmp_path, _LLAMA_FACTORY.replace(*edit))
    with pytest.raises(UsageError, match=message):
        load_config(path, {})
    assert main(["train", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_llama_factory_files_take_its_defaults_for_the_keys_they_omit(tmp_path):
    """A file with a ``stage`` trains as LLaMA-Factory would: its own and transformers' TrainingArguments'
    defaults (LoRA on 16 bits without quantization_bit, alpha twice the rank, no dropout, clipping at 1.0...)."""
    lf = "model_name_or_path: m\ndataset: d\noutput_dir: o\nstage: sft\n"
    cfg = load_config(_yaml(tmp_path, lf + "lora_rank: 4\n"), {})
    assert (cfg.quant, cfg.rank, cfg.alpha, cfg.dropout, cfg.max_grad_norm) == ("none", 4, 8.0, 0.0, 1.0)
    assert (cfg.lr, cfg.lr_scheduler, cfg.warmup_ratio, cfg.epochs, cfg.batch_size, cfg.seq_len) == (
        5e-5, "linear", 0.0, 3.0, 8, 2048)
    assert (load_config(_yaml(tmp_path, lf), {}).rank, load_config(_yaml(tmp_path, lf), {}).alpha) == (8, 16.0)
    given = load_config(_yaml(tmp_path, lf + "quantization_bit: 4\nlora_rank: 4\nlora_alpha: 4\nlora_dropout: 0.1\n"
                                           "max_grad_norm: 0.5\nwarmup_steps: 3\ncutoff_len: 64\n"), {"lr": 1e-3})
    assert (given.quant, given.rank, given.alpha, given.dropout, given.max_grad_norm, given.warmup_steps,
            given.seq_len, given.lr) == ("nf4", 4, 4.0, 0.1, 0.5, 3, 64, 1e-3)
    ours = load_config(_yaml(tmp_path, "model: m\ndata: d\noutput: o\n"), {})  # not LLaMA-Factory's: our defaults
    own = TrainConfig(model="m", data="d", output="o")
    assert (ours.quant, ours.alpha, ours.dropout, ours.max_grad_norm) == (own.quant, own.alpha, own.dropout,
                                                                          own.max_grad_norm)


@pytest.mark.parametrize("text, message", [
    ("ray_num_workers: 4\n", "run.yaml line 5: ray_num_workers 4: LLaMA-Factory's Ray launcher"),
    ("stage: kto\nper_device_train_batch_size: 1\n", "run.yaml line 5: per_device_train_batch_size 1 with stage kto"),
    ("do_train: false\n", "run.yaml line 5: do_train false: this LLaMA-Factory file does not train"),
    ("do_predict: true\n", "run.yaml line 5: do_predict true: LLaMA-Factory's prediction run"),
    ("adapter_name_or_path: a,b\n", "run.yaml line 5: adapter_name_or_path 'a,b': several adapters"),
    ("pissa_init: true\npissa_iter: -2\n", "run.yaml line 6: pissa_iter expects -1 (the full SVD)"),
    ("pissa_init: true\ninit: olora\n", "run.yaml line 5: pissa_init and init both set"),
    ("mask_history: true\n", "run.yaml line 5: mask_history true: LLaMA-Factory then trains on the last answer"),
])
def test_llama_factory_runtime_gaps_are_refused_by_line(tmp_path, text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(_yaml(tmp_path, _lf_with(text)), {})


def _lf_with(text: str) -> str:
    head = "model_name_or_path: m\ndataset: d\noutput_dir: o\n"
    return head + (text if text.startswith("stage:") else "stage: sft\n" + text)


def test_a_kto_batch_of_one_given_on_the_command_line_instead_loads(tmp_path):
    path = _yaml(tmp_path, _lf_with("stage: kto\nper_device_train_batch_size: 1\n"))
    assert load_config(path, {"batch_size": 2}).batch_size == 2


def test_deepspeed_is_passed_over_and_an_adapter_continued(tmp_path, capsys):
    from qlora.train.foreign_keys import translate

    cfg = load_config(_yaml(tmp_path, _lf_with("deepspeed: examples/deepspeed/ds_z3_config.json\ndo_train: true\n"
                                               "use_v1_kernels: true\n")), {})
    assert (cfg.method, cfg.gradient_checkpointing) == ("sft", True)  # LLaMA-Factory's default: on
    assert translate("adapter_name_or_path", "saves/sft", "run.yaml line 5") == ([("adapter", "saves/sft")], "")
    err = capsys.readouterr().err
    assert "deepspeed" in err and "do_train" in err and "use_v1_kernels" in err
    off = load_config(_yaml(tmp_path, _lf_with("disable_gradient_checkpointing: true\n")), {})
    assert off.gradient_checkpointing is False


def test_llama_factory_packing_prompt_and_strategy_keys(tmp_path, capsys):
    cfg = load_config(_yaml(tmp_path, _LLAMA_FACTORY + "train_on_prompt: true\nneat_packing: true\n"
                                                       "eval_strategy: steps\nval_size: 0.1\neval_steps: 50\n"), {})
    assert (cfg.train_on, cfg.packing, cfg.eval_split, cfg.eval_steps, cfg.eval_strategy) == (
        "all", True, 0.1, 50, "steps")
    err = capsys.readouterr().err
    assert "eval_strategy" not in err and "attend to each other" not in err  # read, not passed over
    assert cfg.seq_len == 2047  # LLaMA-Factory lowers cutoff_len by one when it packs


def test_llama_factory_packing_without_neat_packing_is_named_as_kept_apart(tmp_path, capsys):
    """LLaMA-Factory's packing alone lets packed examples attend to each other; qlora's packing never does."""
    cfg = load_config(_yaml(tmp_path, _LLAMA_FACTORY + "packing: true\n"), {})
    assert (cfg.packing, cfg.seq_len) == (True, 2047)
    assert "packing without neat_packing lets LLaMA-Factory's packed examples attend to each other" in (
        capsys.readouterr().err)
    cfg = load_config(_yaml(tmp_path, _LLAMA_FACTORY + "packing: false\n"), {})
    assert (cfg.packing, cfg.seq_len) == (False, 2048)


def test_dpo_config_keys_of_trl_1_16(tmp_path):
    """TRL DPOConfig's LD-DPO, WPO and f-DPO keys are qlora's options (use_weighting is --wpo); its keys without
    effect on the loss are passed over, its disable_dropout turns the LoRA dropout off as TRL does."""
    base = "model: m\ndata: d\noutput: o\nmethod: dpo\n"
    cfg = load_config(_yaml(tmp_path, base + "ld_alpha: 0.4\nuse_weighting: true\nf_divergence_type: "
                                             "alpha_divergence\nf_alpha_divergence_coef: 0.3\ndisable_dropout: true\n"
                                             "precompute_ref_log_probs: true\nprecompute_ref_batch_size: 8\n"
                                             "truncation_mode: keep_start\npad_to_multiple_of: 8\n"
                                             "activation_offloading: false\nsync_ref_model: false\n"
                                             "ref_model_mixup_alpha: 0.6\nref_model_sync_steps: 512\n"), {})
    assert (cfg.ld_alpha, cfg.wpo, cfg.f_divergence_type, cfg.f_alpha_divergence_coef, cfg.dropout,
            cfg.precompute_ref) == (0.4, True, "alpha_divergence", 0.3, 0.0, True)
    assert load_config(_yaml(tmp_path, base + "disable_dropout: false\nlora_dropout: 0.1\n"), {}).dropout == 0.1
    plain = load_config(_yaml(tmp_path, base), {})
    assert (plain.ld_alpha, plain.wpo, plain.f_divergence_type) == (None, False, "reverse_kl")
    simpo = load_config(_yaml(tmp_path, "model: m\ndata: d\noutput: o\nmethod: simpo\nalphapo_alpha: 0.25\n"), {})
    assert simpo.alphapo_alpha == 0.25 and simpo.nll_weight == 0


def test_preference_keys_of_trl_and_llama_factory(tmp_path):
    """TRL's keys are ours; LLaMA-Factory's stage/pref_loss map where the loss is the same, else are refused."""
    base = "model: m\ndata: d\noutput: o\n"
    trl = load_config(_yaml(tmp_path, base + "method: dpo\nloss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.5]\n"
                                              "beta: 0.2\n"), {})
    assert trl.preference_losses() == [("sigmoid", 1.0), ("sft", 0.5)] and trl.nll_weight == 0.5
    cpo = load_config(_yaml(tmp_path, base + "method: cpo\nloss_type: simpo\ncpo_alpha: 0.3\nsimpo_gamma: 0.7\n"), {})
    assert (cpo.preference_losses(), cpo.nll_weight, cpo.simpo_gamma) == ([("simpo", 1.0)], 0.3, 0.7)
    for loss, method, loss_type in (("sigmoid", "dpo", "sigmoid"), ("ipo", "dpo", "ipo"), ("hinge", "dpo", "hinge"),
                                    ("simpo", "simpo", "")):
        smoothing = "dpo_label_smoothing: 0.1\n" if loss == "sigmoid" else ""
        cfg = load_config(_yaml(tmp_path, base + f"stage: dpo\npref_loss: {loss}\npref_beta: 0.25\npref_ftx: 0\n"
                                + smoothing), {})
        assert (cfg.method, cfg.loss_type, cfg.beta, cfg.label_smoothing) == (method, loss_type, 0.25,
                                                                               0.1 if smoothing else 0.0), loss
    assert load_config(_yaml(tmp_path, base + "stage: sft\n"), {}).method == "sft"
    kto = load_config(_yaml(tmp_path, base + "stage: kto\nper_device_train_batch_size: 4\nkto_chosen_weight: 1.5\n"
                                             "kto_rejected_weight: 0.5\n"), {})
    assert (kto.method, kto.desirable_weight, kto.undesirable_weight) == ("kto", 1.5, 0.5)
    assert load_config(_yaml(tmp_path, base + "stage: dpo\n"), {}).preference_losses() == [("sigmoid", 1.0)]
    assert load_config(_yaml(tmp_path, base + "method: simpo\n"), {}).nll_weight == 0  # SimPO: no NLL term


@pytest.mark.parametrize("text, message", [
    ("stage: dpo\npref_loss: orpo\n", "run.yaml line 5: LLaMA-Factory's orpo adds each chosen answer's NLL"),
    ("stage: dpo\npref_loss: kto_pair\n", "run.yaml line 5: pref_loss 'kto_pair' has no qlora counterpart"),
    ("stage: dpo\npref_ftx: 0.5\n", "run.yaml line 5: pref_ftx is LLaMA-Factory's SFT term"),
    ("stage: ppo\n", "run.yaml line 4: stage 'ppo' has no qlora counterpart"),
    ("stage: dpo\npref_loss: simpo\ndpo_label_smoothing: 0.1\n", "simpo loss ignores dpo_label_smoothing"),
    ("stage: sft\npref_loss: sigmoid\n", "run.yaml line 5: pref_loss applies to stage dpo"),
    ("method: orpo\nstage: dpo\n", "method and LLaMA-Factory's stage both set the method"),
    ("method: dpo\nloss_type: simpo\n", "--loss-type 'simpo' is not a DPO loss"),
    ("method: dpo\nloss_type: kto_pair\n", "TRL removed kto_pair"),
    ("method: dpo\nloss_type: [sigmoid, sft]\nloss_weights: [1]\n", "--loss-weights has 1 weights for 2 loss type"),
    ("method: dpo\nloss_type: [sigmoid, ipo]\nloss_weights: [1, x]\n", "--loss-weights must be non-negative numbers"),
    ("method: dpo\nloss_type: hinge\nlabel_smoothing: 0.1\n", "--label-smoothing does not apply to the DPO loss hinge"),
    ("method: dpo\nloss_type: exo_pair\n", "exo_pair needs --label-smoothing > 0"),
    ("method: dpo\nloss_type: sft\nrpo_alpha: 1\n", "--rpo-alpha adds the sft loss type"),
    ("method: dpo\ndiscopop_tau: 0.1\n", "--discopop-tau applies to --loss-type discopop"),
    ("method: cpo\nloss_type: robust\n", "--loss-type 'robust' is not a loss of --method cpo"),
    ("method: cpo\nloss_type: ipo\nlabel_smoothing: 0.1\n", "--loss-type ipo has none"),
    ("method: cpo\nsimpo_gamma: 1\n", "--simpo-gamma is SimPO's target margin"),
    ("method: simpo\nloss_type: hinge\n", "--loss-type applies to --method dpo, cpo, kto; this run is --method simpo"),
    ("method: orpo\nloss_type: sigmoid\n", "--loss-type applies to --method dpo, cpo, kto; this run is --method orpo"),
    ("loss_type: ipo\n", "--loss-type applies to --method dpo, cpo, kto; this run is --method sft"),
    ("rpo_alpha: 1\n", "--rpo-alpha applies to --method dpo; this run is --method sft"),
    ("method: dpo\ncpo_alpha: 1\n", "--cpo-alpha applies to --method cpo, simpo; this run is --method dpo"),
    ("method: simpo\nprecompute_ref: true\n", "--precompute-ref applies to --method dpo, kto; this run is --method simpo"),
    ("method: cpo\ncpo_alpha: -1\n", "--cpo-alpha must be at least 0"),
    ("method: kto\n", "--method kto estimates its KL term from the other examples of a micro-batch"),
    ("method: kto\nbatch_size: 2\nloss_type: sigmoid\n", "--loss-type 'sigmoid' is not a loss of --method kto"),
    ("method: dpo\ndesirable_weight: 2\n", "--desirable-weight applies to --method kto; this run is --method dpo"),
    ("method: kto\nbatch_size: 2\nundesirable_weight: 0\n", "--undesirable-weight must be positive"),
    ("method: dpo\nld_alpha: 1.5\n", "--ld-alpha must be in [0, 1]; got 1.5"),
    ("method: dpo\nld_alpha: -0.1\n", "--ld-alpha must be in [0, 1]; got -0.1"),
    ("method: cpo\nld_alpha: 0.5\n", "--ld-alpha applies to --method dpo; this run is --method cpo"),
    ("method: orpo\nwpo: true\n", "--wpo applies to --method dpo; this run is --method orpo"),
    ("method: dpo\nwpo: yes please\n", "wpo expects bool"),
    ("method: dpo\nwpo: true\nloss_type: aot\n", "the aot and aot_unpaired losses sort the pairs"),
    ("method: dpo\nuse_weighting: true\nrpo_alpha: 0.5\n", "--wpo weighs the pair losses; with the NLL term"),
    ("method: dpo\nwpo: true\nloss_type: [sigmoid, sft]\n", "--wpo weighs the pair losses; with the NLL term"),
    ("method: dpo\nf_divergence_type: kl\n", "--f-divergence-type must be one of reverse_kl, forward_kl, "
                                            "js_divergence, alpha_divergence; got 'kl'"),
    ("method: dpo\nf_divergence_type: forward_kl\nloss_type: nca_pair\n",
     "--f-divergence-type forward_kl applies to the DPO losses of the reward difference"),
    ("method: dpo\nf_divergence_type: js_divergence\nloss_type: [sigmoid, apo_zero]\n", "apo_zero has no "
                                                                                          "f-divergence form"),
    ("method: dpo\nf_alpha_divergence_coef: 0.3\n", "--f-alpha-divergence-coef applies to --f-divergence-type "
                                                    "alpha_divergence"),
    ("method: dpo\nf_divergence_type: alpha_divergence\nf_alpha_divergence_coef: .inf\n",
     "--f-alpha-divergence-coef must be finite; got inf"),
    ("method: kto\nbatch_size: 2\nf_divergence_type: forward_kl\n", "--f-divergence-type applies to --method dpo"),
    ("method: dpo\nalphapo_alpha: 0.5\n", "--alphapo-alpha applies to --method cpo, simpo; this run is --method dpo"),
    ("method: simpo\nalphapo_alpha: .nan\n", "--alphapo-alpha must be finite; got nan"),
    ("method: cpo\nloss_type: alphapo\n", "TRL's alphapo is its simpo loss without the NLL term: --method simpo "
                                          "with --alphapo-alpha A"),
    ("method: dpo\nsync_ref_model: true\n", "run.yaml line 5: sync_ref_model true: TR-DPO's reference"),
    ("method: dpo\nrouter_aux_loss_coef: 0.001\n", "router_aux_loss_coef 0.001: qlora adds no mixture-of-experts"),
    ("method: dpo\ntruncation_mode: keep_end\n", "run.yaml line 5: truncation_mode 'keep_end': qlora cuts"),
])
def test_preference_options_refused_by_name(tmp_path, text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(_yaml(tmp_path, "model: m\ndata: d\noutput: o\n" + text), {})


def test_a_later_refusal_of_an_option_the_yaml_file_set_names_its_line(tmp_path, tiny_model_dir, capsys):
    """``data_split`` is checked when the data is read, after the config: the refusal still names the file, line
    and key that set it (a flag given for it names the flag alone)."""
    (tmp_path / "d.jsonl").write_text('{"text": "hello there"}\n')
    path = _yaml(tmp_path, f"model: {tiny_model_dir}\ndata: {tmp_path / 'd.jsonl'}\noutput: {tmp_path / 'o'}\n"
                           "data_split: validation\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 4 (data_split): --data-split validation: " in err and "no splits" in err, err
    assert main(["train", str(path), "--data-split", "test"]) == 2
    err = capsys.readouterr().err
    assert "error: --data-split test: " in err and "line 4" not in err, err
    assert not (tmp_path / "o").exists()
