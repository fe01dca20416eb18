"""The code behind tools/reproduce.py that is specific to the documented
reproduction; the comparison machinery itself (run cache, search, runner,
tables, statistics, plots) is `keras_seltransfer.comparison`.

- `grid`: the papers' grid (rows, combinations, ablations) and the
  `FinetuneConfig` of one cell.
- `runner`: the papers' protocol: learning-rate tuning, the combination
  choice, the shift measurements.
- `tables`, `plots`: its tables, RESULTS.md and results.json, and plots.
- `protocol`, `protocol_runner`, `protocol_tables`: the deconfounded
  protocol's rows on the default backbone, SJFT controls, paper claims and
  summary file.
"""
