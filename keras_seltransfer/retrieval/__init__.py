"""Source-image retrieval by low-level filter-bank statistics.

The first half of selective joint fine-tuning (Ge & Yu, CVPR 2017): describe
every image by per-channel histograms of filter-bank responses (a Gabor bank
or a backbone's first conv layers), with bin edges fitted on the target
training images, and find for every target image the source images at the
smallest weighted symmetric KL divergence.

- `filter_banks`: `GaborBank`, `ConvBank`, `gabor_kernels`, `bank_from_config`.
- `fit_bin_edges`, `describe`, `describe_batch`, `channel_weights`: the
  descriptors, from `keras_seltransfer.utils.histograms`.
- `similarity`: `nearest_sources` (blocked GEMMs, streaming top-k),
  `pairwise_distances`, `merge_topk`; `symmetric_kl` from
  `keras_seltransfer.utils.divergence`.
- `rescore`: `PairRescorer`, the exact re-scoring both search modes finish
  with (NumPy or an XLA kernel over threads, bit-identical to `symmetric_kl`).
- `index`: `SourceIndex` (build, shard, merge, atomic save/load, query).
- `workflow`: `IndexConfig`, `build_neighbours` (what `apps.build_index` runs).
- `data_service`: describing the source on a tf.data service's workers
  (`SourceIndex.build_on_service`, `apps.build_index --data_service`).
"""

from keras_seltransfer.retrieval.conv_bank import ConvBank
from keras_seltransfer.retrieval.filter_banks import bank_from_config
from keras_seltransfer.retrieval.gabor_bank import gabor_kernels
from keras_seltransfer.retrieval.gabor_bank import GaborBank
from keras_seltransfer.retrieval.index import SourceIndex
from keras_seltransfer.retrieval.similarity import nearest_sources
from keras_seltransfer.retrieval.similarity import pairwise_distances
from keras_seltransfer.retrieval.topk import merge_topk
from keras_seltransfer.retrieval.visualize import neighbour_grid
from keras_seltransfer.retrieval.workflow import build_neighbours
from keras_seltransfer.retrieval.workflow import IndexConfig
from keras_seltransfer.utils.divergence import symmetric_kl
from keras_seltransfer.utils.histograms import channel_weights
from keras_seltransfer.utils.histograms import describe
from keras_seltransfer.utils.histograms import describe_batch
from keras_seltransfer.utils.histograms import fit_bin_edges

__all__ = [
    "ConvBank",
    "GaborBank",
    "IndexConfig",
    "SourceIndex",
    "bank_from_config",
    "build_neighbours",
    "channel_weights",
    "describe",
    "describe_batch",
    "fit_bin_edges",
    "gabor_kernels",
    "merge_topk",
    "nearest_sources",
    "neighbour_grid",
    "pairwise_distances",
    "symmetric_kl",
]
