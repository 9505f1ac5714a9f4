"""Bad inputs to every command: a clear one-line error, the right exit status, no traceback, nothing lost.

One row per bad input (a config file, a checkpoint or run directory, a flag value, an environment
variable). Each row runs `widemoe.cli.main(argv)` in-process and asserts:

- the exit status: 2 for a usage error (argparse, or a flag value out of its range), 1 for a failure
  (a file, directory or config that cannot be used);
- exactly one line on stderr says `error:`, and it matches the row's regex (which names the file, field
  or flag and the rule broken);
- no traceback anywhere in the output;
- nothing on disk changed: every fixture file keeps its size, mtime and hash, and no file or directory
  appears or disappears (a refused `convert` leaves its destination alone, a refused `train` creates no
  run directory).

The fixtures (tests/bad_inputs_fixtures.py) are a micro model saved once and copied, each copy broken
one way, plus a two-step training run and its damaged copies; `{name}` in a row's argv is that
fixture's path.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

import pytest
import torch

from bad_inputs_fixtures import R, Row, both, build_fixtures, snapshot
from widemoe.cli import main

torch.set_num_threads(2)

# A training command line that would run (the rows add one bad part to it).
T = ("--preset", "micro", "--vocab-size", "512", "--seq-len", "32", "--batch-size", "4", "--steps", "2",
     "--warmup-steps", "1", "--eval-every", "1000", "--save-every", "1000", "--no-progress")
TN = (*T, "--run-dir", "{new_out}")  # into a new run directory


ROWS: list[Row] = [
    # --- inspect: checkpoint directories ----------------------------------------------------------
    R("inspect-missing-arg", "inspect", 2, r"required.*dir"),
    R("inspect-nonexistent", "inspect {missing}", 1,
      both(r"does_not_exist", r"no such|not found|does not exist")),
    R("inspect-a-file", "inspect {a_file}", 1, both(r"a_file\.txt", r"not a directory")),
    R("inspect-empty-dir", "inspect {empty_dir}", 1, r"empty_dir.*config\.json"),
    R("inspect-no-config", "inspect {no_config}", 1, r"no_config.*config\.json"),
    R("inspect-garbled-config", "inspect {garbled_config}", 1, r"garbled_config/config\.json.*JSON"),
    R("inspect-binary-config", "inspect {binary_config}", 1,
      both(r"binary_config/config\.json", r"JSON|UTF-8|utf-8")),
    R("inspect-config-list", "inspect {config_list}", 1, r"config_list/config\.json.*object"),
    R("inspect-unknown-type", "inspect {config_unknown_type}", 1, r"gpt2"),
    R("inspect-str-int", "inspect {config_str_int}", 1, r"hidden_size.*'64'.*int"),
    R("inspect-null-int", "inspect {config_null_int}", 1, r"num_hidden_layers.*None.*int"),
    R("inspect-bool-int", "inspect {config_bool_int}", 1, r"num_hidden_layers.*True.*int"),
    R("inspect-float-int", "inspect {config_float_int}", 1, r"n_routed_experts.*8\.5.*int"),
    R("inspect-nan", "inspect {config_nan}", 1, r"rms_norm_eps.*nan.*finite"),
    R("inspect-inf", "inspect {config_inf}", 1, r"routed_scaling_factor.*inf.*finite"),
    R("inspect-bool-str", "inspect {config_bool_str}", 1, r"norm_topk_prob.*'false'.*bool"),
    R("inspect-negative", "inspect {config_negative}", 1, r"num_hidden_layers.*-1"),
    R("inspect-topk-gt-experts", "inspect {config_topk_gt_experts}", 1,
      r"num_experts_per_tok.*16.*n_routed_experts"),
    R("inspect-no-vocab", "inspect {config_no_vocab}", 1, r"vocab_size"),
    R("inspect-missing-tensor", "inspect {missing_tensor}", 1, r"missing_tensor.*missing.*o_proj"),
    R("inspect-extra-tensor", "inspect {extra_tensor}", 1, r"extra_tensor.*unexpected.*mystery"),
    R("inspect-truncated", "inspect {truncated_weights}", 1,
      r"truncated_weights/model\.safetensors.*(truncated|damaged|corrupt)"),
    R("inspect-empty-weights", "inspect {empty_weights}", 1,
      both(r"empty_weights/model\.safetensors", r"truncated|empty")),
    R("inspect-garbage-weights", "inspect {garbage_weights}", 1,
      both(r"garbage_weights/model\.safetensors", r"header")),
    R("inspect-no-weights", "inspect {no_weights}", 1, both(r"no_weights", r"no model\.safetensors")),
    R("inspect-pickle-only", "inspect {pickle_only}", 1, r"pickle_only.*pickle"),
    R("inspect-shard-deleted", "inspect {shard_deleted}", 1,
      r"shard_deleted/model-00003-of-\d+\.safetensors: missing"),
    R("inspect-shard-truncated", "inspect {shard_truncated}", 1,
      r"shard_truncated/model-00003-of-\d+\.safetensors: truncated"),
    R("inspect-index-garbled", "inspect {index_garbled}", 1,
      both(r"index_garbled/model\.safetensors\.index\.json", r"not a valid")),
    R("inspect-run-dir-damaged", "inspect {run_truncated}", 1,
      r"run_truncated/checkpoints/step-00000002/model\.safetensors: truncated"),
    R("inspect-run-no-ckpt", "inspect {run_no_ckpt}", 1, r"run_no_ckpt.*without a committed checkpoint"),
    R("inspect-config-is-dir", "inspect {config_is_dir}", 1,
      both(r"config_is_dir/config\.json", r"is a directory|is not a file")),
    R("inspect-widemoe-block-bad-type", "inspect {config_widemoe_bad_type}", 1,
      both(r"config_widemoe_bad_type/config\.json", r"capacity_factor='large'.*number")),
    R("inspect-hf-flag-str", "inspect {config_hf_flag_str}", 1,
      both(r"config_hf_flag_str/config\.json", r"attention_bias='false'.*bool")),
    # --- generate ---------------------------------------------------------------------------------
    R("generate-missing-prompt", "generate micro", 2, r"required.*prompt"),
    R("generate-missing-all", "generate", 2, r"required"),
    R("generate-unknown-preset", "generate nonesuch x", 2, r"unknown preset 'nonesuch'"),
    R("generate-nonexistent-path", "generate {missing}/ x", 1,
      both(r"does_not_exist", r"no such|not found|does not exist")),
    R("generate-nonexistent-json", "generate {missing}.json x", 1,
      both(r"does_not_exist\.json", r"no such|not found|does not exist")),
    R("generate-a-file", "generate {a_file} x", 1, both(r"a_file\.txt", r"JSON|TOML")),
    R("generate-empty-dir", "generate {empty_dir} x", 1, r"empty_dir.*config\.json"),
    R("generate-no-config", "generate {no_config} x", 1, r"no_config.*config\.json"),
    R("generate-garbled-config", "generate {garbled_config} x", 1, r"garbled_config/config\.json.*JSON"),
    R("generate-str-int", "generate {config_str_int} x", 1, r"hidden_size.*'64'.*int"),
    R("generate-bool-str", "generate {config_bool_str} x", 1, r"norm_topk_prob.*'false'.*bool"),
    R("generate-missing-tensor", "generate {missing_tensor} x", 1, r"missing.*o_proj"),
    R("generate-extra-tensor", "generate {extra_tensor} x", 1, r"unexpected.*mystery"),
    R("generate-truncated", "generate {truncated_weights} x", 1,
      r"truncated_weights/model\.safetensors: truncated"),
    R("generate-empty-weights", "generate {empty_weights} x", 1,
      both(r"empty_weights/model\.safetensors", r"truncated|empty")),
    R("generate-no-weights", "generate {no_weights} x", 1, both(r"no_weights", r"no model\.safetensors")),
    R("generate-pickle-only", "generate {pickle_only} x", 1, r"pickle_only.*pickle"),
    R("generate-shard-deleted", "generate {shard_deleted} x", 1,
      r"shard_deleted/model-00003-of-\d+\.safetensors: missing"),
    R("generate-shard-truncated", "generate {shard_truncated} x", 1,
      r"shard_truncated/model-00003-of-\d+\.safetensors: truncated"),
    R("generate-index-garbled", "generate {index_garbled} x", 1,
      both(r"index_garbled/model\.safetensors\.index\.json", r"not a valid")),
    R("generate-run-no-ckpt", "generate {run_no_ckpt} x", 1, r"run_no_ckpt.*without a committed checkpoint"),
    R("generate-run-uncommitted", "generate {run_uncommitted} x", 1,
      r"run_uncommitted.*without a committed checkpoint"),
    R("generate-run-truncated", "generate {run_truncated} x", 1,
      r"run_truncated/checkpoints/step-00000002/model\.safetensors: truncated"),
    R("generate-run-deleted", "generate {run_deleted} x", 1,
      r"run_deleted/checkpoints/step-00000002/model\.safetensors: missing"),
    R("generate-cfg-unknown-field", "generate {cfg_unknown_field_json} x", 1,
      r"cfg_unknown_field\.json.*hiden_size"),
    R("generate-cfg-syntax-toml", "generate {cfg_syntax_toml} x", 1, r"cfg_syntax\.toml.*TOML"),
    R("generate-cfg-yaml", "generate {cfg_yaml} x", 1, both(r"cfg\.yaml", r"JSON|TOML")),
    R("generate-empty-prompt", ("generate", "micro", ""), 1, r"prompt.*empty|empty.*prompt"),
    R("generate-negative-tokens", "generate micro x --max-new-tokens -1", 2, r"max.new.tokens.*-1.*>= 1"),
    R("generate-negative-temperature", "generate micro x --temperature -1", 2, r"temperature.*-1.*>= 0"),
    R("generate-nan-temperature", "generate micro x --temperature nan", 2, r"temperature.*nan"),
    R("generate-inf-temperature", "generate micro x --temperature inf", 2, r"temperature.*inf"),
    R("generate-top-k-zero", "generate micro x --top-k 0", 2, r"top.k.*0.*>= 1"),
    R("generate-top-p-zero", "generate micro x --top-p 0", 2, r"top.p.*0.*\(0, 1\]"),
    R("generate-top-p-big", "generate micro x --top-p 1.5", 2, r"top.p.*1\.5.*\(0, 1\]"),
    R("generate-top-p-nan", "generate micro x --top-p nan", 2, r"top.p.*nan"),
    R("generate-dtype-choice", "generate micro x --dtype fp16", 2, r"--dtype.*invalid choice.*fp16"),
    R("generate-tokens-not-int", "generate micro x --max-new-tokens many", 2,
      r"--max-new-tokens.*invalid int.*many"),
    R("generate-too-big", "generate deepseek-v3 x", 1, r"deepseek-v3.*does not fit"),
    R("generate-config-is-dir", "generate {config_is_dir} x", 1,
      both(r"config_is_dir/config\.json", r"is a directory|is not a file")),
    R("generate-cfg-topk", "generate {cfg_topk_json} x", 1,
      r"num_experts_per_tok=9 exceeds n_routed_experts=8"),
    R("generate-hf-flag-str", "generate {config_hf_flag_str} x", 1,
      both(r"config_hf_flag_str/config\.json", r"attention_bias='false'.*bool")),
    # --- convert ----------------------------------------------------------------------------------
    R("convert-missing-dst", "convert {ck}", 2, r"required.*dst"),
    R("convert-src-nonexistent", "convert {missing} {new_out}", 1,
      both(r"does_not_exist", r"no such|not found|does not exist")),
    R("convert-src-a-file", "convert {a_file} {new_out}", 1, both(r"a_file\.txt", r"not a directory")),
    R("convert-src-empty-dir", "convert {empty_dir} {new_out}", 1, r"empty_dir.*config\.json"),
    R("convert-same-dir", "convert {ck} {ck}", 2, r"DST .*/ck must differ from SRC"),
    R("convert-bad-shard-size", "convert {ck} {new_out} --max-shard-size lots", 2, r"max.shard.size.*lots"),
    R("convert-zero-shard-size", "convert {ck} {new_out} --max-shard-size 0", 2, r"max.shard.size.*0"),
    R("convert-bad-shard-size-keeps-dst", "convert {ck} {dst_existing} --max-shard-size lots", 2,
      r"max.shard.size.*lots"),
    R("convert-bad-regex", ("convert", "{ck}", "{new_out}", "--ignore", "(unclosed"), 2,
      r"ignore.*\(unclosed"),
    R("convert-bad-regex-keeps-dst", ("convert", "{ck}", "{dst_existing}", "--ignore", "(unclosed"), 2,
      r"ignore.*\(unclosed"),
    R("convert-dtype-choice", "convert {ck} {new_out} --dtype fp8", 2, r"--dtype.*invalid choice.*fp8"),
    R("convert-dst-a-file", "convert {ck} {a_file}", 1, both(r"a_file\.txt", r"not a directory")),
    R("convert-no-config", "convert {no_config} {new_out}", 1, r"no_config.*config\.json"),
    R("convert-garbled-config", "convert {garbled_config} {new_out}", 1,
      both(r"garbled_config/config\.json", r"JSON")),
    R("convert-unknown-type", "convert {config_unknown_type} {new_out}", 1, r"gpt2"),
    R("convert-str-int", "convert {config_str_int} {new_out}", 1, r"hidden_size.*'64'.*int"),
    R("convert-missing-tensor", "convert {missing_tensor} {new_out}", 1, r"missing.*o_proj"),
    R("convert-extra-tensor", "convert {extra_tensor} {new_out}", 1, r"unexpected.*mystery"),
    R("convert-truncated", "convert {truncated_weights} {new_out}", 1,
      r"truncated_weights/model\.safetensors: truncated"),
    R("convert-truncated-keeps-dst", "convert {truncated_weights} {dst_existing}", 1,
      r"truncated_weights/model\.safetensors: truncated"),
    R("convert-pickle-only", "convert {pickle_only} {new_out}", 1, r"pickle_only.*pickle"),
    R("convert-no-weights", "convert {no_weights} {new_out}", 1,
      both(r"no_weights", r"no model\.safetensors")),
    R("convert-shard-deleted", "convert {shard_deleted} {new_out}", 1,
      r"shard_deleted/model-00003-of-\d+\.safetensors: missing"),
    R("convert-shard-truncated", "convert {shard_truncated} {new_out}", 1,
      r"shard_truncated/model-00003-of-\d+\.safetensors: truncated"),
    R("convert-index-garbled", "convert {index_garbled} {new_out}", 1,
      both(r"index_garbled/model\.safetensors\.index\.json", r"not a valid")),
    R("convert-dst-user-dir", "convert {ck} {dst_user}", 1,
      both(r"dst_user", r"not empty", r"--overwrite")),
    R("convert-dst-existing", "convert {ck} {dst_existing}", 1,
      both(r"dst_existing", r"not empty", r"--overwrite")),
    R("convert-overwrite-bad-regex-keeps-dst",
      ("convert", "{ck}", "{dst_existing}", "--overwrite", "--ignore", "(x"), 2, r"ignore.*\(x"),
    R("convert-overwrite-truncated-keeps-dst", "convert {truncated_weights} {dst_existing} --overwrite", 1,
      r"truncated_weights/model\.safetensors: truncated"),
    R("convert-overwrite-missing-tensor-keeps-user-dir", "convert {missing_tensor} {dst_user} --overwrite", 1,
      both(r"missing_tensor", r"missing keys: model\.layers\.0\.self_attn\.o_proj\.weight")),
    R("convert-overwrite-shard-deleted-keeps-dst", "convert {shard_deleted} {dst_existing} --overwrite", 1,
      r"shard_deleted/model-00003-of-\d+\.safetensors: missing"),
    # --- cost -------------------------------------------------------------------------------------
    R("cost-nothing", "cost", 2, r"give a MODEL"),
    R("cost-unknown-preset", "cost nonesuch", 2, r"unknown preset 'nonesuch'"),
    R("cost-nonexistent-path", "cost {missing}/", 1,
      both(r"does_not_exist", r"no such|not found|does not exist")),
    R("cost-mfu-zero", "cost micro --mfu 0", 2, r"mfu.*0.*\(0, 1\]"),
    R("cost-mfu-big", "cost micro --mfu 2", 2, r"mfu.*2.*\(0, 1\]"),
    R("cost-mfu-nan", "cost micro --mfu nan", 2, r"mfu.*nan.*\(0, 1\]"),
    R("cost-batch-zero", "cost micro --batch 0", 2, r"batch.*0.*>= 1"),
    R("cost-context-word", "cost micro --context long", 2, r"--context=.long. is not a number"),
    R("cost-context-negative", "cost micro --context -5", 2, r"--context=.-5. must be a non-negative"),
    R("cost-tokens-word", "cost micro --tokens lots", 2, r"--tokens=.lots. is not a number"),
    R("cost-seq-len-zero", "cost micro --seq-len 0", 2, r"seq.len.*0.*>= 1"),
    R("cost-gpu-unknown", "cost micro --gpu Z100", 2, r"unknown gpu .Z100"),
    R("cost-gpu-hours-word", "cost micro --gpu-hours many", 2, r"--gpu-hours=.many. is not a number"),
    R("cost-gpu-hours-zero", "cost micro --gpu-hours 0", 2, r"gpu.hours.*0.*> 0"),
    R("cost-dense-word", "cost micro --dense big", 2, r"--dense=.big. is not a number"),
    R("cost-dp-zero", "cost micro --dp 0", 2, r"dp=0 must be a positive"),
    R("cost-ep-not-dividing", "cost micro --ep 3", 2, r"ep=3 must divide dp=8"),
    R("cost-pp-zero", "cost micro --pp 0", 2, r"pp=0 must be a positive"),
    R("cost-zero-choice", "cost micro --zero 2", 2, r"--zero.*invalid choice"),
    R("cost-precision-choice", "cost micro --precision fp4", 2, r"--precision.*invalid choice.*fp4"),
    R("cost-batch-not-int", "cost micro --batch x", 2, r"--batch.*invalid int"),
    R("cost-cfg-unknown-field", "cost {cfg_unknown_field_json}", 1, r"cfg_unknown_field\.json.*hiden_size"),
    R("cost-cfg-str-int", "cost {cfg_str_int_json}", 1, r"hidden_size.*'64'.*int"),
    R("cost-cfg-null-int", "cost {cfg_null_int_json}", 1, r"num_hidden_layers.*None.*int"),
    R("cost-cfg-bool-int", "cost {cfg_bool_int_json}", 1, r"num_hidden_layers.*True.*int"),
    R("cost-cfg-bool-str", "cost {cfg_bool_str_json}", 1, r"norm_topk_prob.*'false'.*bool"),
    R("cost-cfg-nan", "cost {cfg_nan_json}", 1, r"rms_norm_eps.*nan.*finite"),
    R("cost-cfg-negative", "cost {cfg_negative_json}", 1, r"hidden_size.*-64"),
    R("cost-cfg-zero-layers", "cost {cfg_zero_layers_json}", 1, r"num_hidden_layers.*0"),
    R("cost-cfg-topk", "cost {cfg_topk_json}", 1, r"num_experts_per_tok.*9.*n_routed_experts"),
    R("cost-cfg-unknown-preset", "cost {cfg_unknown_preset_json}", 1, r"unknown preset 'nonesuch'"),
    R("cost-cfg-not-object", "cost {cfg_not_object_json}", 1, r"cfg_not_object\.json.*object"),
    R("cost-cfg-syntax-json", "cost {cfg_syntax_json}", 1, r"cfg_syntax\.json.*JSON"),
    R("cost-cfg-empty", "cost {cfg_empty_json}", 1, both(r"cfg_empty\.json", r"JSON")),
    R("cost-cfg-missing-sizes", "cost {cfg_missing_sizes_json}", 1, r"cfg_missing_sizes\.json.*vocab_size"),
    R("cost-toml-unknown-field", "cost {cfg_unknown_field_toml}", 1, r"cfg_unknown_field\.toml.*hiden_size"),
    R("cost-toml-str-int", "cost {cfg_str_int_toml}", 1, r"hidden_size.*'64'.*int"),
    R("cost-toml-syntax", "cost {cfg_syntax_toml}", 1, r"cfg_syntax\.toml.*TOML"),
    R("cost-toml-bool-int", "cost {cfg_bool_int_toml}", 1, r"num_hidden_layers.*True.*int"),
    R("cost-toml-inf", "cost {cfg_inf_toml}", 1, r"routed_scaling_factor.*inf.*finite"),
    R("cost-toml-unknown-preset", "cost {cfg_unknown_preset_toml}", 1, r"unknown preset 'nonesuch'"),
    R("cost-yaml", "cost {cfg_yaml}", 1, both(r"cfg\.yaml", r"JSON|TOML")),
    R("cost-hf-dir-garbled", "cost {garbled_config}", 1, r"garbled_config/config\.json.*JSON"),
    R("cost-hf-dir-str-int", "cost {config_str_int}", 1, r"hidden_size.*'64'.*int"),
    R("cost-hf-dir-no-config", "cost {no_config}", 1, r"no_config.*config\.json"),
    R("cost-compare-unknown", "cost --compare micro nonesuch", 2, r"unknown preset 'nonesuch'"),
    R("cost-hf-dir-unknown-type", "cost {config_unknown_type}", 1,
      r"model_type='gpt2'.*not a supported family"),
    R("cost-plot-missing-dir", ("cost", "--plot", "{missing}/plot.png"), 1,
      both(r"does_not_exist", r"no such|not found|does not exist")),
    R("cost-widemoe-block-bad-type", "cost {config_widemoe_bad_type}", 1,
      both(r"config_widemoe_bad_type/config\.json", r"capacity_factor='large'.*number")),
    R("cost-hf-float-null", "cost {config_hf_float_null}", 1,
      both(r"config_hf_float_null/config\.json", r"rms_norm_eps=None.*number")),
    # --- train ------------------------------------------------------------------------------------
    R("train-steps-zero", ("train", *TN, "--steps", "0"), 2, r"steps.*0.*>= 1"),
    R("train-batch-zero", ("train", *TN, "--batch-size", "0"), 2, r"batch.size.*0.*>= 1"),
    R("train-seq-len-zero", ("train", *TN, "--seq-len", "0"), 2, r"seq.len.*0.*>= 1"),
    R("train-seq-len-beyond-positions", ("train", *TN, "--seq-len", "4096"), 2,
      r"seq.len.*4096.*max_position_embeddings"),
    R("train-grad-accum-zero", ("train", *TN, "--grad-accum", "0"), 2, r"grad.accum.*0.*>= 1"),
    R("train-lr-zero", ("train", *TN, "--lr", "0"), 2, r"lr.*0.*must be > 0"),
    R("train-lr-negative", ("train", *TN, "--lr", "-1"), 2, r"lr.*-1.*must be > 0"),
    R("train-lr-nan", ("train", *TN, "--lr", "nan"), 2, r"lr.*nan.*finite"),
    R("train-warmup-negative", ("train", *TN, "--warmup-steps", "-1"), 2, r"warmup.steps.*-1.*>= 0"),
    R("train-grad-clip-negative", ("train", *TN, "--grad-clip", "-1"), 2, r"grad.clip.*-1.*>= 0"),
    R("train-weight-decay-negative", ("train", *TN, "--weight-decay", "-0.1"), 2,
      r"weight.decay.*-0\.1.*>= 0"),
    R("train-eval-batches-zero", ("train", *TN, "--eval-batches", "0"), 2, r"eval.batches.*0.*>= 1"),
    R("train-eval-every-zero", ("train", *TN, "--eval-every", "0"), 2, r"eval.every.*0.*>= 1"),
    R("train-save-every-zero", ("train", *TN, "--save-every", "0"), 2, r"save.every.*0.*>= 1"),
    R("train-keep-last-zero", ("train", *TN, "--keep-last", "0"), 2, r"keep.last.*0.*>= 1"),
    R("train-stop-at-zero", ("train", *TN, "--stop-at", "0"), 2, r"stop.at.*0.*>= 1"),
    R("train-stop-at-beyond", ("train", *TN, "--steps", "4", "--stop-at", "9"), 2, r"stop.at.*9.*steps"),
    R("train-bias-speed-negative", ("train", *TN, "--bias-update-speed", "-1"), 2,
      r"bias.update.speed.*-1.*> 0"),
    R("train-vocab-tiny", ("train", *TN, "--vocab-size", "10"), 2, r"vocab.size.*10.*>= \d+"),
    R("train-balance-choice", ("train", *TN, "--balance", "magic"), 2, r"--balance.*invalid choice.*magic"),
    R("train-steps-not-int", ("train", *TN, "--steps", "ten"), 2, r"--steps.*invalid int.*ten"),
    R("train-unknown-flag", ("train", *TN, "--learning-rate", "1"), 2,
      r"unrecognized arguments.*--learning-rate"),
    R("train-unknown-preset", "train --preset nonesuch --no-progress --run-dir {new_out}", 2,
      r"unknown preset 'nonesuch'"),
    R("train-config-nonexistent", ("train", *TN, "--config", "{missing}.json"), 1,
      both(r"does_not_exist\.json", r"no such|not found|does not exist")),
    R("train-config-unknown-field", ("train", *TN, "--config", "{cfg_unknown_field_json}"), 1,
      r"cfg_unknown_field\.json.*hiden_size"),
    R("train-config-str-int", ("train", *TN, "--config", "{cfg_str_int_json}"), 1, r"hidden_size.*'64'.*int"),
    R("train-config-bool-str", ("train", *TN, "--config", "{cfg_bool_str_json}"), 1,
      r"norm_topk_prob.*'false'.*bool"),
    R("train-config-syntax-toml", ("train", *TN, "--config", "{cfg_syntax_toml}"), 1,
      r"cfg_syntax\.toml.*TOML"),
    R("train-resume-nothing", ("train", *TN, "--resume"), 1, r"--resume: nothing to resume in .*new_out"),
    R("train-resume-run-truncated", ("train", *T, "--resume", "--run-dir", "{run_truncated}"), 1,
      r"step-00000002/model\.safetensors"),
    R("train-resume-run-deleted", ("train", *T, "--resume", "--run-dir", "{run_deleted}"), 1,
      r"step-00000002/model\.safetensors: missing"),
    R("train-used-run-dir", ("train", *T, "--run-dir", "{run}"), 1,
      r"run.*(--resume|--fresh)"),
    R("train-threads-word", ("train", *TN), 1, r"WIDEMOE_THREADS.*'many'.*integer",
      WIDEMOE_THREADS="many"),
    R("train-locked-resume", ("train", *T, "--resume", "--run-dir", "{run_locked}"), 1,
      r"run_locked is in use by another training: process 1 on"),
    R("train-locked-fresh", ("train", *T, "--fresh", "--run-dir", "{run_locked}"), 1,
      r"run_locked is in use by another training: process 1 on"),
    R("train-locked-new-run", ("train", *T, "--run-dir", "{run_locked}"), 1,
      r"run_locked is in use by another training: process 1 on"),
    R("train-resume-steps-below", ("train", *T, "--resume", "--run-dir", "{run}", "--steps", "1"), 1,
      both(r"--steps", r"\b1\b", r"step 2")),
    R("train-config-nan", ("train", *TN, "--config", "{cfg_nan_json}"), 1,
      r"rms_norm_eps=nan must be a finite"),
    R("train-preset-garbled-dir", ("train", *TN, "--preset", "{garbled_config}"), 1,
      both(r"garbled_config/config\.json", r"JSON")),
    R("train-preset-nonexistent-path", ("train", *TN, "--preset", "{missing}/"), 1,
      both(r"does_not_exist", r"no such|not found|does not exist")),
    R("train-cache-a-file", ("train", *TN), 1, both(r"a_file\.txt", r"WIDEMOE_CACHE|not a directory"),
      WIDEMOE_CACHE="{a_file}"),
    R("train-too-big", "train --preset deepseek-v3 --no-progress --run-dir {new_out}", 1,
      both(r"deepseek-v3", r"\d+(\.\d+)? TB", r"available")),
    # --- report -----------------------------------------------------------------------------------
    R("report-missing-arg", "report", 2, r"required.*RUN_DIR"),
    R("report-nonexistent", "report {missing}", 1, both(r"does_not_exist", r"does not exist")),
    R("report-a-file", "report {a_file}", 1, both(r"a_file\.txt", r"not a directory")),
    R("report-empty-dir", "report {empty_dir}", 1, r"empty_dir/metrics\.jsonl not found"),
    R("report-no-metrics", "report {run_no_metrics} --out {new_out}", 1,
      r"run_no_metrics/metrics\.jsonl not found"),
    R("report-empty-metrics", "report {run_empty_metrics} --out {new_out}", 1,
      r"run_empty_metrics/metrics\.jsonl.*no .eval. record"),
    R("report-checkpoint-dir", "report {ck}", 1, r"ck/metrics\.jsonl not found"),
    R("report-out-nested-in-file", "report {run} --out {a_file}/sub", 1,
      both(r"a_file\.txt", r"not a directory")),
    # --- a widemoe block that is not a mapping, the corpus directory -----------------------------------
    R("inspect-widemoe-block-str", "inspect {config_widemoe_str}", 1,
      both(r"config_widemoe_str/config\.json", r"widemoe.*'x'.*(object|mapping|table)")),
    R("generate-widemoe-block-str", "generate {config_widemoe_str} x", 1,
      both(r"config_widemoe_str/config\.json", r"widemoe.*'x'.*(object|mapping|table)")),
    R("cost-widemoe-block-str", "cost {config_widemoe_str}", 1,
      both(r"config_widemoe_str/config\.json", r"widemoe.*'x'.*(object|mapping|table)")),
    R("train-data-dir-missing", ("train", *TN, "--steps", "3"), 1, r"does_not_exist.*WIDEMOE_DATA_DIR",
      WIDEMOE_DATA_DIR="{missing}"),
    R("train-resume-and-fresh", ("train", *TN, "--resume", "--fresh"), 2,
      r"--resume.*--fresh|--fresh.*--resume"),
    R("train-threads-zero", ("train", *TN, "--steps", "3"), 1, r"WIDEMOE_THREADS.*0.*>= 1",
      WIDEMOE_THREADS="0"),
    R("train-run-dir-a-file", ("train", *T, "--run-dir", "{a_file}"), 1,
      both(r"a_file\.txt", r"not a directory|is a file")),
    R("report-out-a-file", "report {run} --out {a_file}", 1,
      both(r"a_file\.txt", r"not a directory|is a file")),
    # --- a mis-shaped tensor is a mismatch, not also a missing key ------------------------------------
    R("inspect-misshaped", "inspect {misshaped_tensor}", 1,
      r"^(?!.*missing).*model\.norm\.weight: expected \[64\] vs found \[65\]"),
    R("generate-misshaped", "generate {misshaped_tensor} x", 1,
      r"^(?!.*missing).*model\.norm\.weight: expected \[64\] vs found \[65\]"),
    R("convert-misshaped-keeps-dst", "convert {misshaped_tensor} {dst_existing} --overwrite", 1,
      r"^(?!.*missing).*model\.norm\.weight: expected \[64\] vs found \[65\]"),
    # --- RoPE blocks and factors of the wrong type ----------------------------------------------------
    R("inspect-rope-scaling-str", "inspect {config_rope_scaling_str}", 1,
      both(r"config_rope_scaling_str/config\.json", r"rope_scaling='yarn' must be an object")),
    R("cost-rope-params-list", "cost {config_rope_params_list}", 1,
      both(r"config_rope_params_list/config\.json", r"rope_parameters=\[1, 2\] must be an object")),
    R("generate-prf-bool", "generate {config_prf_bool} x", 1,
      both(r"config_prf_bool/config\.json", r"partial_rotary_factor=True.*number")),
    R("cost-v4-rope-params-str", "cost {v4_rope_params_str}", 1,
      both(r"v4_rope_params_str\.json", r"rope_parameters='yarn' must be an object")),
    R("cost-v4-rope-scaling-list", "cost {v4_rope_scaling_list}", 1,
      both(r"v4_rope_scaling_list\.json", r"rope_scaling=\[\['type', 'yarn'\]\] must be an object")),
    # --- cost amounts that estimate nothing, convert from a run directory, a garbled eval record -------
    R("cost-context-zero", "cost micro --context 0", 2, r"--context=0 must be >= 1"),
    R("cost-tokens-zero", "cost micro --tokens 0", 2, r"--tokens=0 must be > 0"),
    R("cost-dense-zero", "cost micro --dense 0", 2, r"--dense=0 must be >= 1"),
    R("convert-run-no-ckpt", "convert {run_no_ckpt} {new_out}", 1,
      r"run_no_ckpt is a run directory without a committed checkpoint"),
    R("convert-run-truncated-keeps-dst", "convert {run_truncated} {dst_existing} --overwrite", 1,
      r"run_truncated/checkpoints/step-00000002/model\.safetensors: truncated"),
    R("report-garbled-eval", "report {run_garbled_eval} --out {new_out}", 1,
      both(r"run_garbled_eval/metrics\.jsonl", r"no 'eval' record that can be read", r"line \d+")),
    R("report-garbled-metrics", "report {run_garbled_metrics} --out {new_out}", 1,
      both(r"run_garbled_metrics/metrics\.jsonl", r"no 'eval' record that can be read \(line 1\b")),
    # --- several processes, export ------------------------------------------------------------------
    R("train-ep-without-torchrun", ("train", *TN, "--ep", "2"), 2,
      r"--ep 2 needs several processes.*torchrun"),
    R("train-ep-zero", ("train", *TN, "--ep", "0"), 2, r"ep.*0.*>= 1"),
    R("export-missing-arg", "export {run}", 2, r"required.*DST"),
    R("export-nonexistent", "export {missing} {new_out}", 1, both(r"does_not_exist", r"no such directory")),
    R("export-a-file", "export {a_file} {new_out}", 1, both(r"a_file\.txt", r"not a directory")),
    R("export-run-no-ckpt", "export {run_no_ckpt} {new_out}", 1,
      r"run_no_ckpt is a run directory without a committed checkpoint"),
    R("export-dst-user-dir", "export {run} {dst_user}", 1, both(r"dst_user", r"not empty", r"--overwrite")),
    R("export-dtype-choice", "export {run} {new_out} --dtype fp8", 2, r"--dtype.*invalid choice.*fp8"),
    R("generate-dcp-run", "generate {run_dcp} x", 1, both(r"run_dcp", r"DCP", r"widemoe export")),
    # --- serve: everything checkable without the weights fails before a port is taken -------------
    R("serve-missing-arg", "serve", 2, r"required.*model"),
    R("serve-unknown-preset", "serve nosuch", 2, r"unknown preset 'nosuch'"),
    R("serve-nonexistent", "serve {missing}", 1, both(r"does_not_exist", r"no such file or directory")),
    R("serve-dcp-run", "serve {run_dcp}", 1, both(r"run_dcp", r"DCP", r"widemoe export")),
    R("serve-port-range", "serve micro --port 70000", 2, r"--port=70000 must be in \[0, 65535\]"),
    R("serve-port-text", "serve micro --port http", 2, r"--port.*invalid int value: 'http'"),
    R("serve-max-num-seqs-zero", "serve micro --max-num-seqs 0", 2, r"--max-num-seqs=0 must be >= 1"),
    R("serve-max-queue-zero", "serve micro --max-queue 0", 2, r"--max-queue=0 must be >= 1"),
    R("serve-max-model-len-zero", "serve micro --max-model-len 0", 2, r"--max-model-len=0 must be >= 1"),
    R("serve-max-model-len-over", "serve micro --max-model-len 4096", 2,
      r"--max-model-len=4096 must be in \[1, 128\].*max_position_embeddings"),
    R("serve-template-missing", "serve micro --chat-template {missing}", 1,
      both(r"does_not_exist", r"cannot read the chat template")),
    R("serve-template-dir", "serve micro --chat-template {empty_dir}", 1,
      both(r"empty_dir", r"cannot read the chat template")),
    R("serve-empty-name", ("serve", "micro", "--served-model-name", " "), 2,
      r"--served-model-name must not be empty"),
    R("serve-dtype-choice", "serve micro --dtype fp8", 2, r"--dtype.*invalid choice.*fp8"),
    # weights that fail to load in the background stop the server (it listened on a free port meanwhile)
    R("serve-truncated-weights", "serve {truncated_weights} --port 0", 1,
      r"truncated_weights/model\.safetensors.*(truncated|damaged|corrupt)"),
    R("serve-missing-tensor", "serve {missing_tensor} --port 0", 1, r"missing.*o_proj"),
    # --- top level --------------------------------------------------------------------------------
    R("unknown-command", "frobnicate micro", 2, r"invalid choice.*frobnicate"),
]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str, str]:
    """(exit status, stdout, stderr) of `widemoe argv`, as a user's shell would see them.

    `SystemExit("error: ...")` prints its message on stderr with status 1, as Python does; any other
    exception escaping `main` is what a user would see as a traceback, so it is returned as one.
    """
    capsys.readouterr()
    tb = ""
    try:
        code: object = main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = 0 if e.code is None else e.code
    except Exception:  # noqa: BLE001 - a traceback is the failure this suite looks for
        code, tb = "traceback", traceback.format_exc()
    out, err = capsys.readouterr()
    return code, out, err + tb


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from corpus_helpers import subset
    from widemoe import data as wdata
    from widemoe.train.config import TrainConfig
    from widemoe.train.run import run_training

    work = tmp_path_factory.mktemp("bad_inputs_train")
    corpus = subset(wdata.build_corpus(math_chars=60_000), 12)
    tc = TrainConfig(run_dir=str(work / "run"), preset="micro", vocab_size=512, seq_len=32, batch_size=4,
                     steps=2, warmup_steps=1, eval_every=2, eval_batches=1, save_every=2, progress=False)
    run_training(tc, corpus=corpus, cache_dir=work / "cache")
    root = tmp_path_factory.mktemp("bad_inputs")
    return {**build_fixtures(root, work / "run"), "cache": str(work / "cache")}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, fixtures: dict[str, str], capsys, monkeypatch) -> None:
    check_row(row, fixtures, capsys, monkeypatch)


def check_row(row: Row, fixtures: dict[str, str], capsys, monkeypatch) -> None:
    """Run one row and assert its exit status, its one error line, no traceback, an unchanged disk."""
    root = Path(fixtures["root"])
    monkeypatch.chdir(root)  # anything a command writes by default lands where the snapshot sees it
    monkeypatch.setenv("WIDEMOE_CACHE", fixtures["cache"])  # outside `root`: a cache may fill
    for k, v in row.env.items():
        monkeypatch.setenv(k, v.format(**fixtures))
    argv = [a.format(**fixtures) for a in row.argv]
    before = snapshot(root)
    code, out, err = run_cli(argv, capsys)
    after = snapshot(root)
    shown = f"$ widemoe {' '.join(argv)}\nexit {code}\n--- stdout\n{out}--- stderr\n{err}"
    assert "Traceback" not in out + err, shown
    assert code == row.code, shown
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, shown
    assert re.search(row.message, errors[0]), f"{row.message!r} not in {errors[0]!r}\n{shown}"
    assert after == before, f"disk changed: {sorted(set(after.items()) ^ set(before.items()))}\n{shown}"


def test_rows_are_many_and_distinct() -> None:
    assert len(ROWS) >= 60
    assert {r.argv[0] for r in ROWS} >= {"inspect", "generate", "convert", "cost", "train", "report"}
    assert len({r.id for r in ROWS}) == len(ROWS)
    assert len({(r.argv, tuple(sorted(r.env.items()))) for r in ROWS}) == len(ROWS)
