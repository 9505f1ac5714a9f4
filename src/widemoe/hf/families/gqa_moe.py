"""Qwen3-MoE, Mixtral and OLMoE: grouped-query attention, plain softmax top-k routing, no shared
experts, no MTP, rotate-half RoPE. config.json semantics follow transformers 5.24's modeling files:

- Qwen3-MoE: layer i is MoE iff ``i not in mlp_only_layers`` and ``(i+1) % decoder_sparse_step == 0``;
  ``num_experts`` is an alias of ``num_local_experts``; qk-norm per head.
- Mixtral: the top-k weights are always renormalised; ``intermediate_size`` is the expert width; on
  disk ``block_sparse_moe.gate.weight`` and ``block_sparse_moe.experts.{e}.w1|w3|w2.weight`` (w1 gate,
  w3 up, w2 down).
- OLMoE: qk-norm over the full projection; ``norm_topk_prob`` defaults to false.

widemoe only accepts what it can run: a sliding window, ``clip_qkv``, router jitter, ... are a
ConfigError naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from widemoe.config import ModelConfig
from widemoe.hf.families.base import FamilyAdapter, Redundant, Shapes, Slot
from widemoe.hf.families.common import HfFields, core_to_hf, finish, read_core, requirement, widemoe_block
from widemoe.hf.families.hf_keys import decoder_source_slot, decoder_target_keys

Need = Callable[[bool, str], None]


class _GqaFamily(FamilyAdapter):
    """What the three families share; each subclass adds its own fields in `_own_from_hf` / `_own_to_hf`."""

    defaults: dict[str, Any] = {}
    dense_list = False  # the family lists dense layers in config.json (mlp_only_layers)

    def config_from_hf(self, hf: dict[str, Any], *, source: str) -> tuple[ModelConfig, list[str]]:
        r = HfFields(hf, self.name, self.defaults, source)
        c = read_core(r)
        r.refuse(r.raw("mlp_bias", bool, False), "mlp_bias=true is not supported")
        r.seen("mlp_bias")
        E = r.get("num_experts", "num_local_experts", "n_routed_experts", required=True)
        hd = hf.get("head_dim")
        if hd is not None and c["hidden_size"] == hd * c["num_attention_heads"]:
            hd = None  # the implied width; keeps configs from both sides equal
        c.update(
            scoring_func="softmax",
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            n_shared_experts=0,
            routed_scaling_factor=1.0,
            num_key_value_heads=r.get("num_key_value_heads"),
            head_dim=hd,
            num_experts_per_tok=r.get(
                "num_experts_per_tok", required="num_experts_per_tok" not in self.defaults
            ),
            n_routed_experts=E,
            rope_interleave=False,
            attention_bias=bool(r.get("attention_bias") or False),
            router_aux_loss_coef=r.get("router_aux_loss_coef"),
        )
        self._own_from_hf(r, c)
        return finish(r, c)

    def _own_from_hf(self, r: HfFields, c: dict[str, Any]) -> None:
        raise NotImplementedError

    def config_to_hf(
        self, cfg: ModelConfig, *, dtype: str | None = None, layout: str | None = None
    ) -> dict[str, Any]:
        fam = self.name
        need = requirement(fam)
        d = core_to_hf(cfg, fam, self.architectures[0], dtype, dense_list=self.dense_list)
        need(not cfg.is_mla, f"kv_lora_rank={cfg.kv_lora_rank} (MLA exists only in DeepSeek families)")
        need(
            cfg.scoring_func == "softmax" and cfg.topk_method == "greedy" and cfg.n_group == 1,
            f"scoring_func={cfg.scoring_func!r}, topk_method={cfg.topk_method!r}, n_group={cfg.n_group}: "
            f"{fam} routes with plain softmax top-k",
        )
        need(
            cfg.n_shared_experts == 0,
            f"n_shared_experts={cfg.n_shared_experts} ({fam} has no shared experts)",
        )
        need(
            cfg.routed_scaling_factor == 1.0,
            f"routed_scaling_factor={cfg.routed_scaling_factor} ({fam} has none)",
        )
        need(not cfg.rope_interleave, f"rope_interleave=true ({fam} uses rotate-half RoPE)")
        need(cfg.rope_scaling is None, "rope_scaling set (YaRN is supported for DeepSeek families only)")
        need(cfg.num_nextn_predict_layers == 0, f"num_nextn_predict_layers > 0 ({fam} has no MTP)")
        d.update(
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.gqa_head_dim,
            num_experts_per_tok=cfg.num_experts_per_tok,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
        )
        if not self.dense_list:
            need(
                cfg.moe_layer_indices == list(range(cfg.num_hidden_layers)),
                f"first_k_dense_replace={cfg.first_k_dense_replace} ({fam} has only MoE layers)",
            )
        d.update(self._own_to_hf(cfg, need))
        d["widemoe"] = widemoe_block(cfg)
        return d

    def _own_to_hf(self, cfg: ModelConfig, need: Need) -> dict[str, Any]:
        raise NotImplementedError

    def source_slot(self, key: str, cfg: ModelConfig, shapes: Shapes) -> Slot | Redundant | None:
        return decoder_source_slot(key, cfg, shapes)

    def target_keys(
        self, target: str, shape: tuple[int, ...], cfg: ModelConfig, layout: str | None = None
    ) -> list[tuple[str, Slot]]:
        return decoder_target_keys(target, target, shape)


class Qwen3Moe(_GqaFamily):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architectures = ("Qwen3MoeForCausalLM",)
    dense_list = True
    defaults = dict(
        num_key_value_heads=4,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=None,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=None,
        router_aux_loss_coef=0.001,
        intermediate_size=6144,
        rope_theta=10000.0,
    )

    def _own_from_hf(self, r: HfFields, c: dict[str, Any]) -> None:
        r.refuse(
            r.raw("use_sliding_window", bool, False),
            "use_sliding_window=true is not supported (full attention only)",
        )
        E = c["n_routed_experts"]
        step = r.raw("decoder_sparse_step", int) or 1
        only = set(r.get("mlp_only_layers") or [])
        dense = sorted(i for i in range(c["num_hidden_layers"]) if i in only or E == 0 or (i + 1) % step != 0)
        c.update(
            intermediate_size=r.get("intermediate_size"),
            qk_norm="head",
            moe_intermediate_size=r.get("moe_intermediate_size", required=True),
            norm_topk_prob=r.get("norm_topk_prob"),
            mlp_only_layers=tuple(dense),
        )
        if E == 0:
            c.update(n_routed_experts=1, num_experts_per_tok=1)

    def _own_to_hf(self, cfg: ModelConfig, need: Need) -> dict[str, Any]:
        need(cfg.qk_norm == "head", f"qk_norm={cfg.qk_norm!r} (Qwen3-MoE normalises q/k per head)")
        return dict(
            num_experts=cfg.n_routed_experts,
            moe_intermediate_size=cfg.moe_intermediate_size,
            intermediate_size=cfg.intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=sorted({i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)}),
            attention_bias=cfg.attention_bias,
            use_sliding_window=False,
            sliding_window=None,
        )


class Mixtral(_GqaFamily):
    name = "mixtral"
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)
    defaults = dict(
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096 * 32,
        bos_token_id=1,
        eos_token_id=2,
        router_aux_loss_coef=0.001,
        num_experts_per_tok=2,
        rope_theta=1e6,
    )
    # on-disk spelling <-> transformers' (w1 gate, w3 up, w2 down)
    _RENAMES = (
        (r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
        (r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
        (r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
        (r"\.block_sparse_moe\.", r".mlp."),
    )

    def _own_from_hf(self, r: HfFields, c: dict[str, Any]) -> None:
        sw = r.hf.get("sliding_window")
        r.refuse(sw is not None, f"sliding_window={sw} is not supported (full attention only)")
        jit = r.raw("router_jitter_noise", float, 0.0)
        r.refuse(jit != 0, f"router_jitter_noise={jit} is not supported")
        I = r.get("intermediate_size", required=True)
        c.update(intermediate_size=I, moe_intermediate_size=I, norm_topk_prob=True, attention_bias=False)

    def _own_to_hf(self, cfg: ModelConfig, need: Need) -> dict[str, Any]:
        need(
            cfg.qk_norm == "none" and not cfg.attention_bias, "qk_norm / attention_bias (Mixtral has neither)"
        )
        need(cfg.norm_topk_prob, "norm_topk_prob=false (Mixtral always renormalises)")
        return dict(
            num_local_experts=cfg.n_routed_experts,
            intermediate_size=cfg.moe_intermediate_size,
            sliding_window=None,
            router_jitter_noise=0.0,
        )

    def source_slot(self, key: str, cfg: ModelConfig, shapes: Shapes) -> Slot | Redundant | None:
        for pat, rep in self._RENAMES:
            key = re.sub(pat, rep, key, count=1)
        return decoder_source_slot(key, cfg, shapes)

    def target_keys(
        self, target: str, shape: tuple[int, ...], cfg: ModelConfig, layout: str | None = None
    ) -> list[tuple[str, Slot]]:
        out = []
        for key, slot in decoder_target_keys(target, target, shape):
            key = re.sub(r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1.", key)
            key = re.sub(r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3.", key)
            key = re.sub(r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2.", key)
            out.append((re.sub(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight", key), slot))
        return out


class Olmoe(_GqaFamily):
    name = "olmoe"
    model_types = ("olmoe",)
    architectures = ("OlmoeForCausalLM",)
    defaults = dict(
        num_key_value_heads=None,
        norm_topk_prob=False,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=50279,
        pad_token_id=1,
        router_aux_loss_coef=0.01,
        rope_theta=10000.0,
    )

    def _own_from_hf(self, r: HfFields, c: dict[str, Any]) -> None:
        clip = r.get("clip_qkv")
        r.refuse(clip is not None, f"clip_qkv={clip} is not supported")
        I = r.get("intermediate_size", required=True)
        c.update(
            intermediate_size=I,
            moe_intermediate_size=I,
            qk_norm="full",
            norm_topk_prob=r.get("norm_topk_prob"),
        )

    def _own_to_hf(self, cfg: ModelConfig, need: Need) -> dict[str, Any]:
        need(cfg.qk_norm == "full", f"qk_norm={cfg.qk_norm!r} (OLMoE normalises the full q/k projection)")
        return dict(
            num_experts=cfg.n_routed_experts,
            intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            attention_bias=cfg.attention_bias,
            clip_qkv=None,
        )


ADAPTERS: tuple[FamilyAdapter, ...] = (Qwen3Moe(), Mixtral(), Olmoe())

__all__ = ["ADAPTERS", "Mixtral", "Olmoe", "Qwen3Moe"]
