"""What a Hugging Face MoE checkpoint holds, without reading its weights (``widemoe inspect``).

Reads config.json and the safetensors headers (tensor data only to verify redundant copies such as
DeepSeek's MTP embed/head, in bounded chunks), then describes: the family, the routing and attention
setup, a layer table, dtypes and bytes on disk, MTP modules (where the family stores them),
quantisation, and anything odd: config notices (ignored remote code, unused fields) and the loader's
own accounting (`widemoe.hf.source.account_checkpoint`, the one function the loader and the converter
run) against the model built on ``meta``: missing / unexpected / mis-shaped tensors, differing copies.
"accounting OK" therefore means the directory loads. Parameter counts come from `widemoe.cost` in the
command.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from widemoe.config import ModelConfig
from widemoe.hf.errors import LoadError
from widemoe.hf.families.base import FamilyAdapter
from widemoe.hf.plan import model_targets, target_shapes
from widemoe.hf.source import CheckpointSource, account_checkpoint, open_checkpoint


def fmt_bytes(n: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Inspection:
    path: Path
    declared: ModelConfig  # as config.json says (MTP modules included)
    head: list[str] = field(default_factory=list)  # family, size, routing, positions
    body: list[str] = field(default_factory=list)  # weights, quantisation, MTP, layers, accounting, notes
    ok: bool = True  # the directory would load
    error: LoadError | None = None  # why not: the loader's own exception


def layer_rows(cfg: ModelConfig, adapter: FamilyAdapter) -> list[tuple[str, str, str]]:
    """(layer range, attention, feed-forward) rows, runs of equal layers merged, MTP modules last."""
    attn = adapter.attention_summary(cfg)
    moe = f"MoE {cfg.n_routed_experts}x{cfg.moe_intermediate_size} top-{cfg.num_experts_per_tok}" + (
        f" + {cfg.n_shared_experts} shared" if cfg.n_shared_experts else ""
    )
    dense = f"dense SwiGLU {cfg.intermediate_size}"
    kinds = [moe if cfg.is_moe_layer(i) else dense for i in range(cfg.num_hidden_layers)]
    rows, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            rng = str(start) if i - 1 == start else f"{start}-{i - 1}"
            rows.append((rng, attn, kinds[start]))
            start = i
    L = cfg.num_hidden_layers
    for k in range(cfg.num_nextn_predict_layers):
        rows.append((str(L + k), attn, f"MTP module {k}: {moe if cfg.moe_layer_indices else dense}"))
    return rows


def _head(src: CheckpointSource) -> list[str]:
    cfg, hf = src.declared, src.hf
    rope = f"theta {cfg.rope_theta:g}"
    if cfg.yarn:
        rope += f", YaRN x{cfg.yarn['factor']:g} from {cfg.yarn['original_max_position_embeddings']}"
    return [
        f"  family        {cfg.model_type} (model_type {hf.get('model_type')!r}, architectures "
        f"{hf.get('architectures')})",
        f"  size          vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads, tied embeddings: {cfg.tie_word_embeddings}",
        f"  routing       {cfg.scoring_func} / {cfg.topk_method}, groups {cfg.n_group}/{cfg.topk_group}, "
        f"norm_topk_prob {cfg.norm_topk_prob}, scale {cfg.routed_scaling_factor}",
        f"  positions     {rope}, max {cfg.max_position_embeddings}, "
        f"{'interleaved' if cfg.rope_interleave else 'rotate-half'} RoPE",
    ]


def _weights(src: CheckpointSource) -> list[str]:
    by_dtype: Counter[str] = Counter()
    bytes_dtype: Counter[str] = Counter()
    for info in src.table.values():
        name = str(info.dtype).replace("torch.", "")
        by_dtype[name] += 1
        bytes_dtype[name] += info.end - info.start
    total = fmt_bytes(sum(bytes_dtype.values()))
    out = [
        f"  weights       {len(src.files)} file(s), {len(src.table)} tensors, {total}: "
        + ", ".join(f"{k} {by_dtype[k]} ({fmt_bytes(bytes_dtype[k])})" for k in sorted(by_dtype))
    ]
    if src.fp8:
        n_scales = sum(src.adapter.is_scale_key(k) for k in src.table)
        ue8m0 = ", ue8m0 scales" if src.fp8.ue8m0 else ""
        out.append(
            f"  quantisation  fp8 e4m3, block {list(src.fp8.block)}{ue8m0}, "
            f"{n_scales} scale tensors (dequantised on load)"
        )
    cfg = src.declared
    if cfg.num_nextn_predict_layers:
        mtp = src.adapter.mtp_keys(list(src.table), cfg)
        state = f"{len(mtp)} tensors present" if mtp else "absent from the weights (loaded without MTP)"
        where = src.adapter.mtp_location(cfg)
        out.append(f"  MTP           {cfg.num_nextn_predict_layers} module(s) at {where}: {state}")
    return out


def inspect_checkpoint(path: str | Path) -> Inspection:
    """Describe the checkpoint directory ``path`` (raises what `open_checkpoint` raises)."""
    from widemoe.model.causal_lm import build_model  # the model layer, on meta: no weights

    src = open_checkpoint(path)
    insp = Inspection(src.path, src.declared, head=_head(src), body=_weights(src))
    insp.body.append("  layers")
    rows = layer_rows(src.declared, src.adapter)
    w = max(len(r[0]) for r in rows)
    insp.body += [f"    {rng:>{w}}  {attn:<12} {ffn}" for rng, attn, ffn in rows]
    odd = list(src.notices)  # the MTP line above already says when MTP weights are absent
    targets = target_shapes(model_targets(build_model(src.cfg, device="meta")))
    try:  # the loader's own accounting (copies verified too): inspect says OK exactly when it loads
        account_checkpoint(src, targets)
    except LoadError as e:
        insp.ok, insp.error = False, e
        odd.append(str(e))
    insp.body.append(
        "  accounting    "
        + (
            "OK: every tensor maps onto the model and every parameter is covered"
            if insp.ok
            else "FAILS: the directory would not load (see below)"
        )
    )
    insp.body += [f"  note          {n}" for n in odd]
    return insp


__all__ = ["Inspection", "fmt_bytes", "inspect_checkpoint", "layer_rows"]
