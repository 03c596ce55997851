#!/usr/bin/env python
"""Static merge speed: ``polymerge merge`` against mergekit and against an I/O floor.

What it does, in one run:

1. builds (once, cached in ``--workdir`` by size) a random Llama-architecture base model of about
   ``--params`` parameters in bfloat16 plus 4 experts (base + small random deltas), tensor by
   tensor so memory stays at a few tensors;
2. creates a virtual environment with mergekit from PyPI (``torch==2.13.0`` installed first so
   mergekit's ``torch>=2`` requirement never pulls another torch) unless ``--skip-mergekit``;
3. for each case (every deterministic method with ``dtype: bfloat16`` as users write it, a
   slices recipe, and float32 variants; ``--cases``) gives both tools the same recipe and
   times each as a subprocess under
   ``/usr/bin/time -v`` (wall, CPU, max RSS) while polling the process tree's anonymous and
   file-backed resident memory, alternating which tool goes first;
4. times an I/O floor: a process that reads every tensor of the 5 inputs once (positional reads
   into reused buffers, tensor by tensor across the inputs like a merge does) and writes a
   safetensors output of the merged size once;
5. compares the two outputs tensor by tensor (max |diff| in float32, fraction of elements that
   differ, largest distance in bf16 ulps);
6. prints a markdown table and writes it with machine, load, versions and the exact command to
   ``bench/results/merge_speed.md``.

When the page cache can be dropped (root: ``echo 3 > /proc/sys/vm/drop_caches``) every timing is
taken both cold (cache dropped before the run) and warm (inputs read into the cache first);
otherwise warm only, and the report says which. Outputs are not fsync'ed by any of the three
(neither tool does), so "write" means into the page cache.

Usage::

    python bench/merge_speed.py                      # 0.5 B parameters, every case
    python bench/merge_speed.py --params 0.05e9      # quick check
    python bench/merge_speed.py --device cuda        # math on the GPU (both tools)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
N_EXPERTS = 4
VOCAB = 32000
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "2.13.0"
METHODS = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp",
           "nuslerp", "multislerp", "karcher", "model_stock", "sce", "ram", "ramplus_tl",
           "arcee_fusion", "nearswap", "passthrough", "slices")
"""Every deterministic method of mergekit 0.1.5, and a slices recipe."""
SECTION = "## Static merge speed (bench/merge_speed.py)"
TARGET_VS_MERGEKIT = 0.25
TARGET_VS_FLOOR = {"linear": 2.0, "task_arithmetic": 2.0, "ties": 4.0}  # warm page cache
PARITY_MAX_ULP = 1.0
TIES_DENSITY = 0.3


# ---------------------------------------------------------------------------------------------
# I/O floor (runs in its own process; imports nothing heavy)


def _safetensors_layout(path: Path) -> tuple[bytes, int, list[tuple[str, int, int]]]:
    """Raw header bytes (length prefix included), data start, and (name, begin, end) per tensor."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
    header = json.loads(raw)
    data_start = 8 + length
    tensors = [(name, data_start + e["data_offsets"][0], data_start + e["data_offsets"][1])
               for name, e in header.items() if name != "__metadata__"]
    tensors.sort(key=lambda t: t[1])
    return struct.pack("<Q", length) + raw, data_start, tensors


def io_floor(out_dir: Path, inputs: list[Path]) -> None:
    """Read every tensor of every input once and write one output of the inputs' size once.

    Tensor by tensor, as a merge streams: for each tensor, one positional read from each input
    into a reused buffer, then one positional write of the first input's bytes at the tensor's
    offset in the output (whose header is written first). No math, no dtype conversion.
    """
    files = [p / "model.safetensors" if p.is_dir() else p for p in inputs]
    header, _, tensors = _safetensors_layout(files[0])
    fds = [os.open(f, os.O_RDONLY) for f in files]
    offsets = []
    for f in files:
        _, _, layout = _safetensors_layout(f)
        offsets.append({name: (b, e) for name, b, e in layout})
    out_dir.mkdir(parents=True, exist_ok=True)
    out = os.open(out_dir / "model.safetensors", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(out, header)
    biggest = max(e - b for _, b, e in tensors)
    buffers = [bytearray(biggest) for _ in files]
    views = [memoryview(b) for b in buffers]
    for name, out_begin, out_end in tensors:
        size = out_end - out_begin
        for fd, view, table in zip(fds, views, offsets, strict=True):
            begin, end = table[name]
            assert end - begin == size
            done = 0
            while done < size:
                got = os.preadv(fd, [view[done:size]], begin + done)
                if got <= 0:
                    raise SystemExit(f"io floor: short read in {name}")
                done += got
        done = 0
        while done < size:
            done += os.pwrite(out, views[0][done:size], out_begin + done)
    for fd in fds:
        os.close(fd)
    os.close(out)


# ---------------------------------------------------------------------------------------------
# Model files


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = VOCAB

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
            out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                    (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        total = 0
        for _, shape in self.shapes():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads, "head_dim": self.hidden // self.heads,
            "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        }


def arch_for(params: float) -> Arch:
    """A Llama shape near ``params`` parameters: hidden 1024 (intermediate 2816) from 0.25 B."""
    hidden = 1024 if params >= 0.25e9 else 512 if params >= 0.03e9 else 256
    intermediate = {1024: 2816, 512: 1408, 256: 704}[hidden]
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    fixed = 2 * VOCAB * hidden + hidden
    layers = max(1, round((params - fixed) / per_layer))
    return Arch(hidden, intermediate, layers, heads=hidden // 64)


def _write_prelaid(path: Path, shapes: list[tuple[str, tuple[int, ...]]]):
    """Open a bf16 safetensors file with its header written; return (file, offset per name)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    where = {}
    for name, shape in shapes:
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        where[name] = offset
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f = path.open("wb")
    f.write(struct.pack("<Q", len(raw)) + raw)
    start = 8 + len(raw)
    return f, {k: start + v for k, v in where.items()}


def models_dirname(params: float) -> str:
    """``models-0.5B``; no '+' (mergekit reads ``path+lora``) and no exponent."""
    return f"models-{params / 1e9:g}B"


def build_models(workdir: Path, params: float, seed: int = 0) -> tuple[Path, list[Path], Arch]:
    """Base + experts in ``workdir/models-<params>``, built once; returns (base, experts, arch)."""
    import torch

    arch = arch_for(params)
    root = workdir / models_dirname(params)
    names = ["base"] + [f"expert{i + 1}" for i in range(N_EXPERTS)]
    dirs = [root / n for n in names]
    stamp = root / "COMPLETE.json"
    meta = {"arch": asdict(arch), "seed": seed, "experts": N_EXPERTS}
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return dirs[0], dirs[1:], arch
    if root.exists():
        shutil.rmtree(root)
    print(f"building {len(dirs)} models of {arch.params / 1e9:.3f} B parameters "
          f"({arch.layers} layers, hidden {arch.hidden}) in {root} ...", flush=True)
    start = time.perf_counter()
    shapes = arch.shapes()
    files = []
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(arch.config(), indent=2) + "\n")
        files.append(_write_prelaid(d / "model.safetensors", shapes))
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        is_norm = len(shape) == 1
        if is_norm:
            base = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        else:
            base = 0.02 * torch.randn(shape, generator=gen)
        # Experts: base + a small delta (about 10% of the weights' spread, ~8 bf16 ulps).
        delta_std = 0.01 if is_norm else 0.002
        tensors = [base.to(torch.bfloat16)]
        tensors += [(base + delta_std * torch.randn(shape, generator=gen)).to(torch.bfloat16)
                    for _ in range(N_EXPERTS)]
        for (f, where), t in zip(files, tensors, strict=True):
            f.seek(where[name])
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    for f, _ in files:
        f.close()
    stamp.write_text(json.dumps(meta))
    print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    return dirs[0], dirs[1:], arch


# ---------------------------------------------------------------------------------------------
# mergekit environment


def mergekit_env(workdir: Path) -> Path:
    """A venv with mergekit from PyPI and torch==2.13.0 (installed first); returns its bin/."""
    venv = workdir / "mergekit-venv"
    bindir = venv / "bin"
    stamp = venv / "POLYMERGE_BENCH_OK"
    if stamp.exists() and (bindir / "mergekit-yaml").exists():
        return bindir
    print(f"creating {venv} (torch=={TORCH_PIN}, then mergekit=={MERGEKIT_VERSION}) ...",
          flush=True)
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(bindir / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={TORCH_PIN}"], check=True)
    subprocess.run(pip + [f"mergekit=={MERGEKIT_VERSION}"], check=True)
    torch_version = _venv_version(bindir, "torch")
    if not torch_version.startswith(TORCH_PIN):
        raise SystemExit(f"mergekit's install replaced torch {TORCH_PIN} with {torch_version}; "
                         f"remove {venv} and investigate")
    stamp.write_text(f"torch {torch_version}\nmergekit {_venv_version(bindir, 'mergekit')}\n")
    return bindir


def _venv_version(bindir: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([str(bindir / "python"), "-c", code], check=True,
                          capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------
# Recipes


DTYPES = {
    "bf16": {"dtype": "bfloat16"},  # what users write: mergekit computes in bf16
    "fp32>bf16": {"dtype": "float32", "out_dtype": "bfloat16"},  # float32 math, bf16 output
    "fp32": {"dtype": "float32"},  # float32 math and output
}
DEFAULT_CASES = [f"{m}@bf16" for m in METHODS] + [
    "linear@fp32>bf16", "task_arithmetic@fp32>bf16", "ties@fp32>bf16", "ties@fp32"]


def _models(paths: list[Path], **params: object) -> list[dict]:
    return [{"model": str(p), **({"parameters": dict(params)} if params else {})}
            for p in paths]


def recipe(case: str, base: Path, experts: list[Path]) -> dict:
    """One recipe both tools run: ``method@dtypes`` (see ``DTYPES``), mergekit's parameter
    names, the settings its documentation and examples use."""
    method, _, variant = case.partition("@")
    dtypes = DTYPES[variant or "bf16"]
    e1, e2 = experts[0], experts[1]
    with_base = {"base_model": str(base)}
    if method == "linear":
        weights = [0.4] + [0.15] * len(experts)
        body: dict = {"models": [{"model": str(m), "parameters": {"weight": w}}
                                 for m, w in zip([base, *experts], weights, strict=True)]}
    elif method == "task_arithmetic":
        weights = [1.0, 0.5, 0.75, 0.25][:len(experts)]
        body = {**with_base, "models": [{"model": str(m), "parameters": {"weight": w}}
                                        for m, w in zip(experts, weights, strict=True)],
                "parameters": {"lambda": 0.8}}
    elif method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        density = TIES_DENSITY if method == "ties" else 0.9
        body = {**with_base, "models": _models(experts, density=density, weight=1.0),
                "parameters": {"normalize": True}}
    elif method in ("slerp", "nearswap", "arcee_fusion"):
        params = {"slerp": {"t": 0.5}, "nearswap": {"t": 0.001}, "arcee_fusion": {}}[method]
        body = {**with_base, "models": _models([base, e1]), "parameters": params}
    elif method == "nuslerp":
        body = {"models": [{"model": str(e1), "parameters": {"weight": 0.6}},
                           {"model": str(e2), "parameters": {"weight": 0.4}}]}
    elif method in ("multislerp", "model_stock", "ram", "ramplus_tl"):
        params = {"multislerp": {"weight": 1.0}}.get(method, {})
        body = {**with_base, "models": _models(experts, **params)}
    elif method == "karcher":
        body = {"models": _models(experts)}
    elif method == "sce":
        body = {**with_base, "models": _models(experts, weight=1.0),
                "parameters": {"select_topk": 0.5}}
    elif method == "passthrough":
        body = {"models": _models([e1])}
    elif method == "slices":  # mergekit's gradient-slerp example: two models, layer by layer
        layers = [0, arch_layers(base)]
        return {"merge_method": "slerp", "base_model": str(base),
                "slices": [{"sources": [{"model": str(base), "layer_range": layers},
                                        {"model": str(e1), "layer_range": layers}]}],
                "parameters": {"t": [0, 0.5, 0.3, 0.7, 1]}, **dtypes}
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return {"merge_method": method, **body, **dtypes}


def arch_layers(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["num_hidden_layers"])


def write_recipe(path: Path, data: dict) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Measuring a subprocess


@dataclass
class Run:
    method: str
    tool: str
    cache: str
    wall_s: float
    cpu_s: float
    max_rss_gb: float  # /usr/bin/time -v: peak resident set (anonymous + file pages)
    peak_anon_gb: float  # polled: peak anonymous resident memory of the process tree
    load1: float
    order: int
    command: list[str] = field(default_factory=list)


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes summed over ``pid`` and its descendants."""
    import psutil

    anon = file_ = 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
                    elif line.startswith("RssFile:"):
                        file_ += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon, file_


def measure(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float, float]:
    """Run ``cmd`` under /usr/bin/time -v; return (wall s, cpu s, max RSS GB, peak anon GB)."""
    timefile = log.with_suffix(".time")
    full = ["/usr/bin/time", "-v", "-o", str(timefile)] + cmd
    peak_anon = 0
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env)
        stop = threading.Event()

        def poll() -> None:
            nonlocal peak_anon
            while not stop.is_set():
                peak_anon = max(peak_anon, _tree_memory(proc.pid)[0])
                stop.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rc = proc.wait()
        stop.set()
        poller.join()
    wall_outer = time.perf_counter() - start
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({rc}): {shlex.join(cmd)}\n{tail}")
    fields = {}
    for line in timefile.read_text().splitlines():
        key, _, value = line.strip().rpartition(": ")
        fields[key] = value
    wall = _parse_elapsed(fields.get("Elapsed (wall clock) time (h:mm:ss or m:ss)", ""))
    cpu = float(fields.get("User time (seconds)", 0)) + float(
        fields.get("System time (seconds)", 0))
    rss = int(fields.get("Maximum resident set size (kbytes)", 0)) * 1024 / 1e9
    return (wall if wall > 0 else wall_outer), cpu, rss, peak_anon / 1e9


def _parse_elapsed(text: str) -> float:
    if not text:
        return 0.0
    total = 0.0
    for part in text.split(":"):
        total = total * 60 + float(part)
    return total


def can_drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def warm_cache(paths: list[Path]) -> None:
    """Read every input file once so the next run finds it in the page cache."""
    buf = bytearray(16 << 20)
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with f.open("rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# ---------------------------------------------------------------------------------------------
# Comparing outputs


def _tensor_files(folder: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        _, _, layout = _safetensors_layout(f)
        for name, _, _ in layout:
            out[name] = f
    return out


def _bf16_ulps(x, y):  # torch tensors
    """|x - y| in bfloat16 ulps of the larger magnitude, the ulp floored at 2**-20 of the
    tensor's largest magnitude: float32 rounding noise around 0 (a sum that cancels to 0 in one
    tool and to 3e-11 in the other) is not a relative error of hundreds of ulps."""
    import torch

    big = torch.maximum(x.abs(), y.abs())
    _, exp = torch.frexp(big)  # big = m * 2**exp, m in [0.5, 1): one ulp is 2**(exp - 8)
    ulp = torch.ldexp(torch.ones_like(big), exp - 8)
    floor = float(big.max()) * 2.0**-20
    if floor == 0:
        return torch.zeros_like(big)
    return (x - y).abs() / ulp.clamp(min=floor)


def _ties_tie_mask(base, experts,  # torch tensors
                   density: float):
    """Where some expert's |delta| equals its own keep threshold (its k-th largest |delta|).

    Only there may two correct TIES implementations differ: which of the equal magnitudes at the
    threshold are kept is an arbitrary tie-break (mergekit uses an unstable argsort).
    """
    import torch

    mask = torch.zeros(base.shape, dtype=torch.bool)
    n = base.numel()
    k = max(1, int(density * n))
    if density >= 1 or n == 0:
        return mask
    for e in experts:
        mag = (e.float() - base.float()).abs().reshape(-1)
        threshold = torch.kthvalue(mag, n - k + 1).values
        mask |= (mag == threshold).reshape(base.shape)
    return mask


def compare(a: Path, b: Path, ties_inputs: tuple[Path, list[Path], float] | None = None) -> dict:
    """Compare two output folders tensor by tensor, in float32.

    Reports max |a-b|, the fraction of elements that differ and the largest difference in bf16
    ulps (of the larger magnitude). With ``ties_inputs`` (base, experts, density) it also reports
    the same outside the positions where TIES's top-k has a tie at its threshold.
    """
    import torch
    from safetensors import safe_open

    fa, fb = _tensor_files(a), _tensor_files(b)
    if set(fa) != set(fb):
        only = sorted(set(fa) ^ set(fb))
        return {"error": f"tensor names differ, e.g. {only[:3]}"}
    handles: dict[Path, object] = {}

    def get(path: Path, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)  # type: ignore[attr-defined]

    src = None
    if ties_inputs is not None:
        src = [_tensor_files(ties_inputs[0])] + [_tensor_files(e) for e in ties_inputs[1]]
    res = {"max_abs": 0.0, "max_ulp": 0.0, "differ": 0, "elements": 0, "worst_tensor": "",
           "dtypes": set()}
    if src is not None:
        res.update(untied_max_abs=0.0, untied_max_ulp=0.0, untied_differ=0, tie_positions=0)
    for name in sorted(fa):
        x, y = get(fa[name], name), get(fb[name], name)
        res["dtypes"].add(f"{x.dtype}/{y.dtype}".replace("torch.", ""))
        if x.shape != y.shape:
            return {"error": f"{name}: shapes {tuple(x.shape)} vs {tuple(y.shape)}"}
        if x.numel() == 0:
            continue
        xf, yf = x.float(), y.float()
        d = (xf - yf).abs()
        u = _bf16_ulps(xf, yf)
        m = float(d.max())
        if m > res["max_abs"]:
            res["max_abs"], res["worst_tensor"] = m, name
        res["max_ulp"] = max(res["max_ulp"], float(u.max()))
        res["differ"] += int((xf != yf).sum())
        res["elements"] += x.numel()
        if src is not None:
            tensors = [get(files[name], name) for files in src]
            tie = _ties_tie_mask(tensors[0], tensors[1:], ties_inputs[2])  # type: ignore[index]
            res["tie_positions"] += int(tie.sum())
            keep = ~tie
            if bool(keep.any()):
                res["untied_max_abs"] = max(res["untied_max_abs"], float(d[keep].max()))
                res["untied_max_ulp"] = max(res["untied_max_ulp"], float(u[keep].max()))
                res["untied_differ"] += int((d[keep] != 0).sum())
            del tensors, tie, keep
        del x, y, xf, yf, d, u
    res["frac_differ"] = res["differ"] / max(res["elements"], 1)
    res["dtypes"] = sorted(res["dtypes"])
    return res


# ---------------------------------------------------------------------------------------------
# Machine and versions


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_gb, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def versions(mergekit_bin: Path | None) -> dict:
    import safetensors
    import torch

    import polymerge

    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True).stdout.strip()
    out = {"polymerge": f"{getattr(polymerge, '__version__', '?')} (git {rev or '?'}"
                        f"{', src modified' if dirty else ''})",
           "torch": torch.__version__, "safetensors": safetensors.__version__}
    if mergekit_bin is not None:
        out["mergekit"] = _venv_version(mergekit_bin, "mergekit")
        out["torch (mergekit venv)"] = _venv_version(mergekit_bin, "torch")
    return out


# ---------------------------------------------------------------------------------------------
# Main


def polymerge_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "polymerge"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "polymerge.cli"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time `polymerge merge` against mergekit and an I/O floor on a random "
                    "Llama-architecture base + 4 experts (bfloat16).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", type=float, default=0.5e9,
                   help="model size in parameters (0.05e9 for a quick check)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / "_work",
                   help="models (cached by size), mergekit venv, recipes, outputs, logs")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help="comma-separated METHOD@DTYPES, DTYPES one of " + ", ".join(DTYPES)
                   + " (the recipe's dtype / out_dtype)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per tool, method and cache")
    p.add_argument("--device", default="cpu",
                   help="where the math runs; passed to polymerge --device and mergekit --device")
    p.add_argument("--cache", choices=("auto", "warm", "cold", "both"), default="auto",
                   help="page cache state: auto = cold and warm when caches can be dropped "
                        "(root), else warm")
    p.add_argument("--skip-mergekit", action="store_true",
                   help="time polymerge and the I/O floor only")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "merge_speed.md",
                   help="markdown file written with the results ('-' to not write one)")
    p.add_argument("--json", type=Path, default=None,
                   help="where the raw numbers go, after every case (default: "
                        "WORKDIR/last_run.json)")
    p.add_argument("--io-floor", nargs="+", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--render-from", type=Path, metavar="JSON",
                   help="re-render the report from a saved last_run.json, running nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.io_floor:
        out, *inputs = (Path(p) for p in args.io_floor)
        io_floor(out, inputs)
        return 0

    if args.render_from:
        return rerender(args)
    methods = [m.strip() for m in args.cases.split(",") if m.strip()]
    for m in methods:
        name, _, variant = m.partition("@")
        if name not in METHODS or (variant or "bf16") not in DTYPES:
            raise SystemExit(f"unknown case {m!r}: METHOD@DTYPES with METHOD one of "
                             f"{', '.join(METHODS)} and DTYPES one of {', '.join(DTYPES)}")
    if not Path("/usr/bin/time").exists():
        raise SystemExit("/usr/bin/time is missing: install it with `apt-get install time`")
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise SystemExit("psutil is missing: pip install psutil (polymerge[test])") from None

    workdir: Path = args.workdir.expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    args.json = args.json or workdir / "last_run.json"
    arch = arch_for(args.params)
    model_bytes = arch.params * 2
    models_root = workdir / models_dirname(args.params)
    have_models = (models_root / "COMPLETE.json").exists()
    need = model_bytes * ((0 if have_models else 1 + N_EXPERTS) + 3) + (1 << 30)
    free = shutil.disk_usage(workdir).free
    print(f"model: {arch.params / 1e9:.3f} B parameters, {model_bytes / 1e9:.2f} GB per file; "
          f"disk free at {workdir}: {free / 1e9:.1f} GB, needed about {need / 1e9:.1f} GB",
          flush=True)
    if free < need:
        raise SystemExit("not enough free disk; use a smaller --params or another --workdir")

    base, experts, arch = build_models(workdir, args.params)
    mk_bin = None if args.skip_mergekit else mergekit_env(workdir)

    if args.cache == "auto":
        caches = ["cold", "warm"] if can_drop_caches() else ["warm"]
    elif args.cache == "both":
        caches = ["cold", "warm"]
    else:
        caches = [args.cache]
    if "cold" in caches and not can_drop_caches():
        raise SystemExit("cannot drop the page cache here (needs root); use --cache warm")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    outs = workdir / "out"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    inputs = [base, *experts]

    def tool_cmd(tool: str, method: str) -> tuple[list[str], Path]:
        rec = workdir / "recipes" / f"{_file_name(method)}.yml"
        out = outs / tool
        if tool == "polymerge":
            return (polymerge_cmd() + ["merge", str(rec), "-o", str(out), "--force", "-q",
                                       "--device", args.device]), out
        if tool == "mergekit":
            assert mk_bin is not None
            return ([str(mk_bin / "mergekit-yaml"), str(rec), str(out), "--no-copy-tokenizer",
                     "--device", args.device, "--quiet"]), out
        return ([sys.executable, str(Path(__file__).resolve()), "--io-floor", str(out)]
                + [str(p) for p in inputs]), out

    runs: list[Run] = []
    parity: dict[str, dict] = {}
    order_counter = 0
    loads = [loadavg()]
    t_start = time.perf_counter()
    def save_run(elapsed: float) -> None:
        """The numbers so far (after every case: a long run stopped early keeps them)."""
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"runs": [asdict(r) for r in runs], "parity": parity, "loads": loads,
             "elapsed": elapsed, "caches": caches,
             "methods": list(dict.fromkeys(r.method for r in runs)),
             "argv": _argv_for_report(args), "date": _now()}, indent=1, default=str))

    for mi, method in enumerate(methods):
        write_recipe(workdir / "recipes" / f"{_file_name(method)}.yml",
                     recipe(method, base, experts))
        for r in range(args.repeat):
            pair = ["polymerge", "mergekit"] if mk_bin is not None else ["polymerge"]
            if (mi * args.repeat + r) % 2 == 1:
                pair.reverse()
            for cache in caches:
                for tool in ["io_floor", *pair]:
                    cmd, out = tool_cmd(tool, method)
                    if out.exists():
                        shutil.rmtree(out)
                    if cache == "cold":
                        drop_caches()
                    else:
                        subprocess.run(["sync"], check=True)
                        warm_cache(inputs)
                    load = loadavg()
                    loads.append(load)
                    log = logs / f"{_file_name(method)}-{tool}-{cache}-{r}.log"
                    wall, cpu, rss, anon = measure(cmd, env, log)
                    order_counter += 1
                    runs.append(Run(method, tool, cache, wall, cpu, rss, anon, load,
                                    order_counter, cmd))
                    print(f"  {method:16s} {tool:10s} {cache:4s} wall {wall:7.2f} s  cpu "
                          f"{cpu:7.2f} s  maxRSS {rss:5.2f} GB  anon {anon:5.2f} GB  "
                          f"load {load:.2f}", flush=True)
        if mk_bin is not None:
            ties_inputs = (base, experts, TIES_DENSITY) if method.startswith("ties@") else None
            parity[method] = compare(outs / "polymerge", outs / "mergekit", ties_inputs)
            print(f"  {method}: polymerge vs mergekit {parity[method]}", flush=True)
        save_run(time.perf_counter() - t_start)
    loads.append(loadavg())
    elapsed = time.perf_counter() - t_start
    save_run(elapsed)
    report = render(args, arch, caches, methods, runs, parity, loads, elapsed, mk_bin)
    print()
    print(report)
    if str(args.results) != "-":
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(report)
        print(f"wrote {args.results}")
    return 0


def rerender(args: argparse.Namespace, versions_note: str = "") -> int:
    """Write the report again from a saved ``last_run.json`` (same numbers, new layout)."""
    data = json.loads(args.render_from.read_text())
    runs = [Run(**r) for r in data["runs"]]
    if data.get("argv"):
        args = parse_args([*data["argv"], "--results", str(args.results)])
    methods = data.get("methods") or list(dict.fromkeys(r.method for r in runs))
    caches = data.get("caches") or list(dict.fromkeys(r.cache for r in runs))
    loads = data.get("loads") or [r.load1 for r in runs]
    workdir = args.workdir.expanduser().absolute()
    mk_bin = workdir / "mergekit-venv" / "bin"
    has_mk = any(r.tool == "mergekit" for r in runs)
    report = render(args, arch_for(args.params), caches, methods, runs, data["parity"], loads,
                    data.get("elapsed", float("nan")), mk_bin if has_mk else None,
                    date=data.get("date"), versions_note=versions_note)
    print(report)
    if str(args.results) != "-":
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(report)
        print(f"wrote {args.results}")
    return 0


def _file_name(case: str) -> str:
    return case.replace("@", "-").replace(">", "-to-")


def _now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(args: argparse.Namespace, arch: Arch, caches: list[str], methods: list[str],
           runs: list[Run], parity: dict[str, dict], loads: list[float], elapsed: float,
           mk_bin: Path | None, *, date: str | None = None,
           versions_note: str = "") -> str:
    def pick(method: str | None, tool: str, cache: str) -> list[Run]:
        return [r for r in runs if r.tool == tool and r.cache == cache
                and (method is None or r.method == method)]

    lines = [SECTION, ""]
    info = machine_info()
    cmd = "python bench/merge_speed.py " + shlex.join(_argv_for_report(args))
    lines += [
        f"- date: {date or _now()}",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
        f"Linux {info['kernel']}, Python {info['python']}; device `{args.device}`",
        f"- load average (1 min) at the runs' starts: min {min(loads):.2f}, "
        f"median {_median(loads):.2f}, max {max(loads):.2f} (shared machine)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions(mk_bin).items())
        + versions_note,
        f"- model: random Llama, {arch.params / 1e9:.3f} B parameters ({arch.layers} layers, "
        f"hidden {arch.hidden}, intermediate {arch.intermediate}, vocab {arch.vocab}), bfloat16, "
        f"{arch.params * 2 / 1e9:.2f} GB per file; base + {N_EXPERTS} experts "
        "(base + N(0, 0.002) deltas); 5 inputs read per merge",
        "- cases: METHOD@DTYPES; `bf16` is `dtype: bfloat16` (what users write: mergekit "
        "computes in bf16, polymerge in float32 and writes bf16), `fp32>bf16` is `dtype: "
        "float32, out_dtype: bfloat16`, `fp32` is `dtype: float32`. Recipes (bench/"
        "merge_speed.py `recipe()`): linear over the 5 models, weights 0.4/0.15/0.15/0.15/0.15; "
        "task_arithmetic weights 1/0.5/0.75/0.25, lambda 0.8; ties density "
        f"{TIES_DENSITY}, breadcrumbs(_ties) density 0.9, weight 1, normalize; slerp, nearswap "
        "(t 0.001) and arcee_fusion of base and expert 1; nuslerp of experts 1 and 2 (weights "
        "0.6/0.4); multislerp, model_stock, sce (select_topk 0.5), ram, ramplus_tl over base + 4 "
        "experts; karcher over the 4 experts; passthrough of expert 1; slices: mergekit's "
        "gradient-slerp example (base and expert 1, every layer, t 0/0.5/0.3/0.7/1)",
        "- page cache: " + (
            "cold (dropped with `echo 3 > /proc/sys/vm/drop_caches` before each run; on a VM "
            "the host may still cache the disk, so cold reads vary) and warm (inputs read into "
            "the cache before each run)" if "cold" in caches else
            "warm only (inputs read into the cache before each run)" if caches == ["warm"] else
            "cold only"),
        f"- {args.repeat} timed run(s) per tool, method and cache state, polymerge and mergekit "
        "alternating which goes first; medians shown. Wall, CPU (user+sys) and max RSS from "
        "`/usr/bin/time -v`; anon = peak anonymous resident memory of the process tree, polled "
        "every 50 ms (max RSS also counts page-cache pages mapped by mmap readers). Outputs are "
        "not fsync'ed (neither tool does).",
        "- I/O floor: one process reads every tensor of the 5 inputs once (positional reads into "
        "reused buffers, tensor by tensor) and writes a safetensors file of the output's size "
        "once; no math.",
        f"- command: `{cmd}` ({elapsed / 60:.1f} min)",
        "",
        "| method | tool | cache | wall s | CPU s | peak RSS GB | anon GB | vs mergekit "
        "(wall / RSS / anon) | vs I/O floor | max abs diff | elements differing | max ulp |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts: list[str] = []
    for cache in caches:
        floor_runs = pick(None, "io_floor", cache)
        floor = _median([r.wall_s for r in floor_runs])
        lines.append(f"| (all) | I/O floor | {cache} | {floor:.2f} | "
                     f"{_median([r.cpu_s for r in floor_runs]):.2f} | "
                     f"{max(r.max_rss_gb for r in floor_runs):.2f} | "
                     f"{max(r.peak_anon_gb for r in floor_runs):.2f} | | 1.00 | | | |")
        for method in methods:
            pm, mk = pick(method, "polymerge", cache), pick(method, "mergekit", cache)
            stats = {}
            for tool, rs in (("polymerge", pm), ("mergekit", mk)):
                if rs:
                    stats[tool] = (_median([r.wall_s for r in rs]), _median([r.cpu_s for r in rs]),
                                   max(r.max_rss_gb for r in rs), max(r.peak_anon_gb for r in rs))
            par = parity.get(method, {})
            for tool in ("polymerge", "mergekit"):
                if tool not in stats:
                    continue
                wall, cpu, rss, anon = stats[tool]
                spread = ""
                rs = pm if tool == "polymerge" else mk
                if len(rs) > 1:
                    spread = f" ({min(r.wall_s for r in rs):.2f}-{max(r.wall_s for r in rs):.2f})"
                vs_mk = ""
                if tool == "polymerge" and "mergekit" in stats:
                    vs_mk = (f"{wall / stats['mergekit'][0]:.2f}x / "
                             f"{rss / stats['mergekit'][2]:.2f}x / "
                             f"{anon / stats['mergekit'][3]:.2f}x")
                diff_cells = " |  | "
                if tool == "polymerge" and par:
                    if "error" in par:
                        diff_cells = f"{par['error']} | | "
                    else:
                        diff_cells = (f"{par['max_abs']:.3g} | {par['frac_differ']:.2e} | "
                                      f"{par['max_ulp']:.2f}")
                lines.append(f"| {method} | {tool} | {cache} | {wall:.2f}{spread} | {cpu:.2f} | "
                             f"{rss:.2f} | {anon:.2f} | {vs_mk} | {wall / floor:.2f} | "
                             f"{diff_cells} |")
            if "polymerge" in stats:
                wall, _, rss, anon = stats["polymerge"]
                checks = []
                if "mergekit" in stats:
                    mw, _, mr, ma = stats["mergekit"]
                    checks.append((f"wall <= {TARGET_VS_MERGEKIT:g}x mergekit",
                                   wall <= TARGET_VS_MERGEKIT * mw, f"{wall / mw:.2f}x"))
                    checks.append(("peak RSS <= mergekit", rss <= mr, f"{rss:.2f} vs {mr:.2f} GB"))
                    checks.append(("peak anonymous memory <= mergekit", anon <= ma,
                                   f"{anon:.2f} vs {ma:.2f} GB"))
                floor_target = TARGET_VS_FLOOR.get(method.partition("@")[0])
                if floor_target is not None and cache == "warm":
                    checks.append((f"wall <= {floor_target:g}x I/O floor",
                                   wall <= floor_target * floor, f"{wall / floor:.2f}x"))
                for name, ok, value in checks:
                    verdicts.append(f"- {method}, {cache}: {name}: "
                                    f"{'met' if ok else 'MISSED'} ({value})")
    for method in methods:
        par = parity.get(method)
        if par and "error" not in par:
            detail = (f"max |diff| {par['max_abs']:.3g}, {par['differ']} of {par['elements']} "
                      f"elements differ, max {par['max_ulp']:.2f} bf16 ulp, worst tensor "
                      f"`{par['worst_tensor'] or '-'}`")
            ok = par["max_ulp"] <= PARITY_MAX_ULP
            if "untied_max_ulp" in par:
                untied_ok = par["untied_max_ulp"] <= PARITY_MAX_ULP
                detail += (f"; outside the {par['tie_positions']} positions where some expert's "
                           f"|delta| equals its top-k threshold: max |diff| "
                           f"{par['untied_max_abs']:.3g}, {par['untied_differ']} differ, max "
                           f"{par['untied_max_ulp']:.2f} ulp")
                verdict = ("met" if ok else "met outside top-k threshold ties"
                           if untied_ok else "MISSED")
            else:
                verdict = "met" if ok else "MISSED"
            verdicts.append(f"- {method}: output agrees with mergekit to <= {PARITY_MAX_ULP:g} "
                            f"bf16 ulp: {verdict} ({detail})")
        elif par:
            verdicts.append(f"- {method}: output comparison failed: {par['error']}")
    lines += ["", "Targets:", "", *verdicts, ""]
    return "\n".join(lines)


def _argv_for_report(args: argparse.Namespace) -> list[str]:
    out = ["--params", f"{args.params / 1e9:g}e9", "--cases", args.cases, "--repeat",
           str(args.repeat), "--device", args.device]
    if args.cache != "auto":
        out += ["--cache", args.cache]
    if args.skip_mergekit:
        out.append("--skip-mergekit")
    return out


if __name__ == "__main__":
    sys.exit(main())
