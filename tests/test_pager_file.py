"""Pager.map_file and a 4-bit checkpoint paged from its own file (issue 23, item 1 second form, item 6).

Oracles: the file's bytes as numpy reads them (np.fromfile), the resident load of the same
checkpoint (bit-identical logits, gradients and adapter updates), the spill file's size on disk
(``spill_file_bytes``), and real faults on the file (truncated, touched, replaced) in this process
and, where a crash would take pytest down with it, in a child process.
"""
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

import pyqlora as pq

MiB = 1 << 20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host pager is tested on Linux")


def _file(tmp_path, n=3 * MiB + 100, seed=0, name="w.bin"):
    """A file of `n` random bytes, on disk and out of the page cache (a checkpoint not read yet)."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())  # clean pages: they can be dropped
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return str(path), data


# -- Pager.map_file -------------------------------------------------------------------------------

@linux_only
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int16, "bfloat16"])
def test_map_file_views_the_file_bytes(tmp_path, dtype):
    path, data = _file(tmp_path)
    dt = pq._pager._normalize_dtype(dtype)
    with pq.Pager(budget_bytes=MiB, spill_dir=tmp_path, page_bytes=64 << 10) as pager:
        views = []
        for offset, shape in [(0, (100,)), (4096 * 3, (256, 4)), (12, (MiB // dt.itemsize,)), (7 * dt.itemsize, 5)]:
            a = pager.map_file(path, offset, shape, dtype)
            views.append(a)
            want = data[offset:offset + a.nbytes].view(dt).reshape(a.shape)
            assert a.flags.writeable is False and a.flags.c_contiguous and a.dtype == dt
            pager.prefetch(a)
            assert np.array_equal(a.view(np.uint8), want.view(np.uint8))
            with pytest.raises(ValueError, match="read-only"):
                a[...] = 0
        pager.evict()  # dropped, not written: the file and the views keep the same bytes
        assert np.array_equal(a.view(np.uint8), data[7 * dt.itemsize:7 * dt.itemsize + a.nbytes])
        s = pager.stats()
        assert s["spill_file_bytes"] == 0 and s["mapped_files"] == 1 and s["mapped_allocations"] == 4
    assert np.array_equal(np.fromfile(path, np.uint8), data)


@linux_only
def test_mapped_pages_count_in_the_budget_and_never_reach_the_spill_file(tmp_path):
    path, data = _file(tmp_path, n=8 * MiB)
    budget = 2 * MiB
    with pq.Pager(budget_bytes=budget, spill_dir=tmp_path, page_bytes=256 << 10) as pager:
        parts = [pager.map_file(path, i * MiB + 3, MiB - 3) for i in range(8)]
        for sweep in range(2):
            for i, a in enumerate(parts):
                pager.prefetch(a)
                assert np.array_equal(a, data[i * MiB + 3:(i + 1) * MiB])
                s = pager.stats()
                # neighbouring ranges share an OS page: a page per neighbour of slack
                assert s["mapped_resident_bytes"] <= budget + 2 * 4096 * len(parts)
        s = pager.stats()
        assert s["page_ins"] > 0 and s["page_outs"] > 0
        assert s["spill_file_bytes"] == 0 and s["mapped_bytes"] >= 8 * MiB - 4096
        assert s["allocated_bytes"] == s["mapped_bytes"] and s["num_allocations"] == 8
        del parts, a
        assert pager.stats()["mapped_allocations"] == 0 and pager.stats()["mapped_files"] == 0


@linux_only
def test_a_large_prefetch_reads_its_range_ahead_not_page_by_page(tmp_path):
    """One prefetch of 40 MiB of a file on disk: the kernel caps one WILLNEED at its readahead
    limit (8 MiB on a virtio disk), and the rest used to be read by 4 KiB faults, each a major
    page fault (a 65B checkpoint paged at 70 MB/s from a disk reading 1.1 GB/s). The oracle is
    the kernel's count of this process's major faults: one per 4 KiB page read on touch."""
    import resource

    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {fs}: its pages are never read from a disk")
    n = 40 * MiB
    path, data = _file(tmp_path, n=n)
    with pq.Pager(budget_bytes=64 * MiB, spill_dir=tmp_path) as pager:
        a = pager.map_file(path, 0, n)
        if pager.stats()["mapped_resident_bytes"] > n // 8:
            pytest.skip("the kernel kept the new file's pages cached: nothing to read from the disk")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        pager.prefetch(a)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before
        assert pager.stats()["mapped_resident_bytes"] == n
        np.testing.assert_array_equal(a[:: 4096], data[:: 4096])
    # 10,240 pages; up to 8,192 faults when only the first 8 MiB were read ahead
    assert faults < 512, f"{faults} major faults for {n // 4096} pages: the range was read page by page"


@linux_only
def test_bad_map_file_arguments(tmp_path):
    path, _ = _file(tmp_path, n=10_000)
    pager = pq.Pager(spill_dir=tmp_path)
    with pytest.raises(ValueError, match="beyond the end"):
        pager.map_file(path, 0, 10_001)
    with pytest.raises(ValueError, match="beyond the end"):
        pager.map_file(path, 9_999, 1, np.float32)
    with pytest.raises(ValueError, match="beyond the end"):
        pager.map_file(path, 1 << 40, 1)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        pager.map_file(path, -1, 10)
    with pytest.raises(ValueError, match="nothing to map"):
        pager.map_file(path, 0, (0, 3))
    with pytest.raises(TypeError, match="offset"):
        pager.map_file(path, 1.5, 10)
    with pytest.raises(TypeError, match="path"):
        pager.map_file(3, 0, 10)
    with pytest.raises(ValueError, match="NUL"):
        pager.map_file(path + "\0x", 0, 10)
    with pytest.raises(FileNotFoundError):
        pager.map_file(tmp_path / "missing.bin", 0, 10)
    with pytest.raises(ValueError, match="regular file"):
        pager.map_file(tmp_path, 0, 10)
    with pytest.raises(TypeError, match="dtype"):
        pager.map_file(path, 0, 10, object)
    a = pager.map_file(path, 0, 10)
    pager.close()
    with pytest.raises(ValueError, match="closed"):
        pager.map_file(path, 0, 10)
    assert a.sum() >= 0  # still mapped after close: unmapped with its last view


@linux_only
@pytest.mark.parametrize("change", ["truncate", "mtime", "rewrite", "replace"])
def test_a_file_changed_while_mapped_is_an_oserror_at_prefetch(tmp_path, change):
    path, data = _file(tmp_path)
    pager = pq.Pager(budget_bytes=MiB, spill_dir=tmp_path, page_bytes=64 << 10)
    a = pager.map_file(path, 100, 2 * MiB)
    pager.prefetch(a)
    pager.evict()
    st = os.stat(path)
    if change == "truncate":
        os.truncate(path, MiB)
    elif change == "mtime":
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "rewrite":
        with open(path, "r+b") as f:
            f.seek(5)
            f.write(b"x")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # coarse clocks: make the write visible
    else:
        other, _ = _file(tmp_path, seed=1, name="other.bin")
        os.replace(other, path)
    with pytest.raises(OSError, match="changed on disk") as info:
        pager.prefetch(a)
    assert info.value.errno == errno.ESTALE and path in str(info.value)
    pager.evict(a)  # eviction and freeing still work
    del a, info  # (the traceback holds `a` too)
    assert pager.stats()["mapped_allocations"] == 0


@linux_only
def test_a_truncated_file_does_not_crash_a_prefetch_loop(tmp_path):
    """In a child (a SIGBUS would end pytest): truncation mid-loop, an OSError, the process lives on."""
    path, _ = _file(tmp_path, n=8 * MiB)
    code = textwrap.dedent(f"""
        import os, pyqlora as pq
        pager = pq.Pager(budget_bytes=1 << 20, spill_dir={str(tmp_path)!r}, page_bytes=1 << 16)
        parts = [pager.map_file({path!r}, i << 20, 1 << 20) for i in range(8)]
        for sweep in range(3):
            for i, a in enumerate(parts):
                if sweep == 1 and i == 4:
                    os.truncate({path!r}, 3 << 20)
                try:
                    pager.prefetch(a)
                except OSError as exc:
                    print("OSError", exc.errno, sweep, i)
                    raise SystemExit(0)
        print("no error")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())  # outside the source tree (`-c` puts the cwd first)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["OSError", str(errno.ESTALE)] and out.stdout.split()[2:] == ["1", "4"]


def test_map_file_example_runs():
    from support import run_doctests

    class Only:  # the docstring of map_file alone
        __name__ = "pyqlora._pager.map_file"
        __doc__ = pq.Pager.map_file.__doc__
    failed, attempted = run_doctests(Only)
    assert attempted >= 4 and failed == 0


# -- a 4-bit checkpoint paged from its file ---------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pyqlora._glue import checkpoint as _glue_checkpoint  # noqa: E402
from pyqlora.app import checkpoint as ckpt  # noqa: E402
from pyqlora.lora import LoraConfig, load_4bit, lora_layers, prepare_model  # noqa: E402
from support import tiny_llama_config, train_lora_steps  # noqa: E402

# 4-bit layers of 96 x 320 .. 320 x 96 (15 KiB of codes each) and a budget of 8 KiB: less than one layer
SHAPE = dict(hidden_size=96, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
BUDGET = 8 << 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama written by ``pyqlora quantize`` (NF4 + DQ, bitsandbytes layout)."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config(transformers, **SHAPE)).save_pretrained(root / "dense")
    ckpt.quantize_checkpoint(str(root / "dense"), str(root / "q"))
    return str(root / "q")


def _load(folder, pager=None):
    return load_4bit(folder, pager=pager)


_run = train_lora_steps


@linux_only
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_checkpoint_paged_from_its_file_is_bit_identical(tmp_path, checkpoint, checkpointing):
    config = LoraConfig(r=4, lora_alpha=8, gradient_checkpointing=checkpointing)
    model = _load(checkpoint)
    with torch.no_grad():
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
        plain = model(input_ids=ids).logits
    torch.manual_seed(0)  # the adapters' initial values
    prepare_model(model, config)
    model.train()
    want = _run(model)

    # a copy of the folder: the resident model's tensors keep its own file mapped (safetensors' zero-copy
    # views), and pages mapped by anyone stay in RAM whatever the pager does
    shutil.copytree(checkpoint, tmp_path / "q")
    pager = pq.Pager(budget_bytes=BUDGET, spill_dir=tmp_path, page_bytes=4096)
    paged = _load(str(tmp_path / "q"), pager=pager)
    from pyqlora.nn import Linear4bit

    layers = [m for m in paged.modules() if isinstance(m, Linear4bit)]
    assert max(m.quantized.nbytes for m in layers) > BUDGET  # the budget holds less than one layer
    s = pager.stats()
    assert s["mapped_allocations"] == 3 * len(layers) and s["mapped_files"] == 1  # codes, absmax, nested absmax
    assert s["spill_file_bytes"] == 0 and s["allocated_bytes"] == s["mapped_bytes"]
    with torch.no_grad():
        assert torch.equal(paged(input_ids=ids).logits, plain)  # before any LoRA: the plain 4-bit model
    torch.manual_seed(0)
    report = prepare_model(paged, config, pager=pager)          # the base is in the pager already: hooks only
    paged.train()
    assert pager.stats()["mapped_allocations"] == 3 * len(layers)
    before = pager.stats()
    got = _run(paged)
    assert torch.equal(got[0], want[0])                                   # logits
    assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][n], want[1][n]) for n in want[1])
    assert all(torch.equal(got[2][n], want[2][n]) for n in want[2])       # adapters after 2 steps
    s = report.paging.stats()
    assert s["page_ins"] > before["page_ins"] and s["page_outs"] > before["page_outs"]  # it really paged
    assert s["spill_file_bytes"] == 0                                     # nothing of the base written
    assert s["layer_calls"] >= 2 * len(layers)
    assert pager.stats()["mapped_allocations"] == 3 * len(layers)         # still views of the file
    for _, m in lora_layers(paged):
        pager.prefetch(m.base_layer.quantized.packed)                     # ValueError outside the pager
    report.paging.remove()


@linux_only
def test_entries_that_need_a_conversion_are_copied_into_the_pager(tmp_path, checkpoint, monkeypatch):
    want = _load(checkpoint)
    real = _glue_checkpoint.mappable
    # pretend every absmax is stored in a form the kernels cannot use as it is
    monkeypatch.setattr(_glue_checkpoint, "mappable", lambda dtype, off, n, shape: None if dtype == "U8" and
                        n < 4096 and shape and len(shape) == 1 else real(dtype, off, n, shape))
    pager = pq.Pager(budget_bytes=BUDGET, spill_dir=tmp_path, page_bytes=4096)
    with pytest.warns(RuntimeWarning, match="copied into pager memory"):
        got = _load(checkpoint, pager=pager)
    s = pager.stats()
    assert s["spill_file_bytes"] > 0 and s["allocated_bytes"] > s["mapped_bytes"] > 0
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)


@linux_only
def test_a_checkpoint_truncated_during_training_is_an_oserror(tmp_path, checkpoint):
    """In a child: the checkpoint file is cut while mapped; the next step raises OSError, nothing crashes."""
    folder = tmp_path / "q"
    shutil.copytree(checkpoint, folder)
    code = textwrap.dedent(f"""
        import os, sys, torch
        import pyqlora as pq
        from pyqlora.lora import LoraConfig, load_4bit, prepare_model
        folder = {str(folder)!r}
        pager = pq.Pager(budget_bytes={BUDGET}, spill_dir={str(tmp_path)!r}, page_bytes=4096)
        model = load_4bit(folder, pager=pager)
        report = prepare_model(model, LoraConfig(r=4), pager=pager, lookahead=0)
        ids = torch.randint(0, 64, (1, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        path = os.path.join(folder, "model.safetensors")
        os.truncate(path, os.path.getsize(path) // 3)
        try:
            model(input_ids=ids, labels=ids).loss.backward()
        except OSError as exc:
            print("OSError", exc.errno, "model.safetensors" in str(exc))
            sys.exit(0)
        print("no error")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())  # outside the source tree (`-c` puts the cwd first)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["OSError", str(errno.ESTALE), "True"], out.stdout + out.stderr[-2000:]


def test_bad_pager_for_a_checkpoint(checkpoint):
    with pytest.raises(TypeError, match="pager must be a pyqlora.Pager"):
        _load(checkpoint, pager="8G")


def test_load_4bit_is_the_application_loader_and_names_bad_folders(tmp_path, checkpoint):
    """pyqlora.lora.load_4bit gives the model `pyqlora generate|eval|finetune` load (the same Linear4bit bytes and
    logits), and a folder it cannot use is a clear error."""
    model = load_4bit(checkpoint)
    app_model, _, info = ckpt.load_model(checkpoint, tokenizer=False)
    assert info["quantized"] and not model.training
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 7 * SHAPE["num_hidden_layers"]
    for name in layers:
        a, b = model.get_submodule(name).quantized, app_model.get_submodule(name).quantized
        assert a.packed.tobytes() == b.packed.tobytes() and a.absmax.tobytes() == b.absmax.tobytes()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, app_model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="no quantization_config: .* holds a dense model"):
        load_4bit(os.path.join(os.path.dirname(checkpoint), "dense"))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(checkpoint, "config.json"), empty / "config.json")
    with pytest.raises(FileNotFoundError, match="holds no .safetensors weights"):
        load_4bit(empty)
    with pytest.raises(FileNotFoundError):
        load_4bit(tmp_path / "missing")


@linux_only
def test_bench_pager_file_scan_runs(tmp_path):
    """benchmarks/bench_pager.py --file-scan: a smoke run (its rates are for docs/pager.md, not checked)."""
    path, _ = _file(tmp_path, n=6 * MiB)
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_pager.py")
    done = subprocess.run([sys.executable, script, "--file-scan", path, "--tensor-mib", "1", "--budget-mib", "2"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 mapped pieces of 1 MiB" in done.stdout and "disk, one sequential read" in done.stdout
    assert "x the disk" in done.stdout
