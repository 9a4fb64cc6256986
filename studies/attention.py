"""Attention study (Yao et al., IJCAI 2025) on few-shot BBC News (MiniLM).

Claims tested: (1) LoRA on W_q and W_v ("QV") is as good as on W_q, W_k, W_v
("QKV"); (2) a larger rate for W_v, `eta_V = lambda * eta_Q` with
`lambda > 1`, improves results. Paper (RoBERTa-base, GLUE dev, Table 2):
e.g. RTE LoRA QKV r=8 70.76 vs QV r=8 lambda=4 75.09; SST-2 93.92 vs 94.04.

Cells (LoRA alpha = rank, on all 6 layers; the head trained at eta_Q):

- `qv_r8_l{1,2,4,8}`: QV, rank 8 (73,728 adapter parameters), lambda 1..8;
- `qv_r8_l1_mean{2,4,8}`: the matched-rate control: lambda = 1 with both
  Q and V at the mean rate `eta_Q (1 + lambda) / 2` of the lambda cell (Q
  and V have equally many parameters), so a lambda effect is separated from
  a higher average rate;
- `qkv_r8_l1`: QKV at equal rank (110,592 parameters);
- `qv_r12_l1`: QV at QKV r=8's parameter count (rank 12: 110,592).

Training: as `studies/methods.py` (8 + 8 articles per class, 300-article
test set, 64 tokens, batch 8, AdamW with weight decay 0.01, `--epochs` 10,
best validation epoch), `eta_Q = --lr` (2e-3). Paired over seeds.

Run: `python studies/attention.py [--quick] [--seeds N] [--cells a,b]`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _harness as harness  # noqa: E402
import _minilm as minilm  # noqa: E402


def cells():
    out = {}
    for lam in (1, 2, 4, 8):
        out[f"qv_r8_l{lam}"] = (("query", "value"), 8, lam, 1.0)
    for lam in (2, 4, 8):
        out[f"qv_r8_l1_mean{lam}"] = (("query", "value"), 8, 1, (1 + lam) / 2)
    out["qkv_r8_l1"] = (("query", "key", "value"), 8, 1, 1.0)
    out["qv_r12_l1"] = (("query", "value"), 12, 1, 1.0)
    return out


CELLS = cells()


def configure(roles, rank):
    def apply(classifier):
        import keras_adapters as ka

        ka.enable_adapter(
            classifier, ka.LoRA(rank=rank, alpha=rank), targets=ka.attention(*roles)
        )

    return apply


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--cells", default=",".join(CELLS))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args(argv)
    study = harness.open_study("attention", args)
    seeds = list(range(args.seeds or (1 if args.quick else 5)))
    shots, epochs, length = (4, 2, 32) if args.quick else (8, args.epochs, 64)
    names = [c.strip() for c in args.cells.split(",") if c.strip()]
    if args.quick:
        names = ["qv_r8_l4"]
    harness.check_names(names, CELLS)
    if not args.report:
        import keras

        import keras_adapters as ka

        tokens = minilm.corpus(length)
        for name in names:
            roles, rank, lam, mean = CELLS[name]
            todo = [s for s in seeds if not study.has(name, s)]
            if not todo:
                continue
            rate = args.lr * mean
            harness.log(f"{name}: building and compiling")

            def optimizer(rate=rate, lam=lam):
                return ka.optimizers.attention_lr(
                    keras.optimizers.AdamW(rate, weight_decay=0.01), value_ratio=lam
                )

            runner = minilm.Runner(
                configure(roles, rank), optimizer, sequence_length=length
            )
            for seed in todo:
                train, val, test = minilm.split(tokens, shots, seed)
                if args.quick:
                    test = {k: v[::6] for k, v in test.items()}
                result = runner.train(train, val, test, seed, epochs)
                result.pop("logits")
                study.record(
                    name,
                    seed,
                    {
                        "roles": list(roles),
                        "rank": rank,
                        "lambda": lam,
                        "eta_q": rate,
                        "eta_v": rate * lam,
                        "shots": shots,
                        "epochs": epochs,
                        "sequence_length": length,
                        "backend": keras.backend.backend(),
                        **result,
                    },
                )
                harness.log(f"{name} seed {seed}: test {result['test_accuracy']:.3f}")
    report(study)


def report(study):
    table = study.by_cell("test_accuracy")
    if not table:
        print("no runs recorded yet")
        return
    runs = {(r["cell"], r["seed"]): r for r in study.runs()}
    summary, lines = (
        {},
        [
            "| cell | roles | rank | lambda | eta_Q | seeds "
            "| test acc % (mean [95% t]) | final train loss |",
            "|---|---|---:|---:|---:|---:|---|---:|",
        ],
    )
    for name in CELLS:
        if name not in table:
            continue
        values = {s: 100 * v for s, v in table[name].items()}
        first = runs[(name, min(values))]
        interval = harness.t_interval(list(values.values()))
        loss = np.mean([runs[(name, s)]["train_loss"][-1] for s in values])
        summary[name] = {"test_accuracy_pct": interval, "seeds": sorted(values)}
        lines.append(
            f"| {name} | {'+'.join(r[0].upper() for r in first['roles'])} | "
            f"{first['rank']} | {first['lambda']} | {first['eta_q']:.2g} | "
            f"{len(values)} | "
            f"{harness.format_interval(interval)} | {loss:.3f} |"
        )
    comparisons = [
        ("qkv_r8_l1", "qv_r8_l1", "QKV - QV, equal rank 8"),
        ("qkv_r8_l1", "qv_r12_l1", "QKV r8 - QV r12, equal parameters"),
        ("qv_r8_l2", "qv_r8_l1", "lambda 2 - lambda 1"),
        ("qv_r8_l4", "qv_r8_l1", "lambda 4 - lambda 1"),
        ("qv_r8_l8", "qv_r8_l1", "lambda 8 - lambda 1"),
        ("qv_r8_l2", "qv_r8_l1_mean2", "lambda 2 - its matched mean rate"),
        ("qv_r8_l4", "qv_r8_l1_mean4", "lambda 4 - its matched mean rate"),
        ("qv_r8_l8", "qv_r8_l1_mean8", "lambda 8 - its matched mean rate"),
    ]
    lines += ["", "Paired differences (test accuracy points, shared seeds):"]
    for a, b, label in comparisons:
        if a in table and b in table and set(table[a]) & set(table[b]):
            diff = harness.paired_difference(
                {s: 100 * v for s, v in table[a].items()},
                {s: 100 * v for s, v in table[b].items()},
            )
            summary[f"{a}-{b}"] = diff
            lines.append(f"- {label}: {harness.format_interval(diff)} (n={diff['n']})")
    text = "\n".join(lines) + "\n"
    print(text)
    study.write_summary(summary, text)
    lam_points = [
        (lam, summary[f"qv_r8_l{lam}"]["test_accuracy_pct"])
        for lam in (1, 2, 4, 8)
        if f"qv_r8_l{lam}" in summary
    ]
    control = [
        (lam, summary[f"qv_r8_l1_mean{lam}"]["test_accuracy_pct"])
        for lam in (2, 4, 8)
        if f"qv_r8_l1_mean{lam}" in summary
    ]
    groups = {
        k: v
        for k, v in {
            "QV, eta_V = lambda eta_Q": lam_points,
            "QV, lambda 1 at the mean rate": control,
        }.items()
        if v
    }
    if groups:
        harness.errorbar_figure(
            study.figure_path("lambda"),
            groups,
            "lambda",
            "test accuracy % (mean, 95% t)",
            "few-shot BBC News, MiniLM, LoRA r=8",
        )


if __name__ == "__main__":
    main()
