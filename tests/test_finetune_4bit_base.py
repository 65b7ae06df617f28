"""`pyqlora finetune --model DIR` where DIR is a 4-bit checkpoint (issue 19, item 8): written by
`pyqlora quantize` (bitsandbytes' format), loaded straight into pyqlora's Linear4bit layers and adapted
without a second quantization. The oracle: the same run on the dense folder it was quantized from, whose
base pyqlora quantizes to the same bytes (same codebook, blocksize, DQ), must write the same adapter."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import test_finetune_resume as resume  # noqa: E402
from test_finetune_resume import adapter_bytes, args, call  # noqa: E402

tiny = resume.tiny  # the tiny Llama folder fixture of the resume tests


def test_finetune_on_a_4bit_checkpoint_equals_the_run_on_its_dense_source(tiny, tmp_path, capsys):
    assert call("quantize", tiny / "model", tmp_path / "q4") == 0
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"]
    capsys.readouterr()
    base = ["--steps", "2", "--dtype", "fp32"]
    assert call(*args(tiny, tmp_path / "from-dense", *base)) == 0
    argv = args(tiny, tmp_path / "from-4bit", *base)
    argv[argv.index("--model") + 1] = tmp_path / "q4"
    assert call(*argv) == 0
    err = capsys.readouterr().err
    assert "4-bit already in the checkpoint" in err
    report = json.loads((tmp_path / "from-4bit" / "report.json").read_text())
    dense_report = json.loads((tmp_path / "from-dense" / "report.json").read_text())
    assert report["memory"]["linear_params"] == dense_report["memory"]["linear_params"] > 0
    assert report["memory"]["other_params"] == dense_report["memory"]["other_params"]
    assert adapter_bytes(tmp_path / "from-4bit") == adapter_bytes(tmp_path / "from-dense")


def test_a_4bit_checkpoint_refuses_what_needs_dense_weights(tiny, tmp_path, capsys):
    assert call("quantize", tiny / "model", tmp_path / "q4") == 0
    for extra, what in ((["--base", "bf16"], "needs a dense checkpoint"), (["--init-lora", "loftq"], "loftq")):
        argv = args(tiny, tmp_path / ("out" + extra[1]), "--steps", "1", *extra)
        argv[argv.index("--model") + 1] = tmp_path / "q4"
        capsys.readouterr()
        assert call(*argv) == 2
        assert what in capsys.readouterr().err


def test_a_paged_4bit_checkpoint_trains_the_same_adapter(tiny, tmp_path, capsys):
    """--base-budget on a 4-bit checkpoint: its codes and scales are paged from the checkpoint's own file
    (nothing of them written to the spill file), and the run writes the resident run's adapter (issue 23)."""
    assert call("quantize", tiny / "model", tmp_path / "q4") == 0
    base = ["--steps", "2", "--dtype", "fp32"]
    argv = args(tiny, tmp_path / "resident-4bit", *base)
    argv[argv.index("--model") + 1] = tmp_path / "q4"
    assert call(*argv) == 0
    capsys.readouterr()
    argv = args(tiny, tmp_path / "paged-4bit", *base, "--base-budget", "4K", "--spill-dir", tmp_path)
    argv[argv.index("--model") + 1] = tmp_path / "q4"
    assert call(*argv) == 0
    assert "a 4-bit checkpoint is paged from its file" in capsys.readouterr().err
    paged = json.loads((tmp_path / "paged-4bit" / "report.json").read_text())["memory"]["base_paging"]
    assert paged["base_bytes"] > 2 * paged["budget_bytes"]
    assert paged["mapped_from_checkpoint_bytes"] >= paged["base_bytes"] and paged["spill_file_bytes"] == 0
    assert adapter_bytes(tmp_path / "paged-4bit") == adapter_bytes(tmp_path / "resident-4bit")
