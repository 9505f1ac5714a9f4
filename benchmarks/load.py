"""Checkpoint loading: widemoe.hf.load_pretrained vs transformers' from_pretrained, side by side.

Builds a synthetic sharded DeepSeek-V3-style checkpoint of about 1 GB (bf16, and an FP8 variant with
128x128 block scales including partial edge blocks: kv_a_proj_with_mqa has 576 rows), then loads it
in fresh subprocesses, one loader per process, and reports wall time and peak RSS. Peak RSS is given
as the increase over the process's RSS after imports, relative to the loaded model's size (target
<= 1.3x), and raw. Writes JSON next to the printed table.

    .venv/bin/python benchmarks/load.py [--size-gb 1.0] [--out benchmarks/results/load.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _status_kb(field: str) -> int:
    """VmRSS (now) / VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that
    across execve, so a child would report its parent's peak when the parent was bigger."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def bench_config(size_gb: float):
    from widemoe.presets import get_preset

    # 8 layers of 32 experts x 512 wide at hidden 1024 ~ 0.5B params ~ 1 GB in bf16; layers scale the size.
    layers = max(2, round(8 * size_gb))
    return get_preset(
        "deepseek-v3",
        vocab_size=32000,
        hidden_size=1024,
        num_hidden_layers=layers,
        intermediate_size=2816,
        moe_intermediate_size=512,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        num_attention_heads=8,
        q_lora_rank=384,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        num_nextn_predict_layers=0,
        max_position_embeddings=8192,
        rope_scaling=None,
    )


def is_fp8_target(key: str, shape: tuple[int, ...]) -> bool:
    """DeepSeek's FP8 rule: every Linear except embed, head, router gate (and MTP eh_proj / copies)."""
    return len(shape) == 2 and not any(
        s in key for s in ("embed_tokens", "lm_head", "mlp.gate.", "eh_proj", "shared_head")
    )


def write_checkpoint(path: Path, cfg, fp8: bool, shard_bytes: int = 200 * 10**6) -> int:
    """Random weights under the HF on-disk names; returns the bytes of the loaded (bf16) model."""
    from widemoe.hf import adapter_for_config, model_config_to_hf
    from widemoe.hf.fp8 import quantize
    from widemoe.hf.plan import model_targets
    from widemoe.hf.safetensors_io import Pending, write_safetensors
    from widemoe.model.causal_lm import build_model

    meta = build_model(cfg, device="meta")
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    model_bytes = 0
    pending: list[tuple[str, tuple[int, ...], bool]] = []
    adapter = adapter_for_config(cfg)
    for name, t in model_targets(meta).items():
        router = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        model_bytes += t.numel() * (4 if router else 2)
        for key, slot in adapter.target_keys(name, tuple(t.shape), cfg):
            pending.append((key, slot.shape(tuple(t.shape)), router))
    names: list[tuple[str, int]] = []
    index: dict[str, str] = {}
    total = 0

    def flush(final: bool = False) -> None:
        nonlocal shards, size
        if shards[-1]:
            name = f"part-{len(names) + 1:05d}.safetensors"
            write_safetensors(path / name, [Pending.of(k, t) for k, t in shards[-1]], {"format": "pt"})
            names.append((name, len(shards[-1])))
            index.update({k: name for k, _ in shards[-1]})
        shards = [[]]
        size = 0

    for key, shape, router in pending:
        dt = torch.float32 if router else torch.bfloat16
        w = (torch.randn(shape, generator=g) * 0.02).to(dt)
        items = [(key, w)]
        if fp8 and not router and is_fp8_target(key, shape):
            w_q, s = quantize(w, (128, 128))
            items = [(key, w_q), (key + "_scale_inv", s)]
        for k, t in items:
            n = t.numel() * t.element_size()
            if size + n > shard_bytes:
                flush()
            shards[-1].append((k, t))
            size += n
            total += n
    flush(final=True)
    N = len(names)
    renamed = {}
    for i, (name, _) in enumerate(names, 1):
        final = f"model-{i:05d}-of-{N:05d}.safetensors"
        os.replace(path / name, path / final)
        renamed[name] = final
    wm = {k: renamed[v] for k, v in sorted(index.items())}
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm})
    )
    conf = model_config_to_hf(cfg, dtype="bfloat16")
    if fp8:
        conf["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    (path / "config.json").write_text(json.dumps(conf, indent=1))
    return model_bytes


def child(loader: str, path: str) -> None:
    """Runs in a fresh process: import, record RSS, load, record peak RSS and time, print JSON."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if loader == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
    elif loader == "convert":
        from widemoe.hf import convert_checkpoint
    else:
        from widemoe.hf import load_pretrained
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if loader == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif loader == "convert":  # streaming FP8/bf16 -> bf16 directory conversion; holds no model
        with tempfile.TemporaryDirectory() as out:
            convert_checkpoint(Path(path), Path(out), "bf16", max_shard_size="200MB")
        model = None
    else:
        model = load_pretrained(path, dtype=torch.bfloat16)
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0
    print(json.dumps({"seconds": dt, "base_rss_kb": base, "peak_rss_kb": peak, "model_bytes": nbytes}))


def run_child(loader: str, path: Path) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, "--child", loader, str(path)], capture_output=True, text=True
    )
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load.json")
    ap.add_argument("--keep", type=Path, default=None, help="build the checkpoints here and keep them")
    ap.add_argument("--repeat", type=int, default=2, help="loads per loader (best time, max RSS reported)")
    ap.add_argument("--child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="widemoe-load-"))
    cfg = bench_config(args.size_gb)
    results = {}
    try:
        for variant in ("bf16", "fp8"):
            d = root / variant
            t0 = time.perf_counter()
            model_bytes = write_checkpoint(d, cfg, fp8=variant == "fp8")
            ck = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            print(
                f"[{variant}] wrote {ck / 1e9:.2f} GB in {len(list(d.glob('*.safetensors')))} shards "
                f"({time.perf_counter() - t0:.0f}s); loaded model {model_bytes / 1e9:.2f} GB",
                flush=True,
            )
            row = {"checkpoint_bytes": ck, "model_bytes": model_bytes}
            for loader in ("widemoe", "transformers", "convert"):
                runs = [run_child(loader, d) for _ in range(args.repeat)]
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    row[loader] = runs[0]
                    print(f"  {loader:<13} error: {runs[0]['error']}", flush=True)
                    continue
                best = min(r["seconds"] for r in ok)
                peak = max(r["peak_rss_kb"] for r in ok) * 1024
                delta = max(r["peak_rss_kb"] - r["base_rss_kb"] for r in ok) * 1024
                row[loader] = {
                    "seconds": best,
                    "peak_rss_bytes": peak,
                    "rss_increase_bytes": delta,
                    "rss_increase_over_model": delta / model_bytes,
                }
                print(
                    f"  {loader:<13} {best:6.2f} s   peak RSS {peak / 1e9:5.2f} GB   increase over imports "
                    f"{delta / 1e9:5.2f} GB = {delta / model_bytes:4.2f}x model",
                    flush=True,
                )
            if "seconds" in row.get("transformers", {}) and "seconds" in row.get("widemoe", {}):
                row["speedup_vs_transformers"] = row["transformers"]["seconds"] / row["widemoe"]["seconds"]
                print(f"  widemoe is {row['speedup_vs_transformers']:.2f}x transformers' speed", flush=True)
            results[variant] = row
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    args.out.write_text(
        json.dumps({"config": cfg.to_dict(), "results": results}, indent=2, default=str) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
