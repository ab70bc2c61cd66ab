"""The GPU benchmarks' source edits of the generated forward still find their text (the template may change)."""

import importlib
import sys
from pathlib import Path

import pytest

from attncompiler.codegen.common import kernel_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
anatomy = importlib.import_module("forward_anatomy")
sweep = importlib.import_module("kernel_sweep")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("probe", sorted(anatomy.PROBES))
def test_forward_anatomy_probes_edit_the_generated_forward(probe, causal):
    program = anatomy.program_of(0.125, causal)
    plain, _ = sweep.flash.load_kernel(program, tma=True)
    name, _ = sweep.edited_forward(program, probe, anatomy.PROBES[probe])
    source = (kernel_dir() / f"{name}.py").read_text()
    assert name != plain
    for text, replacement in anatomy.PROBES[probe]:
        assert text not in source and replacement in source

@pytest.mark.parametrize("variant", sorted(sweep.VARIANT_EDITS))
def test_kernel_sweep_variants_edit_the_generated_forward(variant):
    program = sweep.program_of(0.125, True)
    name, _ = sweep.edited_forward(program, variant, [sweep.VARIANT_EDITS[variant]])
    assert name.startswith(f"flash_fwd_{variant.replace('-', '_')}_")
