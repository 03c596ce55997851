"""Checkpoint reading (folders, shards, bare files, pickles, PEFT LoRA adapters), the streaming
sharded writer and the atomic output folder, each checked against safetensors / torch / PEFT."""

from __future__ import annotations

import json
import math
import os
import random
import struct
import warnings
from pathlib import Path

import pytest
import torch
from conftest import load_state, make_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.checkpoint import TensorInfo, open_checkpoint, read_safetensors_header
from polymerge.io.hf_files import copy_support_files, write_config
from polymerge.io.writer import AtomicOutputDir, ShardedWriter, plan_shards


def mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(5, 3, generator=g),
        "w16": torch.randn(4, 4, generator=g).half(),
        "wbf": torch.randn(7, generator=g).bfloat16(),
        "w64": torch.randn(2, 3, generator=g).double(),
        "scalar": torch.tensor(3.25),
        "scalar_bf": torch.tensor(-1.5, dtype=torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.tensor([1, 255, 7], dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "cube": torch.randn(2, 3, 4, generator=g),
    }


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- reading


def test_bare_file_every_dtype(tmp_path):
    state = mixed_state()
    path = tmp_path / "x.safetensors"
    save_file(state, path)
    ckpt = open_checkpoint(path)
    try:
        infos = ckpt.tensors()
        assert sorted(infos) == sorted(state)
        for name, tensor in state.items():
            assert infos[name] == TensorInfo(name, tuple(tensor.shape), tensor.dtype)
            assert infos[name].nbytes == tensor.numel() * tensor.element_size()
            assert_same(ckpt.read(name), tensor)
        assert ckpt.config is None
        assert ckpt.label == "x.safetensors"
    finally:
        ckpt.close()
    assert read_safetensors_header(path) == infos


def test_hf_folder_single_and_sharded(make_models):
    for shard in (None, "8KB"):
        ms = make_models("gpt2", 0, max_shard_size=shard)
        state = load_state(ms.base)
        ckpt = open_checkpoint(ms.base, label="the-base")
        try:
            assert ckpt.label == "the-base"
            assert ckpt.config["model_type"] == "gpt2"
            assert sorted(ckpt.tensors()) == sorted(state)
            for name in reversed(sorted(state)):  # any order
                assert_same(ckpt.read(name), state[name])
        finally:
            ckpt.close()


def test_folder_with_one_oddly_named_file(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "weights.safetensors")
    ckpt = open_checkpoint(folder)
    assert_same(ckpt.read("a"), torch.ones(2))


@pytest.mark.parametrize("case", ["missing", "suffix", "empty_dir", "two_files",
                                  "index_missing_shard", "index_lies", "bad_index",
                                  "garbage", "short", "bad_dtype"])
def test_unreadable_checkpoints(tmp_path, case):
    path = tmp_path / "ckpt"
    if case == "missing":
        fragment = "does not exist"
    elif case == "suffix":
        path = tmp_path / "weights.npz"
        path.write_bytes(b"123")
        fragment = "not a .safetensors"
    elif case == "empty_dir":
        path.mkdir()
        fragment = "no model.safetensors"
    elif case == "two_files":
        path.mkdir()
        save_file({"a": torch.ones(1)}, path / "a.safetensors")
        save_file({"b": torch.ones(1)}, path / "b.safetensors")
        fragment = "no model.safetensors"
    elif case in ("index_missing_shard", "index_lies", "bad_index"):
        path.mkdir()
        save_file({"a": torch.ones(1)}, path / "model-00001-of-00002.safetensors")
        weight_map = {"a": "model-00001-of-00002.safetensors"}
        if case == "index_missing_shard":
            weight_map["b"] = "model-00002-of-00002.safetensors"
            fragment = "model-00002-of-00002.safetensors"
        else:
            weight_map["ghost"] = "model-00001-of-00002.safetensors"
            fragment = "ghost"
        index = {"weight_map": weight_map} if case != "bad_index" else {"nope": 1}
        if case == "bad_index":
            fragment = "invalid index"
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif case == "garbage":
        path = tmp_path / "g.safetensors"
        path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
        fragment = "cannot read safetensors header"
    elif case == "short":
        path = tmp_path / "s.safetensors"
        path.write_bytes(b"abc")
        fragment = "too short"
    else:
        path = tmp_path / "d.safetensors"
        header = json.dumps({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}})
        path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(8))
        fragment = "unsupported dtype"
    with pytest.raises(CheckpointError, match=fragment):
        ckpt = open_checkpoint(path, label="lbl")
        ckpt.tensors()


def test_missing_tensor_and_truncated_read(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4), "z": torch.arange(100, dtype=torch.float32)}, path)
    ckpt = open_checkpoint(path, label="trunc")
    with pytest.raises(CheckpointError, match="'nope'"):
        ckpt.read("nope")
    os.truncate(path, path.stat().st_size - 40)
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.read("z")
    ckpt.close()


def test_pickles(tmp_path):
    state = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        path = tmp_path / f"model{suffix}"
        torch.save(state, path)
        with pytest.raises(CheckpointError, match="--allow-pickle"):
            open_checkpoint(path)
        ckpt = open_checkpoint(path, allow_pickle=True)
        assert sorted(ckpt.tensors()) == ["a", "b"]
        for name, tensor in state.items():
            assert_same(ckpt.read(name), tensor)
        ckpt.close()
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"a": state["a"]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": state["b"]}, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "config.json").write_text('{"model_type": "x"}')
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(folder)
    ckpt = open_checkpoint(folder, allow_pickle=True)
    assert ckpt.config == {"model_type": "x"}
    assert_same(ckpt.read("b"), state["b"])


def test_pickle_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="state dict"):
        open_checkpoint(path, allow_pickle=True)


# --------------------------------------------------------------------------- LoRA


LORA_CASES = {
    "llama_qv": ("llama", {}),
    "rslora": ("llama", {"use_rslora": True}),
    "patterns": ("llama", {"target_modules": ("q_proj", "v_proj", "down_proj"),
                           "rank_pattern": {"v_proj": 2},
                           "alpha_pattern": {"layers.1.self_attn.q_proj": 32}}),
    "embedding": ("llama", {"target_modules": ("embed_tokens", "q_proj"),
                            "save_kwargs": {"save_embedding_layers": False}}),
    "modules_to_save": ("llama", {"target_modules": ("q_proj",),
                                  "modules_to_save": ["lm_head"]}),
    "gpt2_conv1d": ("gpt2", {"target_modules": ("c_attn", "c_fc")}),
    "bert": ("bert", {"target_modules": ("query", "value")}),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_reads_as_peft_merge_and_unload(make_models, case):
    arch, kwargs = LORA_CASES[case]
    ms = make_models(arch, 0)
    lora = make_lora(ms, "adapter", **kwargs)
    base_state = ms.base_state()
    base = open_checkpoint(ms.base, label="base_model")
    ckpt = open_checkpoint(lora.adapter, base=base, label="lora")
    try:
        assert ckpt.config == base.config
        assert sorted(ckpt.tensors()) == sorted(base_state)
        changed = set()
        for name in base_state:
            got = ckpt.read(name)
            want = lora.merged_state[name]
            torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")
            if not torch.equal(want, base_state[name]):
                changed.add(name)
        assert changed, "the adapter changed nothing; the test is vacuous"
        assert set(ckpt.covered()) == changed
    finally:
        ckpt.close()
        base.close()


def test_lora_scales(make_models):
    ms = make_models("llama", 0)
    plain = make_lora(ms, "plain", r=4, lora_alpha=8)
    rs = make_lora(ms, "rs", r=4, lora_alpha=8, use_rslora=True)
    pattern = make_lora(ms, "pat", r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                        alpha_pattern={"layers.1.self_attn.q_proj": 3})
    base = open_checkpoint(ms.base)
    q1, v0 = "model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    assert open_checkpoint(plain.adapter, base=base).scale(q1) == pytest.approx(2.0)
    assert open_checkpoint(rs.adapter, base=base).scale(q1) == pytest.approx(8 / math.sqrt(4))
    pat = open_checkpoint(pattern.adapter, base=base)
    assert pat.scale(q1) == pytest.approx(3 / 4)
    assert pat.scale(v0) == pytest.approx(8 / 2)
    assert pat.scale("model.layers.0.self_attn.q_proj.weight") == pytest.approx(2.0)
    # the factors themselves: B @ A * scale is the delta
    b, a, scale = pat.lora_factors(v0)
    torch.testing.assert_close(base.read(v0) + scale * (b @ a), pattern.merged_state[v0])
    assert pat.lora_factors("model.layers.0.mlp.up_proj.weight") is None


def test_lora_on_embeddings_saved_with_base_layer(make_models):
    """PEFT's default save of an adapter targeting embed_tokens also stores the embedding
    itself as ``...embed_tokens.base_layer.weight``; that adapter must still read as
    merge_and_unload()."""
    ms = make_models("llama", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = make_lora(ms, "adapter", target_modules=("embed_tokens", "q_proj"))
    keys = set(load_file(lora.adapter / "adapter_model.safetensors"))
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in keys)
    ckpt = open_checkpoint(lora.adapter, base=open_checkpoint(ms.base))
    for name in ms.base_state():
        torch.testing.assert_close(ckpt.read(name).float(), lora.merged_state[name].float(),
                                   atol=1e-6, rtol=1e-6)


def test_lora_errors(make_models, tmp_path):
    ms = make_models("llama", 0)
    lora = make_lora(ms, "adapter")
    with pytest.raises(CheckpointError, match="base_model"):
        open_checkpoint(lora.adapter)
    # an adapter for modules the base does not have
    other = make_models("gpt2", 0, name="g")
    with pytest.raises(CheckpointError, match="does not have"):
        open_checkpoint(lora.adapter, base=open_checkpoint(other.base))
    # only one factor
    weights = load_file(lora.adapter / "adapter_model.safetensors")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "adapter_config.json").write_text((lora.adapter / "adapter_config.json").read_text())
    save_file({k: v for k, v in weights.items() if "lora_B" not in k or "layers.2" not in k},
              lone / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="one LoRA factor"):
        open_checkpoint(lone, base=open_checkpoint(ms.base))
    # pickled adapter weights
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    torch.save(weights, pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(pickled, base=open_checkpoint(ms.base))


# --------------------------------------------------------------------------- writing


def _write_all(folder: Path, state: dict[str, torch.Tensor], max_bytes: int,
               seed: int = 0) -> ShardedWriter:
    infos = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    writer = ShardedWriter(folder, infos, max_bytes, metadata={"who": "test"})
    order = list(state)
    random.Random(seed).shuffle(order)
    for name in order:
        writer.write(name, state[name])
    writer.close()
    return writer


def test_writer_single_file_any_order(tmp_path):
    state = mixed_state()
    _write_all(tmp_path, state, 10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert sorted(loaded) == sorted(state)
    for name, tensor in state.items():
        assert_same(loaded[name], tensor)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "who": "test"}
    # polymerge reads back what it wrote
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    for name, tensor in state.items():
        assert_same(ckpt.read(name), tensor)


def test_writer_shards(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = {f"layer.{i}.w": torch.randn(10, 10, generator=g).to(
        torch.bfloat16 if i % 2 else torch.float32) for i in range(9)}
    state["big"] = torch.randn(40, 40, generator=g)  # larger than a shard: alone
    state["zero_d"] = torch.tensor(2.5, dtype=torch.bfloat16)
    _write_all(tmp_path, state, 700, seed=1)
    shards = sorted(tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n > 3
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                        for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    for shard in shards:
        part = load_file(shard)
        for name, tensor in part.items():
            assert name not in seen
            seen[name] = shard.name
            assert_same(tensor, state[name])
        if "big" not in part:
            assert sum(t.numel() * t.element_size() for t in part.values()) <= 700
    assert seen == index["weight_map"]
    assert sorted(seen) == sorted(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in state.values())
    assert load_state(tmp_path).keys() == state.keys()
    ckpt = open_checkpoint(tmp_path)
    assert_same(ckpt.read("zero_d"), state["zero_d"])


def test_plan_shards_is_contiguous_and_bounded():
    infos = [TensorInfo(f"t{i}", (n,), torch.uint8) for i, n in enumerate([10, 20, 5, 100, 1])]
    shards = plan_shards(infos, 100)
    assert [[i.name for i in s] for s in shards] == [["t0", "t1", "t2"], ["t3"], ["t4"]]


def test_writer_rejects_mistakes(tmp_path):
    info = TensorInfo("a", (2, 2), torch.float32)
    writer = ShardedWriter(tmp_path, [info, TensorInfo("b", (3,), torch.bfloat16)], 10**6)
    with pytest.raises(PolymergeError, match="not planned"):
        writer.write("c", torch.zeros(2, 2))
    with pytest.raises(PolymergeError, match="planned"):
        writer.write("a", torch.zeros(2, 3))
    with pytest.raises(PolymergeError, match="planned"):
        writer.write("a", torch.zeros(2, 2, dtype=torch.float16))
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match="never written"):
        writer.close()
    with pytest.raises(PolymergeError, match="positive"):
        ShardedWriter(tmp_path, [info], 0)


def test_writer_non_contiguous_input(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # (4, 3), not contiguous
    writer = ShardedWriter(tmp_path, [TensorInfo("t", (4, 3), torch.float32)], 10**6)
    writer.write("t", t)
    writer.close()
    assert_same(load_file(tmp_path / "model.safetensors")["t"], t.contiguous())


# --------------------------------------------------------------------------- atomic output


def test_atomic_output_success_and_failure(tmp_path):
    target = tmp_path / "parent" / "out"
    with AtomicOutputDir(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.tmp-")
        (tmp / "f.txt").write_text("hello")
        assert not target.exists()
    assert (target / "f.txt").read_text() == "hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]

    with pytest.raises(PolymergeError, match="not empty"):
        AtomicOutputDir(target)
    with pytest.raises(ValueError), AtomicOutputDir(target, force=True) as tmp:
        (tmp / "g.txt").write_text("new")
        raise ValueError("stop")
    assert sorted(p.name for p in target.iterdir()) == [".polymerge-output", "f.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]

    with AtomicOutputDir(target, force=True) as tmp:
        (tmp / "g.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [".polymerge-output", "g.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_atomic_output_folder_has_normal_permissions(tmp_path):
    """The output folder gets the permissions any new folder gets (umask), not the 0700 of a
    private temporary folder: merged models are often shared."""
    reference = tmp_path / "plain"
    reference.mkdir()
    with AtomicOutputDir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("x")
    mode = (tmp_path / "out").stat().st_mode & 0o777
    assert mode == reference.stat().st_mode & 0o777, oct(mode)


# --------------------------------------------------------------------------- HF side files


def test_write_config_sets_dtype(tmp_path):
    write_config(tmp_path, {"model_type": "llama", "dtype": "float32", "vocab_size": 3},
                 torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 3
    assert cfg["dtype"] == "bfloat16"
    assert cfg.get("torch_dtype", "bfloat16") == "bfloat16"
    empty = tmp_path / "none"
    empty.mkdir()
    write_config(empty, None, torch.float32)
    assert not (empty / "config.json").exists()


def test_copy_support_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("tokenizer.json", "vocab.txt", "merges.txt", "generation_config.json",
                 "special_tokens_map.json"):
        (src / name).write_text(name * 3)
    (src / "model.safetensors").write_text("not copied")
    (src / "notes.md").write_text("not copied")
    copied = copy_support_files(dst, src)
    assert sorted(copied) == sorted(p.name for p in dst.iterdir())
    assert sorted(copied) == ["generation_config.json", "merges.txt", "special_tokens_map.json",
                              "tokenizer.json", "vocab.txt"]
    for name in copied:
        assert (dst / name).read_bytes() == (src / name).read_bytes()


# --------------------------------------------------------------------------- mapped reads


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_mapped_tensors_equal_reads_and_writes_never_reach_the_file(tmp_path):
    state = mixed_state()
    path = tmp_path / "x.safetensors"
    save_file(state, path)
    before = path.read_bytes()
    ckpt = open_checkpoint(path)
    try:
        for name, tensor in state.items():
            lent = ckpt.mapped(name)
            assert_same(lent, tensor)
            if lent.numel() and lent.is_floating_point():
                lent.fill_(7)  # copy-on-write: this process only
                assert torch.all(lent == 7)
                assert_same(ckpt.read(name), tensor)
            ckpt.release(name)
    finally:
        ckpt.close()
    assert path.read_bytes() == before
    reread = open_checkpoint(path)
    try:
        for name, tensor in state.items():
            assert_same(reread.mapped(name), tensor)
    finally:
        reread.close()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_released_pages_leave_the_resident_set(tmp_path):
    """A mapped tensor's pages count in RSS while it is used, not after ``release`` (the
    engine lends every input this way: mapped pages must not pile up over a model)."""
    path = tmp_path / "big.safetensors"
    save_file({"a": torch.ones(16 << 20, dtype=torch.uint8),
               "b": torch.full((16 << 20,), 2, dtype=torch.uint8)}, path)
    ckpt = open_checkpoint(path)
    try:
        start = _rss_file_kb()
        a = ckpt.mapped("a")
        assert int(a[::4096].sum()) == 4096  # faulted in by mapped(): every page present
        assert _rss_file_kb() - start > 12 << 10
        ckpt.release("a")
        assert _rss_file_kb() - start < 1 << 10
        assert int(a[::4096].sum()) == 4096  # touching it again faults the same bytes back
        ckpt.release("a")
        b = ckpt.mapped("b")
        assert int(b[-1]) == 2 and int(b[0]) == 2
        del a, b
    finally:
        ckpt.close()
