"""Markdown tables of the latest benchmark rows: ``python -m benchmarks.report [--plots]``.

For every op, the newest row of each (shape, provider, mode) across benchmarks/results/*.csv
(later rows of a file are newer), one table per op: shapes down, providers across, each
cell ``fwd / fwd+bwd`` (or the single mode) in the op's headline unit (train_step and
generate: ms per step and tokens/s).
"""
import csv
import glob
import os

from benchmarks.harness import RESULTS_DIR, plot

UNIT = {"attention": "tflops", "relpos_attention": "tflops", "compress_conv": "tflops",
        "compress_mean": "gbps", "compress_max": "gbps", "memory_update": "ms",
        "decode_attention": "gbps", "recon_loss": "ms", "train_step": "ms", "generate": "ms"}
LABEL = {"tflops": "TF/s", "gbps": "GB/s", "ms": "ms"}
# the plot each benchmark draws, by op (``--plots`` redraws them from the newest rows)
PLOTS = {"attention": "attention.png", "relpos_attention": "relpos_attention.png",
         "compress_mean": "compress_mean.png", "compress_max": "compress_max.png",
         "compress_conv": "compress_conv.png", "memory_update": "memory_update.png",
         "decode_attention": "decode.png", "recon_loss": "recon_loss.png",
         "train_step": "train_step.png"}


def latest_rows():
    latest = {}
    for path in sorted(glob.glob(os.path.join(RESULTS_DIR, "*.csv"))):
        with open(path) as f:
            for row in csv.DictReader(f):
                latest[(row["op"], row["shape"], row["provider"], row["mode"])] = row
    return list(latest.values())


def tokens_per_step(op, shape):
    """Tokens one timed step processes, for the tokens/s of train_step and generate rows."""
    if op == "train_step":  # shape: a preset name
        from compressive_transformer import preset
        try:
            config, train_config = preset(shape)
        except ValueError:
            return None
        return train_config.batch * config.seg_len
    if op == "generate":  # shape ...-B{batch}-P...: one sampled token per stream and step
        return int(next(part[1:] for part in shape.split("-") if part[:1] == "B" and part[1:].isdigit()))
    return None


def _cell(op, row, unit):
    value = row[unit]
    tokens = tokens_per_step(op, row["shape"]) if unit == "ms" else None
    if tokens and value:
        return f"{value} ({tokens * 1e3 / float(value):,.0f} tokens/s)"
    return value


def tables(rows):
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        unit = UNIT.get(op, "ms")
        shapes = list(dict.fromkeys(r["shape"] for r in op_rows))
        providers = list(dict.fromkeys(r["provider"] for r in op_rows))
        modes = list(dict.fromkeys(r["mode"] for r in op_rows))
        first = op_rows[0]
        dates = sorted({r["date"] for r in op_rows})  # the table's rows may span several runs
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        out.append(f"**{op}** ({LABEL[unit]}, {' / '.join(modes)}; {first['gpu']}, torch "
                   f"{first['torch']}, triton {first['triton']}, {when})\n")
        out.append("| shape | " + " | ".join(providers) + " |")
        out.append("|---" * (len(providers) + 1) + "|")
        for shape in shapes:
            cells = []
            for provider in providers:
                values = []
                for mode in modes:
                    match = [r for r in op_rows if (r["shape"], r["provider"], r["mode"]) == (shape, provider, mode)]
                    values.append(_cell(op, match[0], unit) if match and match[0][unit] else "–")
                cells.append(" / ".join(values))
            out.append(f"| {shape} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plots(rows):
    """Redraw each op's plot from ``rows`` (the newest of every case, across runs)."""
    for op, filename in PLOTS.items():
        plot(rows, op, value=UNIT[op], filename=filename)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plots", action="store_true", help="also redraw the plots")
    rows = latest_rows()
    print(tables(rows))
    if parser.parse_args().plots:
        plots(rows)
