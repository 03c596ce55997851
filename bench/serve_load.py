#!/usr/bin/env python
"""Load on ``polymerge serve``: throughput, latency, batch sizes, errors and memory of a store
served over loopback, against one request at a time, the plain base model, and N experts.

What it does, in one run (nothing is downloaded):

1. prepares (once, cached in ``--workdir``) two suites of experts and, for each, a twin store
   (task-arithmetic shared expert, lambda 0.3, rank 0.1 of every 2-D weight) and a channel store
   (TIES-CM, K = 2, density 0.7, lambda 0.5, every 2-D weight):

   * ``cls``: the zoo's real classification experts (6 MiniLM fine-tunes, built by ``polymerge
     zoo build cls`` under the zoo cache), routers trained on the suite's validation texts;
     requests are ``/v1/classify`` of the suite's test texts;
   * ``gen``: the zoo's gen suite (4 LoRA experts of the 30-layer model) is too slow for a
     load test on 2 cores; instead, the packaged SmolLM2-135M (converted from its GGUF, cut
     to ``--gen-layers`` layers, float32) and 4 synthetic experts (base + seeded deltas of 1%
     of each tensor's spread, two families), no router; requests are ``/v1/completions`` of
     ``--gen-tokens`` greedy tokens. Timing does not depend on what the experts learned;

2. for each suite and each target, starts ``polymerge serve`` on a free loopback port
   (``--threads 1``) and runs a closed-loop load generator with 1, 8, 32 and 64 clients
   (``--clients``), ``--seconds`` each after a warm-up, requests spread over the experts (each
   names an expert, round robin, so batches mix experts). Targets: the twin store, the channel
   store, (a) the same stores one request at a time (``--max-batch 1``), (b) the plain base model
   with the same batching (the ceiling);
3. reads per level: requests/s (and tokens/s), p50 and p99 latency, errors, rows per batch
   (mean and largest bucket, from the server's ``/metrics``), the server's resident memory
   after the level, and the paths the switching store took (switch or gather);
4. (c) memory: a fresh process loading the N experts side by side (each a plain checkpoint
   runtime, one forward pass each) against the store servers' resident memory;
5. in-process, one torch thread: the cost of one mixed batch of 32 rows over 4 experts (8 rows
   each, forced) against the plain model: a forward pass of 64 tokens per row (cls) and a
   generation of ``--gen-tokens`` tokens (gen), for the twin store (one-hot rows: the grouped
   path; and the router-like dense softmax weights) and the channel store (gathered and
   switched), with the cost rule's choice;
6. with ``--soak-seconds S``: one server (``--soak-suite``, ``--soak-store``) under
   ``--soak-clients`` closed-loop clients for S seconds, its resident memory sampled every
   ``--soak-interval`` seconds: start, end, min, max, peak (VmHWM) and the least-squares slope
   over the whole run and over its second half (flat: the second half grows by less than 1% of
   the resident memory);
7. writes a markdown report with the date, machine, load and exact command to
   ``bench/results/serve_load.md`` (``--out``).

Usage::

    python bench/serve_load.py                       # both suites, about 10 minutes
    python bench/serve_load.py --suites cls --seconds 4 --clients 1 32
    python bench/serve_load.py --suites --soak-seconds 600   # the 10-minute soak alone
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
ZOO = Path.home() / ".cache" / "polymerge" / "zoo"
TEXT_WORDS = 40
"""cls requests are the first 40 words of a test text (about 50-60 tokens)."""
PROMPT_WORDS = ("The history of", "In the morning we", "Write a short note about",
                "Once upon a time", "The best way to learn", "Here is a list of")


# ----------------------------------------------------------------------------- preparing


def recipe(method: str, base: Path, experts: list[Path], names: list[str],
           **params: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "name": n} for e, n in zip(experts, names,
                                                                   strict=True)],
            "parameters": params, "dtype": "float32", "seed": 0}


TWIN = {"shared_method": "task_arithmetic", "shared_lambda": 0.3, "rank": 0.1, "scope": "."}
CHANNEL = {"groups": 2, "group_method": "ties", "density": 0.7, "lambda": 0.5, "scope": "."}


def build_stores(base: Path, experts: list[Path], names: list[str], work: Path, tag: str
                 ) -> dict[str, Path]:
    import polymerge

    out = {}
    for kind, params in (("twin", TWIN), ("channel", CHANNEL)):
        path = work / f"{tag}-{kind}"
        if not (path / "polymerge_store.json").exists():
            print(f"building {path.name} ...", flush=True)
            polymerge.merge(recipe(kind, base, experts, names, **params), path, progress=False,
                            force=True)
        out[kind] = path
    return out


def cls_suite(work: Path, zoo: Path) -> dict[str, Any]:
    from polymerge.routing import LabelledTexts
    from polymerge.runtime import train_store_router

    folder = zoo / "cls"
    if not (folder / "base" / "config.json").exists():
        raise SystemExit(f"the cls zoo is not built at {folder}: run `polymerge zoo build cls`")
    experts = sorted(p for p in (folder / "experts").iterdir() if (p / "config.json").exists())
    names = [p.name for p in experts]
    texts: dict[str, list[str]] = {}
    train = LabelledTexts()
    for name in names:
        value = json.loads((folder / "data" / f"{name}.json").read_text())["value"]
        texts[name] = [" ".join(t.split()[:TEXT_WORDS]) for t, _ in value["test"]][:200]
        for t, _ in value["validation"][:150]:
            train.add(t, name)
    stores = build_stores(folder / "base", experts, names, work, "cls")
    for kind, path in stores.items():
        if not (path / "router" / "router.json").exists():
            print(f"training the router of {path.name} ...", flush=True)
            train_store_router(path, train, base=folder / "base" if kind == "channel" else None,
                               max_epochs=60, patience=10)
    return {"name": "cls", "base": folder / "base", "experts": experts, "names": names,
            "stores": stores, "texts": texts, "endpoint": "/v1/classify",
            "describe": f"the zoo's cls suite: {len(names)} MiniLM (all-MiniLM-L6-v2) "
                        f"classification experts ({', '.join(names)})"}


def gen_suite(work: Path, layers: int) -> dict[str, Any]:
    from channel_runtime import prepare_experts

    base = work / f"smollm2-{layers}l-base"
    if not (base / "config.json").exists():
        from polymerge.zoo.gen import convert_base

        tmp = base.with_name(base.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        print(f"converting SmolLM2-135M ({layers} layers) ...", flush=True)
        convert_base(tmp, layers=layers)
        tmp.rename(base)
    experts = prepare_experts(base, 4, work)
    names = [f"expert{i}" for i in range(4)]
    stores = build_stores(base, experts, names, work, f"gen{layers}")
    prompts = {n: [f"{PROMPT_WORDS[(i + j) % len(PROMPT_WORDS)]} {n}" for j in range(12)]
               for i, n in enumerate(names)}
    params = sum(v.numel() for v in _state(base).values())
    return {"name": "gen", "base": base, "experts": experts, "names": names, "stores": stores,
            "texts": prompts, "endpoint": "/v1/completions",
            "describe": f"SmolLM2-135M cut to {layers} layers ({params / 1e6:.1f}M parameters, "
                        "float32) and 4 synthetic experts (the zoo's gen suite, 4 LoRA experts "
                        "of the whole 30-layer model, is too slow for a load test on 2 "
                        "cores; timing does not depend on what the experts learned)"}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- servers


SERVER_DEVICE = "cpu"  # --device: where the servers run (the in-process tables stay on the CPU)


class Server:
    def __init__(self, target: Path, *args: str, base: Path | None = None) -> None:
        cmd = [sys.executable, "-m", "polymerge.cli", "serve", str(target), "--port", "0",
               "--threads", "1", "--max-queue", "4096", "--timeout", "300",
               "--device", SERVER_DEVICE, *args]
        if base is not None:
            cmd += ["--base", str(base)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if " at http://" not in line:
            raise SystemExit(f"server failed: {cmd}")
        self.url = line.strip().rsplit(" at ", 1)[1]
        import httpx

        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def rss(self) -> tuple[float, float]:
        """(resident, peak resident) MB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        get = {k: float(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024  # type: ignore
               for k in ("VmRSS", "VmHWM")}
        return get["VmRSS"], get["VmHWM"]

    def metrics(self) -> str:
        import httpx

        return httpx.get(self.url + "/metrics", timeout=30).text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def histogram(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf'{name}_bucket{{.*le="([^"]+)".*}} (\S+)', line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        m = re.match(rf"{name}_(sum|count){{.*}} (\S+)", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def counter(text: str, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf'{name}{{.*{label}="([^"]+)".*}} (\S+)', line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def load(server: Server, suite: dict[str, Any], clients: int, seconds: float,
         gen_tokens: int) -> dict[str, Any]:
    """A closed loop: ``clients`` threads, each sending its next request when the last one
    is answered, for ``seconds``."""
    import httpx

    names, texts = suite["names"], suite["texts"]
    served = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]]
    models = names if set(names) <= set(served) else [served[0]] * len(names)  # plain model
    lat: list[float] = []
    errors = [0]
    tokens = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    before = server.metrics()

    def client(k: int) -> None:
        with httpx.Client(timeout=300) as http:
            i = k
            while time.monotonic() < stop:
                name = names[i % len(names)]
                text = texts[name][(i // len(names)) % len(texts[name])]
                if suite["endpoint"] == "/v1/classify":
                    body: dict[str, Any] = {"model": models[i % len(names)], "input": text}
                else:
                    body = {"model": models[i % len(names)], "prompt": text,
                            "max_tokens": gen_tokens,
                            "temperature": 0}
                t0 = time.monotonic()
                r = http.post(server.url + suite["endpoint"], json=body)
                dt = time.monotonic() - t0
                with lock:
                    if r.status_code != 200:
                        errors[0] += 1
                    else:
                        lat.append(dt)
                        if "usage" in r.json():
                            tokens[0] += r.json()["usage"]["completion_tokens"]
                i += clients

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    after = server.metrics()
    h0, h1 = histogram(before, "polymerge_batch_rows"), histogram(after, "polymerge_batch_rows")
    batches = h1.get("count", 0) - h0.get("count", 0)
    rows = h1.get("sum", 0) - h0.get("sum", 0)
    le = sorted((float(k), h1[k] - h0.get(k, 0)) for k in h1
                if k not in ("sum", "count", "+Inf"))
    median_bucket = next((b for b, c in le if c >= batches / 2), 0)
    top_bucket = next((b for b, c in le if c >= batches), 0)
    p0, p1 = (counter(before, "polymerge_model_passes_total", "path"),
              counter(after, "polymerge_model_passes_total", "path"))
    paths = {k: int(v - p0.get(k, 0)) for k, v in p1.items() if v - p0.get(k, 0) > 0}
    rss, peak = server.rss()
    lat.sort()
    return {"clients": clients, "requests": len(lat), "errors": errors[0],
            "rps": len(lat) / wall, "tps": tokens[0] / wall,
            "p50": lat[len(lat) // 2] if lat else float("nan"),
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
            "rows_per_batch": rows / batches if batches else 0.0,
            "median_batch": median_bucket, "max_batch": top_bucket, "rss": rss, "peak": peak,
            "paths": paths}


def run_target(label: str, server: Server, suite: dict[str, Any], levels: list[int],
               seconds: float, gen_tokens: int) -> list[dict[str, Any]]:
    load(server, suite, 2, min(2.0, seconds), gen_tokens)  # warm-up
    rows = []
    for clients in levels:
        r = load(server, suite, clients, seconds, gen_tokens)
        r["target"] = label
        rows.append(r)
        print(f"  {label:28s} {clients:3d} clients: {r['rps']:7.1f} req/s, p50 "
              f"{r['p50'] * 1000:7.1f} ms, p99 {r['p99'] * 1000:7.1f} ms, rows/batch "
              f"{r['rows_per_batch']:5.1f}, errors {r['errors']}, RSS {r['rss']:.0f} MB "
              f"{r['paths'] or ''}", flush=True)
    return rows


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


def soak(server: Server, suite: dict[str, Any], clients: int, seconds: float, interval: float,
         gen_tokens: int) -> dict[str, Any]:
    """A closed loop of ``clients`` for ``seconds``, the server's RSS sampled every
    ``interval`` seconds."""
    load(server, suite, 2, 2.0, gen_tokens)  # warm-up
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    start = time.monotonic()

    def sample() -> None:
        while True:
            samples.append((time.monotonic() - start, server.rss()[0]))
            if done.wait(interval):
                return

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        r = load(server, suite, clients, seconds, gen_tokens)
    finally:
        done.set()
        sampler.join()
    samples.append((time.monotonic() - start, server.rss()[0]))
    half = [p for p in samples if p[0] >= samples[-1][0] / 2]
    values = [v for _, v in samples]
    second = _slope(half)
    growth = second * (half[-1][0] - half[0][0]) / 60.0
    r.update(samples=samples, rss_start=values[0], rss_end=values[-1], rss_min=min(values),
             rss_max=max(values), slope=_slope(samples), slope_second_half=second,
             growth_second_half=growth, flat=growth < 0.01 * statistics.mean(values),
             load_end=", ".join(f"{x:.1f}" for x in os.getloadavg()))
    return r


# ----------------------------------------------------------------------------- memory and cost


EXPERTS_RSS = """
import sys, resource, torch
torch.set_num_threads(1)
from polymerge.runtime import load_runtime
rts = [load_runtime(p) for p in sys.argv[1:]]
for rt in rts:
    rt(["hello world"], max_new_tokens=1) if rt.is_causal else rt(["hello world"])
status = open("/proc/self/status").read()
import re
print(int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1)) / 1024)
"""


def experts_rss(experts: list[Path]) -> float:
    out = subprocess.run([sys.executable, "-c", EXPERTS_RSS, *map(str, experts)],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    return float(out.stdout.strip().splitlines()[-1])


def _interleaved(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    """The median time of each run, the runs taken in turn ``repeats`` times after one warm-up
    round (on a shared machine a slow spell then hits every run alike, not one)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def batching_ceiling(suite: dict[str, Any], repeats: int, gen_tokens: int) -> dict[str, Any]:
    """What batching can give at most, in one process on one torch thread, no HTTP: the time
    to answer the 32 requests of one round of the load (the same texts and experts) one by one
    and as one batch (a forward batch cut by length as the server cuts it), for the plain
    model and both stores."""
    import polymerge
    from polymerge.runtime import load_runtime
    from polymerge.serve.engine import chunks

    torch.set_num_threads(1)
    names, texts = suite["names"], suite["texts"]
    reqs = [(names[i % len(names)], texts[names[i % len(names)]][(i // len(names))
                                                                % len(texts[names[0]])])
            for i in range(32)]
    rts = {"plain base model": load_runtime(suite["base"]),
           "twin store": polymerge.load_store(suite["stores"]["twin"]),
           "channel store": polymerge.load_store(suite["stores"]["channel"],
                                                 base=suite["base"])}
    runs: dict[str, Any] = {}
    for label, rt in rts.items():
        expert = (lambda e, rt=rt: rt.experts[0]) if label.startswith("plain") else \
            (lambda e: e)
        if suite["name"] == "cls":
            lengths = [len(rt.tokenizers.encode([t])["input_ids"][0]) for _, t in reqs]

            def single(rt: Any = rt, expert: Any = expert) -> None:
                for e, t in reqs:
                    rt.forward([t], expert(e), batch_size=1)

            def batched(rt: Any = rt, expert: Any = expert, lengths: list[int] = lengths
                        ) -> None:
                for part in chunks(lengths):
                    rt.forward([reqs[i][1] for i in part], [expert(reqs[i][0]) for i in part],
                               batch_size=len(part))
        else:
            def single(rt: Any = rt, expert: Any = expert) -> None:
                for e, t in reqs:
                    rt.generate([t], expert(e), batch_size=1, max_new_tokens=gen_tokens)

            def batched(rt: Any = rt, expert: Any = expert) -> None:
                rt.generate([t for _, t in reqs], [expert(e) for e, _ in reqs], batch_size=32,
                            max_new_tokens=gen_tokens)
        runs[f"{label}, one by one"] = single
        runs[f"{label}, one batch"] = batched
    return _interleaved(runs, repeats)


def mixed_batch_cost(suite: dict[str, Any], repeats: int, gen_tokens: int) -> dict[str, Any]:
    """One batch of 32 rows over 4 experts (8 rows each) against the plain base model."""
    import polymerge
    from polymerge.runtime import load_runtime

    torch.set_num_threads(1)
    names = suite["names"][:4]
    rows = [names[i % 4] for i in range(32)]
    plain = load_runtime(suite["base"])
    twin = polymerge.load_store(suite["stores"]["twin"])
    chan = polymerge.load_store(suite["stores"]["channel"], base=suite["base"])
    n = len(suite["names"])
    g = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(32, n, generator=g) * 2, -1)
    soft[:, 4:] = 0
    soft = soft / soft.sum(-1, keepdim=True)
    out: dict[str, Any] = {}
    if suite["name"] == "cls":
        vocab = plain.model.config.vocab_size
        ids = torch.randint(1000, vocab, (32, 64), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        runs = {
            "plain": lambda: plain.forward(batch),
            "twin, one expert per row": lambda: twin.forward(batch, rows),
            "twin, dense soft weights over 4": lambda: twin.forward(batch, soft),
            "channel, gathered": lambda: chan.forward(batch, rows, path="gather"),
            "channel, switched by expert": lambda: chan.forward(batch, rows, path="switch"),
        }
        w = chan.weights(rows, 32)
        out["rule"] = chan.choose_path(w, 64, 1, "auto")
        out["what"] = "a forward pass, 32 rows x 64 tokens"
    else:
        texts = [f"{PROMPT_WORDS[i % len(PROMPT_WORDS)]} {rows[i]}" for i in range(32)]
        kw = {"max_new_tokens": gen_tokens, "batch_size": 32}
        runs = {
            "plain": lambda: plain.generate(texts, **kw),
            "twin, one expert per row": lambda: twin.generate(texts, rows, **kw),
            "twin, dense soft weights over 4": lambda: twin.generate(texts, soft, **kw),
            "channel, gathered": lambda: chan.generate(texts, rows, path="gather", **kw),
            "channel, switched by expert": lambda: chan.generate(texts, rows, path="switch",
                                                                 **kw),
        }
        w = chan.weights(rows, 32)
        length = plain.tokenizers.encode(texts, left=True)["input_ids"].shape[1]
        out["rule"] = chan.choose_path(w, length + gen_tokens, 1 + gen_tokens, "auto")
        out["what"] = f"generating {gen_tokens} tokens for 32 rows (greedy, one call)"
    out["times"] = _interleaved(runs, repeats)
    return out


# ----------------------------------------------------------------------------- report


def machine() -> str:
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = ""
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else ""
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), load "
            f"average {load_avg}; Python {platform.python_version()}, torch {torch.__version__}")


def report(args: argparse.Namespace, results: list[dict[str, Any]], started: float,
           load_before: str) -> str:
    lines = ["<!-- serve_load -->", "## Serving: `polymerge serve` under load", "",
             f"{_dt.date.today().isoformat()}, {machine()} (load average at the start: "
             f"{load_before}). No GPU here: the CUDA run is not done.", "",
             f"Command: `{' '.join(['python', *map(shlex.quote, sys.argv)])}` "
             f"({time.monotonic() - started:.0f} s in all).", "",
             "Each server: `polymerge serve TARGET --threads 1` on loopback (the whole run "
             "under `nice -n 10` on a machine shared with other jobs), `--max-batch "
             f"{args.max_batch} --max-wait-ms {args.max_wait_ms:g}` unless it says one at a "
             "time (`--max-batch 1`); the load generator runs in another process on the same 2 "
             "cores (closed loop: each client sends its next request when the last is "
             f"answered), {args.seconds:g} s per level after a warm-up, requests naming the "
             "experts round robin. RSS is shown after each level"
             + (f"; the soak below runs one server for {args.soak_seconds:g} s."
                if args.soak_seconds > 0 else " (a short run, not a soak).")
             + " The model thread waits for the rows a batch answered to come back before "
             "starting a smaller batch (at most a quarter of a batch's time), and cuts a "
             "forward batch by length.", ""]
    for res in results:
        suite = res["suite"]
        lines += [f"### {suite['name']}: {suite['describe']}", ""]
        if suite["name"] == "gen":
            lines.append(f"Requests: `/v1/completions`, {args.gen_tokens} greedy tokens each.")
        else:
            lines.append("Requests: `/v1/classify`, the first 40 words of a test text of the "
                         "expert's task each.")
        lines += ["", "| target | clients | req/s | tokens/s | p50 | p99 | rows/batch (mean, "
                      "median, max) | errors | server RSS | paths |",
                  "| :-- | --: | --: | --: | --: | --: | :-- | --: | --: | :-- |"]
        for r in res["rows"]:
            tps = f"{r['tps']:.0f}" if r["tps"] else "–"
            paths = ", ".join(f"{k} {v}" for k, v in sorted(r["paths"].items()))
            lines.append(f"| {r['target']} | {r['clients']} | {r['rps']:.1f} | {tps} | "
                         f"{r['p50'] * 1000:.0f} ms | {r['p99'] * 1000:.0f} ms | "
                         f"{r['rows_per_batch']:.1f}, ≤{r['median_batch']:g}, "
                         f"≤{r['max_batch']:g} | {r['errors']} | {r['rss']:.0f} MB | "
                         f"{paths} |")
        lines.append("")
        by = {(r["target"], r["clients"]): r for r in res["rows"]}
        for kind in ("twin", "channel"):
            batched = by.get((f"{kind} store", 32))
            single = by.get((f"{kind} store, one at a time", 32))
            if batched and single and single["rps"]:
                ratio = batched["rps"] / single["rps"]
                lines.append(f"* {kind}: at 32 clients {ratio:.2f}x the throughput of one "
                             f"request at a time (target 4x: {'met' if ratio >= 4 else 'missed'}"
                             f"); errors {batched['errors']}.")
            plain = by.get(("plain base model", 32))
            if batched and plain and plain["rps"]:
                lines.append(f"* {kind}: at 32 clients {batched['rps'] / plain['rps']:.0%} of "
                             "the plain base model's throughput with the same batching.")
        rss = {t: max(r["rss"] for r in res["rows"] if r["target"] == t)
               for t in ("twin store", "channel store", "plain base model")
               if any(r["target"] == t for r in res["rows"])}
        drift = {t: (min(r["rss"] for r in res["rows"] if r["target"] == t),
                     max(r["rss"] for r in res["rows"] if r["target"] == t)) for t in rss}
        lines.append(f"* memory: {len(suite['names'])} experts loaded side by side (one process, "
                     f"a plain runtime each): {res['experts_rss']:.0f} MB; "
                     + "; ".join(f"{t} server {v:.0f} MB" for t, v in rss.items())
                     + ". RSS across the levels (min-max): "
                     + "; ".join(f"{t} {a:.0f}-{b:.0f} MB" for t, (a, b) in drift.items()) + ".")
        ceiling = res.get("ceiling")
        if ceiling:
            lines += ["", "What batching can give at most: the 32 requests of one round of the "
                          "load (the same inputs and experts) answered in one process on one "
                          "torch thread, no HTTP, one by one and as one batch (a forward batch "
                          f"cut by length as the server cuts it), median of {args.repeats}:",
                      "", "| target | one by one | one batch | ratio |",
                      "| :-- | --: | --: | --: |"]
            for label in ("plain base model", "twin store", "channel store"):
                one, batch = ceiling[f"{label}, one by one"], ceiling[f"{label}, one batch"]
                lines.append(f"| {label} | {one * 1000:.0f} ms | {batch * 1000:.0f} ms | "
                             f"{one / batch:.1f}x |")
        cost = res.get("cost")
        if cost:
            t = cost["times"]
            base = t["plain"]
            lines += ["", f"Mixed batch of 32 rows over 4 experts (8 rows each), {cost['what']}, "
                          "in one process on one torch thread, median of "
                          f"{args.repeats}:", "", "| path | time | vs plain |",
                      "| :-- | --: | --: |"]
            for k, v in t.items():
                lines.append(f"| {k} | {v * 1000:.0f} ms | {v / base:.2f}x |")
            lines += ["", f"The switching runtime's cost rule picks **{cost['rule']}** for this "
                          "batch.", ""]
            twin_ratio = t["twin, one expert per row"] / base
            chan_ratio = t["channel, gathered"] / base
            lines.append(f"* twin, one expert per row, <= 1.5x the plain model: "
                         f"{'met' if twin_ratio <= 1.5 else 'missed'} ({twin_ratio:.2f}x); with "
                         f"dense soft weights {t['twin, dense soft weights over 4'] / base:.2f}x.")
            lines.append(f"* channel K=2, gathered, <= 2x the plain model: "
                         f"{'met' if chan_ratio <= 2 else 'missed'} ({chan_ratio:.2f}x).")
        lines.append("")
    return "\n".join(lines) + "\n"


def soak_report(args: argparse.Namespace, r: dict[str, Any], suite: dict[str, Any],
                load_start: str) -> list[str]:
    kind = "generation" if suite["name"] == "gen" else "classification"
    lines = [f"### Soak: the {suite['name']} {args.soak_store} store under "
             f"{args.soak_clients} clients for {args.soak_seconds:g} s", "",
             f"`polymerge serve` as above (`--max-batch {args.max_batch} --max-wait-ms "
             f"{args.max_wait_ms:g} --threads 1`), {suite['describe']}, {kind} requests as "
             f"above; resident memory sampled every {args.soak_interval:g} s "
             f"({len(r['samples'])} samples); load average {load_start} at the start, "
             f"{r['load_end']} at the end.", "",
             "| requests | req/s | p50 | p99 | errors | RSS start | RSS end | RSS min-max | "
             "peak (VmHWM) | slope, whole run | slope, second half |",
             "| --: | --: | --: | --: | --: | --: | --: | :-- | --: | --: | --: |",
             f"| {r['requests']} | {r['rps']:.1f} | {r['p50'] * 1000:.0f} ms | "
             f"{r['p99'] * 1000:.0f} ms | {r['errors']} | {r['rss_start']:.0f} MB | "
             f"{r['rss_end']:.0f} MB | {r['rss_min']:.0f}-{r['rss_max']:.0f} MB | "
             f"{r['peak']:.0f} MB | {r['slope']:+.2f} MB/min | "
             f"{r['slope_second_half']:+.2f} MB/min |", "",
             "RSS over time (s: MB): " + ", ".join(
                 f"{t:.0f}: {v:.0f}" for t, v in r["samples"][::max(1, len(r["samples"]) // 20)])
             + ".", "",
             f"* RSS flat under a {args.soak_seconds / 60:.3g}-minute load (the second half grows "
             f"by less than 1% of the resident memory): {'met' if r['flat'] else 'missed'} "
             f"({r['growth_second_half']:+.1f} MB over the second half); errors "
             f"{r['errors']}.", ""]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", nargs="*", default=["gen", "cls"], choices=["gen", "cls"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--gen-layers", type=int, default=4)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--zoo", type=Path, default=ZOO)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work" / "serve")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.md"))
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--soak-seconds", type=float, default=0.0,
                   help="run one server this long under load, sampling its RSS (0: no soak)")
    p.add_argument("--soak-suite", default="cls", choices=["gen", "cls"])
    p.add_argument("--soak-store", default="channel", choices=["twin", "channel"])
    p.add_argument("--soak-clients", type=int, default=32)
    p.add_argument("--soak-interval", type=float, default=5.0)
    p.add_argument("--device", default="cpu",
                   help="device of every server started (`polymerge serve --device`), e.g. cuda")
    args = p.parse_args()
    global SERVER_DEVICE
    SERVER_DEVICE = args.device
    started = time.monotonic()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    for name in args.suites:
        suite = cls_suite(args.workdir, args.zoo) if name == "cls" else \
            gen_suite(args.workdir, args.gen_layers)
        print(f"{name}: {suite['describe']}", flush=True)
        batch = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        one = ["--max-batch", "1", "--max-wait-ms", "0"]
        chan_base = suite["base"] if name == "cls" else None
        targets = [("twin store", suite["stores"]["twin"], batch, None, args.clients),
                   ("twin store, one at a time", suite["stores"]["twin"], one, None,
                    [c for c in args.clients if c in (1, 32)]),
                   ("channel store", suite["stores"]["channel"], batch, chan_base, args.clients),
                   ("channel store, one at a time", suite["stores"]["channel"], one, chan_base,
                    [c for c in args.clients if c in (1, 32)]),
                   ("plain base model", suite["base"], batch, None, args.clients)]
        rows = []
        for label, target, flags, base, levels in targets:
            if not levels:
                continue
            server = Server(target, *flags, base=base)
            try:
                rows += run_target(label, server, suite, levels, args.seconds, args.gen_tokens)
            finally:
                server.stop()
        res: dict[str, Any] = {"suite": suite, "rows": rows,
                               "experts_rss": experts_rss(suite["experts"])}
        if not args.skip_cost:
            res["cost"] = mixed_batch_cost(suite, args.repeats, args.gen_tokens)
            print(f"  mixed batch: {res['cost']}", flush=True)
            res["ceiling"] = batching_ceiling(suite, args.repeats, args.gen_tokens)
            print(f"  batching ceiling: {res['ceiling']}", flush=True)
        results.append(res)
    text = report(args, results, started, load_before) if results else ""
    if args.soak_seconds > 0:
        name = args.soak_suite
        suite = cls_suite(args.workdir, args.zoo) if name == "cls" else \
            gen_suite(args.workdir, args.gen_layers)
        load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        server = Server(suite["stores"][args.soak_store], "--max-batch", str(args.max_batch),
                        "--max-wait-ms", str(args.max_wait_ms),
                        base=suite["base"] if name == "cls" and args.soak_store == "channel"
                        else None)
        try:
            r = soak(server, suite, args.soak_clients, args.soak_seconds, args.soak_interval,
                     args.gen_tokens)
        finally:
            server.stop()
        if not results:
            text = "\n".join([f"{_dt.date.today().isoformat()}, {machine()}.", "",
                              f"Command: `{' '.join(['python', *map(shlex.quote, sys.argv)])}`"
                              f" ({time.monotonic() - started:.0f} s in all).", ""]) + "\n"
        text += "\n".join(soak_report(args, r, suite, load_start)) + "\n"
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
