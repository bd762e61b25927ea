"""scripts/summarize.py as a package, one module per concern: runs (finding and loading results.json),
groups (settings groups and their mean ± std), settings (the "Settings" list under the tables), tables
(summary.md/.csv/.tex), paired (--paired), plot (tradeoff.png) and cli (the command)."""
