"""DeepSeek-V3 (also DeepSeek-R1 and Kimi K2, whose configs say ``kimi_k2`` with the DeepseekV3
architecture) and DeepSeek-V2 (incl. V2-Lite): MLA attention, shared experts, MTP modules.

config.json semantics follow transformers 5.24's configuration and modeling files (our parity
reference). DeepSeek-V2: transformers 5.24's router never renormalises (it ignores
``norm_topk_prob``), so widemoe loads V2 with ``norm_topk_prob=False`` and says so when the file asked
for true.

On disk (what transformers 5.24's ``save_pretrained`` and the original releases write,
shared/reference/ecosystem.md section 3): per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``
(or the fused v5 ``mlp.experts.gate_up_proj`` / ``down_proj``, accepted on load, never written); MTP
module k at ``model.layers.{num_hidden_layers + k}.*``: ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``, the decoder block keys, and redundant copies ``embed_tokens.weight`` and
``shared_head.head.weight`` of the main embedding / head (verified on load, written on save).
FP8 block-quantised releases (V3/R1/V3.1, Kimi K2) are dequantised by the generic loader.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from widemoe.config import ModelConfig
from widemoe.hf.families.base import FamilyAdapter, Redundant, Shapes, Slot
from widemoe.hf.families.common import HfFields, core_to_hf, finish, read_core, requirement, widemoe_block
from widemoe.hf.families.hf_keys import decoder_source_slot, decoder_target_keys

_LAYER_RE = re.compile(r"^model\.layers\.(?P<n>\d+)\.(?P<rest>.+)$")
_MTP_RE = re.compile(r"^model\.mtp\.(?P<k>\d+)\.(?P<rest>.+)$")
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")

# transformers 5.24 class defaults used when a field is absent from config.json (only fields that
# change the computation; the core sizes are required).
_MLA_DEFAULTS: dict[str, Any] = dict(
    rms_norm_eps=1e-6,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    kv_lora_rank=512,
    rope_theta=10000.0,
)


class _DeepSeekFamily(FamilyAdapter):
    """What DeepSeek-V2 and -V3 share: MLA fields, keys with MTP layers and their redundant copies."""

    defaults: dict[str, Any] = {}

    def config_from_hf(self, hf: dict[str, Any], *, source: str) -> tuple[ModelConfig, list[str]]:
        r = HfFields(hf, self.name, self.defaults, source)
        if hf.get("model_type") == "kimi_k2":
            r.notices.append("model_type 'kimi_k2' is read as the DeepSeek-V3 architecture")
        c = read_core(r)
        r.refuse(r.raw("attention_bias", bool, False), "attention_bias=true is not supported (MLA attention)")
        r.refuse(r.raw("mlp_bias", bool, False), "mlp_bias=true is not supported")
        mlf = r.raw("moe_layer_freq", int, 1)
        r.refuse(
            mlf != 1,
            f"moe_layer_freq={mlf} is not supported (transformers and widemoe use every layer "
            "from first_k_dense_replace on)",
        )
        r.seen("attention_bias", "mlp_bias", "moe_layer_freq")
        c.update(
            intermediate_size=r.get("intermediate_size", required=True),
            moe_intermediate_size=r.get("moe_intermediate_size", required=True),
            n_routed_experts=r.get("n_routed_experts", "num_local_experts", "num_experts", required=True),
            n_shared_experts=r.get("n_shared_experts") or 0,
            num_experts_per_tok=r.get("num_experts_per_tok", required=True),
            first_k_dense_replace=r.get("first_k_dense_replace") or 0,
            n_group=r.get("n_group") or 1,
            topk_group=r.get("topk_group") or 1,
            routed_scaling_factor=r.get("routed_scaling_factor"),
            q_lora_rank=r.get("q_lora_rank") or None,
            kv_lora_rank=r.get("kv_lora_rank"),
            qk_nope_head_dim=r.get("qk_nope_head_dim"),
            qk_rope_head_dim=r.get("qk_rope_head_dim"),
            v_head_dim=r.get("v_head_dim"),
        )
        if "aux_loss_alpha" in hf:
            c["aux_loss_alpha"] = r.get("aux_loss_alpha")
        self._routing_from_hf(r, c)
        return finish(r, c, handled=self._own_widemoe_fields(r, c))

    def _routing_from_hf(self, r: HfFields, c: dict[str, Any]) -> None:
        raise NotImplementedError

    def _own_widemoe_fields(self, r: HfFields, c: dict[str, Any]) -> tuple[str, ...]:
        return ()

    def config_to_hf(
        self, cfg: ModelConfig, *, dtype: str | None = None, layout: str | None = None
    ) -> dict[str, Any]:
        need = requirement(self.name)
        d = core_to_hf(cfg, self.name, self.architectures[0], dtype)
        need(cfg.is_mla, "kv_lora_rank is null (GQA attention); DeepSeek families use MLA")
        need(cfg.qk_norm == "none" and not cfg.attention_bias, "qk_norm / attention_bias are not part of MLA")
        d.update(
            intermediate_size=cfg.intermediate_size,
            moe_intermediate_size=cfg.moe_intermediate_size,
            n_routed_experts=cfg.n_routed_experts,
            n_shared_experts=cfg.n_shared_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            first_k_dense_replace=cfg.first_k_dense_replace,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor,
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            num_key_value_heads=cfg.num_attention_heads,
            attention_bias=False,
            scoring_func=cfg.scoring_func,
            topk_method=cfg.topk_method,
            aux_loss_alpha=cfg.aux_loss_alpha,
        )
        d.update(self._routing_to_hf(cfg, need))
        d["widemoe"] = widemoe_block(cfg)
        if cfg.model_type == "kimi_k2":
            d["widemoe"]["source_model_type"] = "kimi_k2"
        return d

    def _routing_to_hf(self, cfg: ModelConfig, need: Callable[[bool, str], None]) -> dict[str, Any]:
        raise NotImplementedError

    def attention_summary(self, cfg: ModelConfig) -> str:
        return "MLA"

    # --- tensor names: decoder layers, then MTP module k as layer L + k -----------------------------
    def source_slot(self, key: str, cfg: ModelConfig, shapes: Shapes) -> Slot | Redundant | None:
        m = _LAYER_RE.match(key)
        if m is None or int(m["n"]) < cfg.num_hidden_layers:
            return decoder_source_slot(key, cfg, shapes)
        k, rest = int(m["n"]) - cfg.num_hidden_layers, m["rest"]
        if k >= cfg.num_nextn_predict_layers:
            return None
        base = f"model.mtp.{k}"
        if rest in _MTP_OWN:
            return Slot(f"{base}.{rest}")
        if rest == "shared_head.norm.weight":
            return Slot(f"{base}.shared_head_norm.weight")
        if rest == "embed_tokens.weight":
            return Redundant("model.embed_tokens.weight")
        if rest == "shared_head.head.weight":
            return Redundant("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
        return decoder_source_slot(f"{base}.block.{rest}", cfg, shapes)

    def target_keys(
        self, target: str, shape: tuple[int, ...], cfg: ModelConfig, layout: str | None = None
    ) -> list[tuple[str, Slot]]:
        m = _MTP_RE.match(target)
        if m is None:
            return decoder_target_keys(target, target, shape)
        base, rest = f"model.layers.{cfg.num_hidden_layers + int(m['k'])}", m["rest"]
        if rest == "shared_head_norm.weight":
            return [(f"{base}.shared_head.norm.weight", Slot(target))]
        name = f"{base}.{rest[len('block.') :]}" if rest.startswith("block.") else f"{base}.{rest}"
        return decoder_target_keys(target, name, shape)

    def redundant_keys(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        """The copies of the embedding and head DeepSeek tooling expects in each MTP layer."""
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        out = []
        for k in range(cfg.num_nextn_predict_layers):
            base = f"model.layers.{cfg.num_hidden_layers + k}"
            out += [
                (f"{base}.embed_tokens.weight", "model.embed_tokens.weight"),
                (f"{base}.shared_head.head.weight", head),
            ]
        return out


class DeepSeekV3(_DeepSeekFamily):
    """DeepSeek-V3 / R1 / V3.1 and Kimi K2: sigmoid scores, aux-free bias, group-limited top-k."""

    name = "deepseek_v3"
    model_types = ("deepseek_v3", "kimi_k2")
    architectures = ("DeepseekV3ForCausalLM",)
    config_model_types = ("deepseek_v3", "kimi_k2")
    defaults = dict(
        _MLA_DEFAULTS,
        n_shared_experts=1,
        first_k_dense_replace=3,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_interleave=True,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        num_nextn_predict_layers=0,
    )

    def _routing_from_hf(self, r: HfFields, c: dict[str, Any]) -> None:
        if r.hf.get("model_type") == "kimi_k2":
            c["model_type"] = "kimi_k2"
        sf = r.get("scoring_func") or "sigmoid"
        r.refuse(sf != "sigmoid", f"scoring_func={sf!r}: the DeepSeek-V3 architecture scores with sigmoid")
        tm = r.get("topk_method") or "noaux_tc"
        r.refuse(tm != "noaux_tc", f"topk_method={tm!r}: the DeepSeek-V3 architecture routes with noaux_tc")
        c.update(
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            norm_topk_prob=r.get("norm_topk_prob"),
            rope_interleave=r.get("rope_interleave"),
            num_nextn_predict_layers=r.get("num_nextn_predict_layers", "num_mtp_layers") or 0,
        )

    def _own_widemoe_fields(self, r: HfFields, c: dict[str, Any]) -> tuple[str, ...]:
        # a Kimi K2 model written by widemoe says so in its widemoe block (its model_type is deepseek_v3)
        if r.widemoe_block().get("source_model_type") == "kimi_k2":
            c["model_type"] = "kimi_k2"
            return ("source_model_type",)
        return ()

    def _routing_to_hf(self, cfg: ModelConfig, need: Callable[[bool, str], None]) -> dict[str, Any]:
        need(
            cfg.scoring_func == "sigmoid",
            f"scoring_func={cfg.scoring_func!r} (transformers' DeepSeek-V3 is sigmoid)",
        )
        need(
            cfg.topk_method == "noaux_tc",
            f"topk_method={cfg.topk_method!r} (DeepSeek-V3 routes with noaux_tc)",
        )
        return dict(
            norm_topk_prob=cfg.norm_topk_prob,
            rope_interleave=cfg.rope_interleave,
            num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        )


class DeepSeekV2(_DeepSeekFamily):
    """DeepSeek-V2 / V2-Lite: softmax scores, greedy or group-limited greedy top-k, no MTP."""

    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    architectures = ("DeepseekV2ForCausalLM",)
    defaults = dict(
        _MLA_DEFAULTS,
        n_shared_experts=2,
        first_k_dense_replace=0,
        n_group=None,
        topk_group=None,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )

    def _routing_from_hf(self, r: HfFields, c: dict[str, Any]) -> None:
        sf = r.get("scoring_func") or "softmax"
        r.refuse(sf != "softmax", f"scoring_func={sf!r}: the DeepSeek-V2 architecture scores with softmax")
        tm = r.get("topk_method") or "greedy"
        r.refuse(
            tm not in ("greedy", "group_limited_greedy"),
            f"topk_method={tm!r} is not supported for deepseek_v2 (greedy or group_limited_greedy)",
        )
        if r.raw("norm_topk_prob", bool):
            r.notices.append(
                "norm_topk_prob=true ignored: transformers 5.24's DeepSeek-V2 router never "
                "renormalises, and widemoe matches it"
            )
        mtp = r.raw("num_nextn_predict_layers", int, 0)
        r.refuse(mtp != 0, f"num_nextn_predict_layers={mtp}: DeepSeek-V2 has no MTP modules")
        r.seen("norm_topk_prob", "num_nextn_predict_layers")
        c.update(scoring_func="softmax", topk_method=tm, norm_topk_prob=False, rope_interleave=True)

    def _routing_to_hf(self, cfg: ModelConfig, need: Callable[[bool, str], None]) -> dict[str, Any]:
        need(cfg.scoring_func == "softmax", f"scoring_func={cfg.scoring_func!r} (DeepSeek-V2 is softmax)")
        need(cfg.topk_method in ("greedy", "group_limited_greedy"), f"topk_method={cfg.topk_method!r}")
        need(
            not cfg.norm_topk_prob,
            "norm_topk_prob=true (transformers' DeepSeek-V2 router never renormalises)",
        )
        need(cfg.rope_interleave, "rope_interleave=false (DeepSeek-V2 RoPE is interleaved)")
        need(cfg.num_nextn_predict_layers == 0, "num_nextn_predict_layers > 0 (DeepSeek-V2 has no MTP)")
        return dict(norm_topk_prob=False)


ADAPTERS: tuple[FamilyAdapter, ...] = (DeepSeekV3(), DeepSeekV2())

__all__ = ["ADAPTERS", "DeepSeekV2", "DeepSeekV3"]
