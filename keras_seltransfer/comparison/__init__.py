"""Comparisons of fine-tuning methods on the user's own data.

Rows (methods with their settings) x target fractions x seeds, every row
searched on validation with the same budget (`search`), every run kept in a
resumable cache (`cache`, `runner`), Markdown tables with paired per-seed
differences to the best baseline and 95% Student-t intervals (`tables`,
`stats`), and a plot (`plots`). `compare` runs all of it; `apps.compare`
is its command line.

Example:

```python
from keras_seltransfer import comparison

settings = comparison.ComparisonSettings(
    rows=comparison.select_rows(["linear_probe", "baseline", "adafilter"]),
    fractions=[0.15, 0.3], seeds=[0, 1, 2], tune_seeds=[0], tune_fraction=0.15,
    epochs=30, output_dir="runs/compare/cells", runs_dir="runs/compare/cells/runs",
    backbone="resnet50", backbone_weights="imagenet", target="folder:/data/cells",
    source=None, image_size=224, batch_size=32)
print(comparison.compare(settings)["text"])
```
"""

from keras_seltransfer.comparison import cache
from keras_seltransfer.comparison import plots
from keras_seltransfer.comparison import runner
from keras_seltransfer.comparison import search
from keras_seltransfer.comparison import stats
from keras_seltransfer.comparison import tables
from keras_seltransfer.comparison.runner import ComparisonRunner
from keras_seltransfer.comparison.runner import ComparisonSettings
from keras_seltransfer.comparison.runner import best_baseline
from keras_seltransfer.comparison.runner import planned_runs
from keras_seltransfer.comparison.search import ROWS
from keras_seltransfer.comparison.search import ProtocolRow
from keras_seltransfer.comparison.search import select_rows
from keras_seltransfer.comparison.stats import paired_interval
from keras_seltransfer.comparison.workflow import compare

__all__ = [
    "ComparisonRunner",
    "ComparisonSettings",
    "ProtocolRow",
    "ROWS",
    "best_baseline",
    "cache",
    "compare",
    "paired_interval",
    "planned_runs",
    "plots",
    "runner",
    "search",
    "select_rows",
    "stats",
    "tables",
]
