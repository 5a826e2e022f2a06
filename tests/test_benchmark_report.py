"""The README's benchmark tables (benchmarks/report.py): newest row per case, tokens/s."""
import pytest

from benchmarks import report


def row(op, shape, provider, mode, ms, tflops="", date="2026-11-29"):
    return {"op": op, "shape": shape, "provider": provider, "mode": mode, "ms": ms,
            "tflops": tflops, "gbps": "", "peak_extra_mib": "", "gpu": "GPU", "torch": "t",
            "triton": "tr", "date": date}


def test_tables_show_both_modes_and_tokens_per_second():
    rows = [row("attention", "pg19-like", "ct_triton", "fwd", "0.15", "390.0"),
            row("attention", "pg19-like", "ct_triton", "fwd+bwd", "0.93", "225.3"),
            row("train_step", "d512-L8", "ct", "fwd+bwd", "50.0"),
            row("generate", "d512-L8-B16-P512-T512", "ct", "fwd", "4.0")]
    text = report.tables(rows)
    assert "| pg19-like | 390.0 / 225.3 |" in text
    # d512-L8 trains 16 x 512 tokens per step; generation samples one token per stream
    assert "| d512-L8 | 50.0 (163,840 tokens/s) |" in text
    assert "| d512-L8-B16-P512-T512 | 4.0 (4,000 tokens/s) |" in text


def test_table_header_names_the_dates_of_its_rows():
    rows = [row("train_step", "d512-L8", "ct", "fwd+bwd", "50.0", date="2026-11-30"),
            row("train_step", "d1024-L4", "ct", "fwd+bwd", "20.0", date="2026-12-01")]
    assert "triton tr, 2026-11-30 to 2026-12-01)" in report.tables(rows)
    assert "triton tr, 2026-11-30)" in report.tables(rows[:1])


def test_plots_are_redrawn_for_the_ops_that_have_rows(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # the "bench" extra
    from benchmarks import harness
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    report.plots([row("attention", "pg19-like", "ct_triton", "fwd", "0.15", "390.0"),
                  row("train_step", "d512-L8", "ct", "fwd+bwd", "50.0")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.png", "train_step.png"]
