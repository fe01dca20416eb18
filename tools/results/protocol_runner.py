"""Runs the deconfounded protocol of tools/reproduce.py: the library's
comparison (`keras_seltransfer.comparison`), plus the SJFT controls.

Every run is cached in its own directory (`search.run_dir`) and reused
when its stored configuration matches, so an interrupted invocation
continues where it stopped; `table_only` trains nothing.
"""

import dataclasses

from keras_seltransfer.comparison import search
from keras_seltransfer.comparison.runner import ComparisonRunner
from keras_seltransfer.comparison.runner import ComparisonSettings
from keras_seltransfer.comparison.runner import best_baseline  # noqa: F401
from keras_seltransfer.comparison.runner import record
from tools.results import protocol


@dataclasses.dataclass
class ProtocolSettings(ComparisonSettings):
    """The settings of one deconfounded invocation: a comparison's, plus
    the controls and the summary file.

    Attributes:
        controls: names of the SJFT controls to run (`protocol.CONTROLS`).
        control_fractions: the fractions the controls run at.
        summary: a Markdown file whose `<!-- deconfounded-table:<target> -->`
            block gets the tables when it has that pair of markers, or None.
    """

    controls: list = dataclasses.field(default_factory=list)
    control_fractions: list = dataclasses.field(default_factory=list)
    summary: str = None
    pretrain_backbone: bool = True


class ProtocolRunner(ComparisonRunner):
    """Trains or reads every run of one deconfounded invocation.

    Args:
        settings: a `ProtocolSettings`.
    """

    def __init__(self, settings):
        super().__init__(settings, program="reproduce")
        self.planned += len(settings.controls) * sum(
            len(search.seeds_for(f, settings.seeds)) for f in settings.control_fractions
        )

    def collect_controls(self, choices):
        """Runs the SJFT controls with their parent's chosen configuration."""
        results = []
        for name in self.settings.controls:
            _, _, parent, change = protocol.CONTROLS_BY_NAME[name]
            chosen = choices.get(parent, {}).get("overrides")
            if chosen is None:
                continue
            trial = {**chosen, **change}
            base = protocol.ROWS_BY_NAME[parent].overrides
            for fraction in self.settings.control_fractions:
                for seed in search.seeds_for(fraction, self.settings.seeds):
                    report, directory = self.run(name, trial, base, fraction, seed)
                    if report is not None:
                        results.append(record(name, trial, fraction, seed, report, directory))
        return results


__all__ = ["ProtocolRunner", "ProtocolSettings"]
