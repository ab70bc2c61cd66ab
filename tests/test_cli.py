"""The ``attncompiler`` command line: every command with its output, and one-line errors."""

import io
import json
import re
import subprocess
import sys
import textwrap

import pytest

from attncompiler import cli, tuner
from attncompiler.options import triton_interpret

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0/0 in padding rows of the interpreter

MODEL = textwrap.dedent("""
    import torch
    import torch.nn.functional as F


    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            probs = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
            return probs @ v + F.scaled_dot_product_attention(q, k, v, is_causal=True)


    def build():
        torch.manual_seed(0)
        return Attention(), tuple(torch.randn(1, 2, 24, 16) for _ in range(3))


    def not_a_pair():
        return 3
""")


@pytest.fixture(autouse=True)
def _in_its_own_directory(tmp_path, monkeypatch, no_tuning_results):
    """Each test runs in its own directory and starts without tuning results."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return str(path)


def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, expected_status, text):
    assert status == expected_status
    assert err.startswith("attncompiler: error: ") and text in err, err
    assert "Traceback" not in err


needs_interpreter = pytest.mark.skipif(not triton_interpret(), reason="tuning on CPU runs under TRITON_INTERPRET=1")


def test_help_everywhere(capsys):
    result = subprocess.run([sys.executable, "-m", "attncompiler", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and all(c in result.stdout for c in ("inspect", "tune", "cache", "bench"))
    for argv in (["inspect"], ["tune"], ["cache"], ["cache", "export"], ["cache", "import"], ["bench"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith("usage: attncompiler " + " ".join(argv)), argv


def test_inspect_a_file(capsys, model_file, tmp_path):
    status, out, _ = run(capsys, "inspect", model_file, "--dot", "regions.dot", "--source")
    assert status == 0
    assert "2 of 2 attention sites rewritten in 1 graph(s)" in out
    assert re.search(r"--- graph \d+ before rewriting ---", out) and "torch.softmax(" in out
    assert re.search(r"--- graph \d+ after rewriting ---", out) and "torch.ops.attncompiler.attention.default(" in out
    assert "program=(where (le k q) (mul s 0.25) -inf)" in out
    assert out.count("--- generated kernel ") == 2 and "@triton.jit" in out
    dot = (tmp_path / "regions.dot").read_text()
    assert dot.startswith("digraph attncompiler {") and dot.rstrip().endswith("}")
    assert dot.count("subgraph cluster_") == 4 and "call_function softmax" in dot and "(div s 4.0)" in dot


def test_inspect_a_tiny_hugging_face_model(capsys):
    status, out, _ = run(capsys, "inspect", "--hf", "llama", "--seq", "16")
    assert status == 0
    assert "llama (tiny, random weights): 2 of 2 attention sites rewritten" in out
    assert "group=2" in out


@pytest.mark.parametrize("argv, status, text", [
    (["inspect"], 2, "give either a target file"),
    (["inspect", "missing.py"], 1, "'missing.py' is not a Python file"),
    (["inspect", "{model}:nothing"], 1, "has no function nothing() returning (model, inputs)"),
    (["inspect", "{model}:not_a_pair"], 1, "must return (model, inputs)"),
    (["inspect", "{broken}"], 1, "importing"),
    (["inspect", "--hf", "no-such-arch"], 1, "--hf no-such-arch:"),
    (["tune", "--shapes", "2x4x8"], 2, "expected BATCHxHEADSxSEQxHEAD_DIM"),
    (["tune", "--shapes", "1x3x8x16", "--kv-heads", "2"], 2, "3 query heads cannot share 2"),
    (["tune", "{model}", "--shapes", "1x2x8x16"], 2, "not both"),
    (["cache", "import", "missing.json"], 1, "cannot read missing.json"),
    (["cache", "import", "{model}"], 1, "JSONDecodeError"),
    (["cache", "import", "{export}"], 1, "not an attncompiler cache export"),
    (["cache", "export", "no/such/dir/out.json"], 1, "cannot write no/such/dir/out.json"),
    (["bench"], 1, "no CUDA GPU is visible"),
])
def test_user_mistakes_are_one_line(capsys, model_file, tmp_path, argv, status, text):
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "export.json").write_text('{"entries": {}}')
    argv = [a.format(model=model_file, broken=tmp_path / "broken.py", export=tmp_path / "export.json") for a in argv]
    assert_one_line_error(*run(capsys, *argv)[::2], status, text)


def test_tuning_without_a_gpu_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert_one_line_error(*run(capsys, "tune", "--shapes", "1x2x8x16")[::2], 1, "tuning needs a CUDA GPU")


@needs_interpreter
def test_tune_a_target_then_find_it_cached(capsys, model_file):
    status, out, err = run(capsys, "tune", model_file)
    assert status == 0
    assert "4/4 done" in err and "[####" in err
    rows = out.splitlines()[2:]
    assert len(rows) == 2 and all(" tuned " in row and "sdpa-" in row and row.endswith("x") for row in rows)

    tuner.forget_caches()
    status, out, err = run(capsys, "tune", model_file)
    assert status == 0 and "done" not in err
    assert [row.split()[2] for row in out.splitlines()[2:]] == ["cache", "cache"]


@needs_interpreter
def test_tune_shapes_and_manage_the_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCOMPILER_CACHE_DIR", str(tmp_path / "cache"))  # `cache clear` empties it
    status, out, err = run(capsys, "tune", "--shapes", "1x2x40x16", "2x2x8x16", "--causal", "--exhaustive")
    assert status == 0 and "tuning 1x2x40x16 float32 causal" in err
    assert out.count("/causal/") == 2 and "/q64/k64/bh2" in out and "/q16/k16/bh4" in out

    status, out, _ = run(capsys, "cache", "path")
    directory, file = out.splitlines()
    assert directory == str(tmp_path / "cache") and file.startswith(f"{directory}/tuning/cpu-")

    (tmp_path / "cache" / "tuning" / "stray.json").write_text("{oops")
    status, out, _ = run(capsys, "cache", "ls")
    stray = next(line for line in out.splitlines() if line.startswith("stray.json"))
    assert "this machine" in out and "ignored: unreadable (JSONDecodeError" in stray
    assert [line.split()[6] for line in out.splitlines() if "this machine" in line] == ["2"]

    status, out, _ = run(capsys, "cache", "show")
    assert out.count(" exhaustive ") == 2 and "best SDPA" in out

    assert run(capsys, "cache", "export", "all.json")[1] == "exported 2 entries of 1 environment(s) to all.json\n"
    (tmp_path / "cache" / "models" / "m-1-2").mkdir(parents=True)  # a checkpoint converted from a GGUF file
    status, out, _ = run(capsys, "cache", "clear")
    assert out.startswith("removed 2 tuning file(s), ") and "and 1 converted model checkpoint(s)" in out
    assert run(capsys, "cache", "ls")[1].startswith("no tuning") and not (tmp_path / "cache" / "models").exists()
    assert run(capsys, "cache", "show")[1].startswith("no tuning results for this machine")

    exported = json.loads((tmp_path / "all.json").read_text())
    first = next(iter(exported["caches"][0]["entries"].values()))
    first["config"]["block_m"] = 96
    (tmp_path / "tampered.json").write_text(json.dumps(exported))
    status, out, err = run(capsys, "cache", "import", "tampered.json")
    assert status == 1 and out == "imported 1 entries from tampered.json, rejected 1\n"
    assert err.startswith("rejected cache 0 (cpu), entry ") and "block_m must be a power of two" in err
    status, out, _ = run(capsys, "cache", "import", "all.json")
    assert status == 0 and out == "imported 2 entries from all.json\n"
    assert run(capsys, "cache", "show")[1].count(" exhaustive ") == 2


def test_progress_bar():
    stream = io.StringIO()
    bar = cli.ProgressBar(stream, width=4)
    bar.update(1, 2, "triton 64x32")
    bar.update(2, 2, "done")
    assert stream.getvalue().split("\r")[1:] == [f"  [##..] 1/2 {'triton 64x32':<32}", f"  [####] 2/2 {'done':<32}\n"]


def test_bench_table_and_plot(tmp_path):
    rows = [("bfloat16", 64, 1024, {"attncompiler": 310.4, "sdpa-flash": 330.0}),
            ("bfloat16", 64, 4096, {"attncompiler": 402.0, "sdpa-flash": None})]
    assert cli.bench_table(rows).splitlines() == [
        "| dtype | D | S | attncompiler TFLOP/s | sdpa-flash TFLOP/s |", "|---|---|---|---|---|",
        "| bfloat16 | 64 | 1024 | 310 | 330 |", "| bfloat16 | 64 | 4096 | 402 | – |"]
    drawn = cli.bench_plot(rows, str(tmp_path / "plot.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert drawn is False and not (tmp_path / "plot.png").exists()
    else:
        assert drawn is True and (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


@needs_interpreter
def test_tune_with_train_tunes_the_backward_too(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCOMPILER_CACHE_DIR", str(tmp_path / "cache"))
    status, out, err = run(capsys, "tune", "--shapes", "1x2x24x16", "--causal", "--train")
    assert status == 0 and "tuning 1x2x24x16 float32 causal forward and backward" in err
    header, _, row = out.splitlines()
    assert header.split()[-3:] == ["runs", "backward", "speedup"]
    backward = r" dkdv:\d+x\d+/w\d/s\d,dq:\d+x\d+/w\d/s\d "
    assert row.split()[-3] in ("triton", "sdpa-math", "sdpa-flash") and re.search(backward, row)
    status, out, _ = run(capsys, "cache", "show")
    assert out.splitlines()[0].split()[-3:] == ["winner", "backward", "speedup"]
    assert re.search(backward + r"[0-9.e-]+ ms ", out.splitlines()[2])
