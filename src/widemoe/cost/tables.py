"""The tables of `widemoe cost`, rendered with rich from `summary()` dicts: one model (parameters,
FLOPs, memory, training and serving), models side by side with dense contrast rows, and the
published figures beside the computed ones. Nothing here computes; it formats what `summary` gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from widemoe.config import ModelConfig
from widemoe.cost.hardware import GPUS
from widemoe.cost.published import PUBLISHED, V3_TRAINING, check_published, v3_implied_mfu
from widemoe.cost.summary import Options
from widemoe.cost.units import fmt_bytes, fmt_count, fmt_flops

Row = tuple[str, ...]


def _table(title: str, rows: list[Row], header: Row = ("quantity", "value", "note")) -> Any:
    from rich.table import Table  # rich loads only when a table is drawn

    t = Table(title=title, title_justify="left", show_lines=False)
    for i, h in enumerate(header):
        text = i == 0 or h in ("note", "status", "quantity (convention)")
        # fold, not cut: a model name may be a long config path (on a narrow terminal it wraps)
        t.add_column(h, justify="left" if text else "right", overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


def render_one(console: Any, name: str, c: ModelConfig, s: dict[str, Any]) -> None:
    """The five tables of one model: components, parameter conventions, FLOPs, memory, training/serving."""
    console.print(_table(f"{name}: parameters by component", _component_rows(s["params"]),
                         ("component", "total", "active/token", "share")))
    console.print(_table(f"{name}: parameters", _param_rows(s["params"])))
    console.print(_table(f"{name}: FLOPs per token", _flops_rows(s["params"], s["flops_per_token"])))
    console.print(_table(f"{name}: memory", _memory_rows(c, s["memory"])))
    console.print(_table(f"{name}: training and serving", _training_rows(s["training"], s["serving"])))


def _component_rows(p: dict[str, Any]) -> list[Row]:
    total = p["total"] or 1
    rows = [
        (k.replace("_", " "), fmt_count(p["breakdown_total"][k]), fmt_count(p["breakdown_active"][k]),
         f"{p['breakdown_total'][k] / total:.1%}")
        for k in p["breakdown_total"]
    ]
    if p["mtp"]:
        rows.append(("MTP modules (apart)", fmt_count(p["mtp"]), "0 (dropped at inference)",
                     f"{p['mtp'] / total:.1%}"))
    return rows


def _param_rows(p: dict[str, Any]) -> list[Row]:
    rows = [
        ("total (main model)", fmt_count(p["total"]), "memory is sized by this"),
        ("active, with input embedding", fmt_count(p["active_with_embedding"]),
         "Qwen3, Mixtral, OLMoE publish this one"),
        ("active, without input embedding", fmt_count(p["active_without_embedding"]),
         "DeepSeek-V3 (37B, 36.7B), Kimi K2, V2-Lite publish this one"),
    ]
    if p["mtp"]:
        rows += [
            ("MTP modules (unique)", fmt_count(p["mtp"]), "embedding and head shared with the main model"),
            ("total with MTP", fmt_count(p["total_with_mtp"]), "= sum of numel of WideMoeForCausalLM"),
            ("+ redundant emb/head copies", fmt_count(p["mtp_redundant_copies_in_checkpoint"]),
             "stored per MTP layer in real DeepSeek checkpoints, shared in widemoe"),
        ]
    if p["buffers_fp32"]:
        rows.append(("fp32 router bias buffers", fmt_count(p["buffers_fp32"]),
                     "e_score_correction_bias, not parameters"))
    return rows


def _flops_rows(p: dict[str, Any], f: dict[str, Any]) -> list[Row]:
    return [
        ("forward, matmuls 2·N", fmt_flops(f["forward_matmul"]),
         f"N = {fmt_count(p['matmul_active'])} matmul weights"),
        (f"forward, attention at T={f['seq_len']}", fmt_flops(f["forward_attention"]),
         "causal mean context (T+1)/2"),
        ("forward", fmt_flops(f["forward"]), ""),
        ("training, 6·N", fmt_flops(f["train_6n"]), "the 6N rule"),
        ("training, attention", fmt_flops(f["train_attention"]), "grows with T"),
        ("training, MTP", fmt_flops(f["train_mtp"]), "MTP modules run in training"),
        ("training", fmt_flops(f["train"]), "3 x forward"),
    ]


def _memory_rows(c: ModelConfig, m: dict[str, Any]) -> list[Row]:
    quantised = "linear layers quantised, rest bf16, router fp32"
    rows = [(f"weights {d}", fmt_bytes(v), quantised if d in ("fp8", "fp4") else "")
            for d, v in m["weights"].items()]
    ratio = m["kv_uncompressed_elements_per_token_layer"] / m["kv_elements_per_token_layer"]
    kv_note = (f"MLA latent + rope; expanded K,V would be {ratio:.0f}x" if c.is_mla
               else "2 x kv_heads x head_dim")
    ctx = f"{m['context']:,}"
    rows += [
        ("KV elements / token / layer", str(m["kv_elements_per_token_layer"]), kv_note),
        (f"KV cache / token ({m['kv_dtype']})", fmt_bytes(m["kv_bytes_per_token"]),
         f"{c.num_hidden_layers} layers"),
        (f"KV cache at {ctx} x batch {m['batch']}", fmt_bytes(m["kv_bytes_at_context"]), ""),
    ]
    if m.get("deepseek_v3_kv_bytes_at_context"):
        rows.append((f"DeepSeek-V3 MLA cache at {ctx}", fmt_bytes(m["deepseek_v3_kv_bytes_at_context"]),
                     "for contrast"))
    t = m["training_per_gpu"]
    rows.append((f"AdamW training / GPU (dp={t['dp']} ep={t['ep']} pp={t['pp']} zero={t['zero']})",
                 fmt_bytes(t["total"]), "weights + grads + optimizer; activations not included"))
    return rows


def _training_rows(tr: dict[str, Any], sv: dict[str, Any]) -> list[Row]:
    rows = [
        (f"compute for {tr['tokens']:.3g} tokens", f"{tr['flops']:.3e} FLOP", f"seq_len {tr['seq_len']}"),
        (f"GPU-hours on {tr['gpu']} at MFU {tr['mfu']:.0%} ({tr['precision']})",
         f"{tr['gpu_hours']:,.0f}", ""),
    ]
    if "implied_mfu" in tr:
        rows.append((f"MFU implied by {tr['reported_gpu_hours']:,.0f} GPU-hours",
                     f"{tr['implied_mfu']:.1%}", f"of the {tr['precision']} peak"))
    setting = f"{sv['weight_dtype']} weights, {sv['context']:,} ctx x {sv['batch']}"
    rows += [
        (f"serving GPUs: {g} ({setting})", str(n), f"{GPUS[g.lower()].memory_gb:g} GB each, 90% usable")
        for g, n in sv["gpus"].items()
    ]
    return rows


Cell = Callable[[dict[str, Any]], str]
# label, the cell of a model's summary, the cell of a dense contrast row (None: "-")
COMPARE_ROWS: tuple[tuple[str, Cell, Cell | None], ...] = (
    ("total params", lambda s: fmt_count(s["params"]["total"]), lambda d: fmt_count(d["params"])),
    ("active (with emb)", lambda s: fmt_count(s["params"]["active_with_embedding"]),
     lambda d: fmt_count(d["params"])),
    ("active (without emb)", lambda s: fmt_count(s["params"]["active_without_embedding"]),
     lambda d: fmt_count(d["params"])),
    ("forward FLOP/token", lambda s: fmt_flops(s["flops_per_token"]["forward"]),
     lambda d: fmt_flops(d["forward_flops_per_token"])),
    ("training FLOP/token", lambda s: fmt_flops(s["flops_per_token"]["train"]),
     lambda d: fmt_flops(d["train_flops_per_token"])),
    ("weights bf16", lambda s: fmt_bytes(s["memory"]["weights"]["bf16"]),
     lambda d: fmt_bytes(d["weights"]["bf16"])),
    ("weights fp8", lambda s: fmt_bytes(s["memory"]["weights"]["fp8"]),
     lambda d: fmt_bytes(d["weights"]["fp8"])),
    ("KV / token", lambda s: fmt_bytes(s["memory"]["kv_bytes_per_token"]), None),
    ("KV at context", lambda s: fmt_bytes(s["memory"]["kv_bytes_at_context"]), None),
    ("GPU-hours for D tokens", lambda s: f"{s['training']['gpu_hours']:,.0f}",
     lambda d: f"{d['gpu_hours']:,.0f}"),
)


def render_compare(console: Any, names: list[str], sums: list[dict[str, Any]], dense: list[dict[str, Any]],
                   o: Options) -> None:
    """Models side by side (one column each), then the dense contrast columns."""
    header = ("quantity", *names, *(d["name"] for d in dense))
    rows: list[Row] = [
        (label, *(cell(s) for s in sums), *(dense_cell(d) if dense_cell else "-" for d in dense))
        for label, cell, dense_cell in COMPARE_ROWS
    ]
    for g in GPUS.values():
        rows.append((f"serving GPUs {g.name}", *(str(s["serving"]["gpus"][g.name]) for s in sums),
                     *("-" for _ in dense)))
    title = (
        f"context {o.context:,} x batch {o.batch}, D = {o.tokens:.3g} tokens on {o.gpu} at MFU {o.mfu:.0%}; "
        "dense rows: all parameters active"
    )
    console.print(_table(title, rows, header))


def render_published(console: Any) -> None:
    """Published vs computed for every figure in PUBLISHED, and the MFU DeepSeek-V3's GPU-hours imply."""
    rows = []
    for fig in PUBLISHED:
        r = check_published(fig)
        rows.append((r["model"], r["quantity"].replace("_", " "), r["published_text"],
                     fmt_count(r["computed"]), f"{r['deviation']:+.2%}", r["status"], r["note"] or "-"))
    header = ("model", "quantity (convention)", "published", "computed", "dev.", "status", "note")
    console.print(_table("published vs computed", rows, header))
    mfu, t = v3_implied_mfu(), V3_TRAINING
    console.print(
        f"DeepSeek-V3 training: {t['tokens']:.3g} tokens at seq {t['seq_len']} on H800: "
        f"{t['gpu_hours_total'] / 1e6:.3f}M GPU-hours imply MFU {mfu['total_bf16']:.1%} of the bf16 peak "
        f"({mfu['total_fp8']:.1%} of fp8); pre-training alone ({t['gpu_hours_pretraining'] / 1e6:.3f}M) "
        f"{mfu['pretraining_bf16']:.1%} ({mfu['pretraining_fp8']:.1%} of fp8)."
    )


__all__ = ["COMPARE_ROWS", "render_compare", "render_one", "render_published"]
