"""Summarise many runs into one table: method × metric, mean ± std over seeds.

    python scripts/summarize.py <sweep or outputs dir> [--out DIR] [--metrics clean/acc,pgd/acc] [--paired erm]

Reads every results.json below the directory (train runs and robust-eval runs alike), groups runs
that differ only in their seed, and writes summary.md, summary.csv, summary.tex (a booktabs table in
percent) and tradeoff.png (clean against robust accuracy: AutoAttack where measured, else PGD) into
--out (default: the directory itself). The markdown table is also printed. Under every table a
"Settings" list gives each column's evaluator settings, the checkpoint evaluated and the epochs trained;
a run directory without results.json (still running, failed or interrupted) gets one line naming it.

`--paired METHOD` adds the comparison a single-seed table cannot make: each other method minus METHOD
on the seeds both ran, as the mean difference with its 95% confidence interval, in paired.md and
paired.csv.

The code lives in runner/summary/: how runs group (groups.py), which keys cannot change a number
(runs.py) and how groups pair with the baseline (paired.py) are explained there.
"""

import sys

from runner.summary.cli import main

if __name__ == "__main__":
    sys.exit(main())
