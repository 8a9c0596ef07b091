"""The quantization error report: NF4 must beat FP4 and INT4 on normal weights."""

from __future__ import annotations

import random

import pytest

from qlora.cli.main import main
from qlora.quant.error_report import quant_error_report


def test_nf4_has_the_lowest_error_on_normal_weights():
    seed = random.randrange(2**31)
    rows = {(r.weights, r.quant_type): r for r in quant_error_report(numel=1 << 16, seed=seed)}
    nf4, fp4, int4 = (rows["normal", q] for q in ("nf4", "fp4", "int4"))
    assert nf4.mse < fp4.mse and nf4.mse < int4.mse, f"seed {seed}: {nf4.mse} {fp4.mse} {int4.mse}"
    assert nf4.mse_double_quant < fp4.mse_double_quant and nf4.mse_double_quant < int4.mse_double_quant
    for row in rows.values():
        assert row.bits == 4.5
        assert row.bits_double_quant == pytest.approx(4.127, abs=1e-3)
        assert 0 < row.mse <= row.max_error**2


def test_command_prints_the_table(capsys):
    assert main(["quant-error", "--numel", "65536", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for word in ("normal", "student-t(3)", "nf4", "fp4", "int4", "MSE", "bits (DQ)", "4.500", "4.127"):
        assert word in out


def test_command_rejects_bad_numel(capsys):
    with pytest.raises(SystemExit) as exc:  # refused while the command line is parsed
        main(["quant-error", "--numel", "1"])
    assert exc.value.code == 2
    assert "--numel: must be in [2, 134217728]" in capsys.readouterr().err
