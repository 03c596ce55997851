"""Property-based tests (hypothesis): random and mutated safetensors headers, shard indexes,
adapter configs, regex keys and recipes fed to the readers. The only outcomes allowed are a
correct result or a one-line PolymergeError: never another exception, never a hang (each case
runs under an alarm), never a byte read from outside the model folder. Examples are derandomized
and few, so the file stays fast and reproducible."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import string
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from polymerge.errors import PolymergeError
from polymerge.io.checkpoint import open_checkpoint
from polymerge.io.dtypes import SAFETENSORS_TO_TORCH
from polymerge.io.patterns import PatternError, compile_safe
from polymerge.recipe import load_recipe, resolve_value

pytestmark = pytest.mark.filterwarnings("ignore")

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMIT_S = 5.0


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float = LIMIT_S) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"a single case took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(fn: Callable[[], Any]) -> Any:
    """fn's result, or the PolymergeError it raised (one line); anything else fails."""
    with time_limit():
        try:
            return fn()
        except PolymergeError as exc:
            assert "\n" not in str(exc), str(exc)
            return exc


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=12)


def read_all(path: Path, **kw: Any) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path, **kw)
    try:
        return {name: ckpt.read(name) for name in ckpt.tensors()}
    finally:
        ckpt.close()


# --------------------------------------------------------------------------- safetensors

DTYPES = sorted(SAFETENSORS_TO_TORCH)
small_state = st.dictionaries(
    st.text(string.ascii_lowercase + "._", min_size=1, max_size=8),
    st.tuples(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL"]),
              st.lists(st.integers(0, 3), max_size=3)),
    min_size=1, max_size=3)


def build_state(spec: dict[str, tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, (code, shape)) in enumerate(sorted(spec.items())):
        dtype = SAFETENSORS_TO_TORCH[code]
        values = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) + i
        out[name] = values.to(dtype)
    return out


def header_of(raw: bytes) -> dict:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def with_header(raw: bytes, header: Any) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


mutation = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
              json_values),
    st.tuples(st.just("offset"), st.integers(0, 1), st.integers(-64, 64)),
    st.tuples(st.just("drop"), st.sampled_from(["dtype", "shape", "data_offsets"]), st.none()),
    st.tuples(st.just("entry"), st.none(), json_values),
    st.tuples(st.just("metadata"), st.none(), json_values),
    st.tuples(st.just("whole"), st.none(), json_values),
)


def apply(header: dict, name: str, change: tuple) -> Any:
    kind, key, value = change
    header = json.loads(json.dumps(header))
    if kind == "field":
        header[name][key] = value
    elif kind == "offset":
        offsets = header[name]["data_offsets"]
        offsets[key] += value
    elif kind == "drop":
        header[name].pop(key, None)
    elif kind == "entry":
        header[name] = value
    elif kind == "metadata":
        header["__metadata__"] = value
    else:
        return value
    return header


def library_reads(path: Path) -> dict[str, torch.Tensor] | None:
    """What the safetensors library itself makes of the file (None: it refuses it)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception:
        return None


def check_against_library(path: Path, got: Any) -> None:
    reference = library_reads(path)
    if reference is None or any(t.dtype not in SAFETENSORS_TO_TORCH.values()
                                for t in reference.values()):
        return
    # a file safetensors reads is read by polymerge too, to the same values
    assert isinstance(got, dict), f"safetensors reads it, polymerge said: {got}"
    assert sorted(got) == sorted(reference)
    for name, tensor in reference.items():
        assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8),
                           tensor.reshape(-1).view(torch.uint8)), name


@FUZZ
@given(spec=small_state, changes=st.lists(mutation, min_size=1, max_size=3),
       pick=st.integers(0, 10))
def test_mutated_headers(spec, changes, pick):
    with scratch() as root:
        path = root / "m.safetensors"
        save_file(build_state(spec), path)
        raw = path.read_bytes()
        header = header_of(raw)
        names = sorted(k for k in header if k != "__metadata__")
        name = names[pick % len(names)]
        for change in changes:
            try:
                header = apply(header, name, change)
            except (TypeError, KeyError, AttributeError, IndexError):
                break  # an earlier change made this one meaningless
        try:
            path.write_bytes(with_header(raw, header))
        except (TypeError, ValueError):  # NaN keys and the like that JSON cannot write
            return
        got = outcome(lambda: read_all(path))
        check_against_library(path, got)


@FUZZ
@given(spec=small_state, edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                        max_size=6),
       cut=st.none() | st.integers(0, 10**6), length=st.none() | st.integers(0, 2**64 - 1))
def test_corrupted_bytes(spec, edits, cut, length):
    with scratch() as root:
        path = root / "m.safetensors"
        save_file(build_state(spec), path)
        raw = bytearray(path.read_bytes())
        for where, byte in edits:
            raw[where % len(raw)] = byte
        if length is not None:
            raw[:8] = struct.pack("<Q", length)
        if cut is not None:
            raw = raw[:cut % (len(raw) + 1)]
        path.write_bytes(bytes(raw))
        got = outcome(lambda: read_all(path))
        check_against_library(path, got)


@FUZZ
@given(header=json_values)
def test_random_headers(header):
    with scratch() as root:
        path = root / "m.safetensors"
        try:
            text = json.dumps(header).encode()
        except ValueError:
            return
        path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(64))
        outcome(lambda: read_all(path))


# --------------------------------------------------------------------------- shard indexes

SHARD_NAMES = ["s1.safetensors", "../other/model.safetensors", "/etc/passwd", "pipe", "out",
               "in", "d", "", ".", "..", "s1.safetensors/", "nope", "d/../s1.safetensors",
               "dl/../other/model.safetensors", "./s1.safetensors", "s1.safetensors\x00x"]


def index_folder(root: Path) -> Path:
    other = root / "other"
    other.mkdir()
    save_file({"a": torch.full((2,), 7.0), "b": torch.full((3,), 7.0)},
              other / "model.safetensors")
    folder = root / "m"
    folder.mkdir()
    save_file({"a": torch.ones(2), "b": torch.arange(3.0)}, folder / "s1.safetensors")
    os.mkfifo(folder / "pipe")
    (folder / "out").symlink_to(other / "model.safetensors")
    (folder / "in").symlink_to("s1.safetensors")
    (folder / "d").mkdir()
    (folder / "dl").symlink_to(other)
    return folder


@FUZZ
@given(weight_map=st.dictionaries(st.sampled_from(["a", "b", "c"]) | st.text(max_size=4),
                                  st.sampled_from(SHARD_NAMES) | json_values, max_size=4),
       whole=st.none() | json_values)
def test_random_indexes(weight_map, whole):
    with scratch() as root:
        folder = index_folder(root)
        index = {"weight_map": weight_map} if whole is None else whole
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        before = snapshot(root)
        got = outcome(lambda: read_all(folder))
        if isinstance(got, dict):
            for name, tensor in got.items():
                assert not bool((tensor == 7.0).any()), f"{name} was read from outside"
        assert snapshot(root) == before


# --------------------------------------------------------------------------- adapters

BASE_NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
              "model.layers.1.self_attn.q_proj.weight"]
pattern_text = st.text(alphabet="qv_proj.layers01()[]{}|*+?^$\\d,-", max_size=12)
adapter_config = st.fixed_dictionaries({
    "r": st.sampled_from([2, 2, 2, 0, -1, 4, True, "2", 2.0, None]) | json_values,
}, optional={
    "lora_alpha": st.sampled_from([4, 0, -3, 1e308, float("nan"), "x"]) | json_values,
    "use_rslora": st.booleans() | json_values,
    "fan_in_fan_out": st.booleans() | json_values,
    "rank_pattern": st.dictionaries(pattern_text, st.sampled_from([2, 4, 0]) | json_values,
                                    max_size=3) | json_values,
    "alpha_pattern": st.dictionaries(pattern_text, st.sampled_from([2, 8.5]) | json_values,
                                     max_size=3) | json_values,
})


def adapter_pair(root: Path) -> tuple[Path, Path]:
    base = root / "base"
    base.mkdir()
    save_file({n: torch.eye(4) for n in BASE_NAMES}, base / "model.safetensors")
    adapter = root / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    weights = {}
    for n in BASE_NAMES[:2]:
        module = "base_model.model." + n.removesuffix(".weight")
        weights[f"{module}.lora_A.weight"] = torch.randn(2, 4, generator=g)
        weights[f"{module}.lora_B.weight"] = torch.randn(4, 2, generator=g)
    save_file(weights, adapter / "adapter_model.safetensors")
    return base, adapter


@FUZZ
@given(config=adapter_config | json_values)
def test_random_adapter_configs(config):
    with scratch() as root:
        base_path, adapter = adapter_pair(root)
        try:
            (adapter / "adapter_config.json").write_text(json.dumps(config))
        except ValueError:
            return
        base = open_checkpoint(base_path)
        got = outcome(lambda: read_all(adapter, base=base))
        if isinstance(got, dict):
            assert sorted(got) == sorted(BASE_NAMES)
            assert torch.equal(got[BASE_NAMES[2]], torch.eye(4))  # not covered: the base


# --------------------------------------------------------------------------- regex keys

atoms = st.sampled_from(["a", "b", ".", "\\.", "[ab]", "[^.]", "\\d", "\\w", "x", "q_"])


@st.composite
def safe_regex(draw: Any, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        if depth < 2 and draw(st.booleans()):
            inner = [draw(safe_regex(depth + 1)) for _ in range(draw(st.integers(1, 2)))]
            atom = "(" + "|".join(inner) + ")"
        else:
            atom = draw(atoms)
        atom += draw(st.sampled_from(["", "", "*", "+", "?", "{1,2}", "{2}", "{,1}"]))
        parts.append(atom)
    anchors = draw(st.sampled_from([("", ""), ("^", ""), ("", "$"), ("^", "$")]))
    return anchors[0] + "".join(parts) + anchors[1]


names = st.text(alphabet="ab.xq_1", max_size=10)


@FUZZ
@given(key=safe_regex(), module=names)
def test_pattern_keys_agree_with_python_re(key, module):
    pattern = compile_safe(key)
    with time_limit():
        assert pattern.match_module(module) == bool(re.match(rf"(.*\.)?({key})$", module))
        assert pattern.search(module) == bool(re.search(key, module))


@FUZZ
@given(key=st.text(alphabet="ab.()[]{}|*+?^$\\dw,-0123:P<>=!", max_size=14),
       module=st.text(alphabet="ab.\n1", max_size=8))
def test_arbitrary_pattern_keys(key, module):
    """Any text: refused with PatternError, or matched exactly as Python's re would."""
    with time_limit():
        try:
            pattern = compile_safe(key)
        except PatternError:
            return
        try:
            want = re.match(rf"(.*\.)?({key})$", module)
        except re.error:
            return  # re refuses what we accept: PEFT would fail on it; we just match
        assert pattern.match_module(module) == bool(want), (key, module)


def test_catastrophic_keys_are_linear():
    with time_limit(10):
        for key in ["(a+)+$", "(a|a)*b", "(.*.*)*x", "((a*)*)*b", "(a?){30}a{30}"]:
            assert not compile_safe(key).match_module("a" * 3000 + "!")


# --------------------------------------------------------------------------- recipes

recipe_values = st.recursive(
    json_scalars | st.sampled_from(["linear", "ties", "task_arithmetic", "/x/a", "base", "mlp",
                                    "[", "(a+)+$", "bfloat16"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["model", "filter", "value", "weight", "parameters", "name", "x"])
        | st.text(max_size=4), inner, max_size=3),
    max_leaves=10)
RECIPE_PATHS = [("merge_method",), ("base_model",), ("models",), ("models", 0),
                ("models", 0, "model"), ("models", 0, "name"), ("models", 0, "parameters"),
                ("models", 0, "parameters", "weight"), ("models", 1, "parameters", "weight", 0),
                ("models", 1, "parameters", "weight", 0, "filter"),
                ("models", 1, "parameters", "weight", 0, "value"), ("parameters",),
                ("parameters", "density"), ("dtype",), ("seed",), ("tokenizer_source",),
                ("slices",), ("x",), ("models", 0, "x")]


def valid_recipe() -> dict:
    return {"merge_method": "ties", "base_model": "/x/base",
            "models": [{"model": "/x/a", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}},
                       {"model": "/x/b", "name": "bee",
                        "parameters": {"weight": [{"filter": "mlp", "value": 1.0},
                                                  {"filter": "layers\\.[0-9]", "value": 2},
                                                  {"value": 0.5}]}}],
            "parameters": {"normalize": True}, "seed": 3, "dtype": "bfloat16"}


def put(data: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(RECIPE_PATHS), recipe_values), max_size=3))
def test_mutated_recipes(changes):
    data = valid_recipe()
    for path, value in changes:
        try:
            put(data, path, value)
        except (TypeError, KeyError, IndexError):
            break
    got = outcome(lambda: load_recipe(data))
    if not isinstance(got, PolymergeError):
        for entry in [*got.models, got]:
            for value in entry.parameters.values():
                outcome(lambda v=value: resolve_value(v, "model.layers.0.mlp.up_proj.weight",
                                                      0.5))
        again = load_recipe(got.model_dump())
        assert (json.dumps(again.model_dump(), sort_keys=True, default=str)
                == json.dumps(got.model_dump(), sort_keys=True, default=str))


yaml_bits = st.sampled_from(["m", "./m", "../m", "~/m", "m/", "'m'", "[m]", "{a: b}", "&a m",
                             "*a", "!!python/object:os.system ls", "'\\0'", "2024-13-45",
                             "0x1F", ".nan", "null", "|\n  m", ""]) | st.text(max_size=10)


@FUZZ
@given(model=yaml_bits, params=yaml_bits, extra=st.text(max_size=40) | st.just(""))
def test_random_recipe_files(model, params, extra):
    with scratch() as root:
        (root / "m").mkdir()
        path = root / "r.yaml"
        text = (f"merge_method: linear\nmodels:\n  - model: {model}\n"
                f"    parameters: {{weight: {params}}}\n{extra}")
        path.write_text(text, errors="surrogatepass")
        got = outcome(lambda: load_recipe(path))
        if not isinstance(got, PolymergeError):
            assert got.merge_method == "linear"
            for m in got.models:  # relative paths were resolved against the recipe's folder
                assert Path(m.model).is_absolute(), m.model
                assert not m.model.startswith(str(root)) or os.path.lexists(m.model), m.model
