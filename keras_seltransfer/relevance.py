"""Filter relevance and selection under their first import path.

`from keras_seltransfer import relevance` keeps working: this module gathers
the public names of `keras_seltransfer.models.relevance` (the statistics),
`keras_seltransfer.models.response_points` (where a filter's response is
read) and `keras_seltransfer.models.filter_selection` (which filters to
keep). It sits at the models layer of the package, like them.

Example:

>>> from keras_seltransfer import relevance
>>> relevance.select_top_fraction([0.1, 0.9, 0.5], 0.5).tolist()
[False, True, True]
"""

from keras_seltransfer.models.filter_selection import kept_count
from keras_seltransfer.models.filter_selection import prune_lowest
from keras_seltransfer.models.filter_selection import select_above_threshold
from keras_seltransfer.models.filter_selection import select_filters
from keras_seltransfer.models.filter_selection import select_top_fraction
from keras_seltransfer.models.relevance import check_statistic
from keras_seltransfer.models.relevance import filter_relevance
from keras_seltransfer.models.relevance import filter_statistics
from keras_seltransfer.models.relevance import FilterResponses
from keras_seltransfer.models.relevance import RELEVANCE_SIGN
from keras_seltransfer.models.relevance import STATISTICS
from keras_seltransfer.models.response_points import conv_layer_names
from keras_seltransfer.models.response_points import response_chains
from keras_seltransfer.models.response_points import response_points
from keras_seltransfer.models.surgery import CONV_TYPES

__all__ = [
    "CONV_TYPES",
    "FilterResponses",
    "RELEVANCE_SIGN",
    "STATISTICS",
    "check_statistic",
    "conv_layer_names",
    "filter_relevance",
    "filter_statistics",
    "kept_count",
    "prune_lowest",
    "response_chains",
    "response_points",
    "select_above_threshold",
    "select_filters",
    "select_top_fraction",
]
