"""The code behind tools/reproduce.py, one module per role.

- `grid`: the experiment grid (rows, combinations, ablations), the methods
  it may name, and the `FinetuneConfig` of one cell.
- `cache`: the run cache: a finished run's report, and the check that it was
  made with the settings asked for.
- `runner`: training what the cache lacks, learning-rate tuning, the
  combination choice, the shift measurements.
- `tables`: the Markdown tables, RESULTS.md and results.json.
- `plots`: the PNG plots.
"""
