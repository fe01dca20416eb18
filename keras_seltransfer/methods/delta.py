"""`--method=delta`: DELTA, feature-map regularisation with channel attention
(Li, Xiong, Wang, Rao, Liu, Chen and Huan, ICLR 2019).

Fine-tuning whose loss adds `delta_alpha` times the distance of the
classifier's feature maps at the stage outputs to those of the frozen
pretrained backbone on the same batch, each channel weighted by DELTA's
supervised attention, and `delta_beta` times the L2 norm of the new head
(`keras_seltransfer.models.DeltaModel`).

The attention follows the authors' code [code: lixingjian/DELTA
`channel_eval.py`, `train.py`; Transfer-Learning-Library
`examples/task_adaptation/image_classification/delta.py`]: a head is
trained on the frozen pretrained backbone with the target training images,
then each channel of each regularised layer is removed in turn and the rise
of the target cross-entropy is measured on (at most) `delta_attention_images`
training images; per layer, the rises are standardised and passed through a
softmax with temperature 5 (`keras_seltransfer.losses.channel_attention`).
Choices where this code departs from the authors':

- the head is an L-BFGS logistic regression (scikit-learn, C = 1) on the
  pooled features instead of 10 epochs of SGD: the same frozen-backbone
  linear classifier, fitted to convergence without a schedule to choose;
- a channel is removed by zeroing it in the regularised layer's output
  rather than zeroing its convolution filter (the same for a convolution
  without bias; the authors regularise the pre-BatchNorm conv output, here
  the stage output is regularised) and the ablations are batched
  (`keras_seltransfer.models.channel_loss_increases`);
- the feature term is averaged over the batch instead of summed, so the
  default `delta_alpha` = 0.64 is the authors' 0.01 at their batch of 64.

The fine-tuned classifier starts from a new random head, as in the paper;
`model.keras` and the SavedModel hold the classifier alone.
"""

import dataclasses

import numpy as np
from sklearn.linear_model import LogisticRegression

from keras_seltransfer import data as data_lib
from keras_seltransfer.losses import channel_attention
from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.methods.registry import register
from keras_seltransfer.models.channel_attention import channel_loss_increases
from keras_seltransfer.models.classifier import build_classifier
from keras_seltransfer.models.knowledge_transfer import stage_outputs
from keras_seltransfer.models.regularized_training import DeltaModel
from keras_seltransfer.utils.naming import name_list
from keras_seltransfer.utils.options import option

# The authors' softmax temperature of the standardised loss increases.
ATTENTION_TEMPERATURE = 5.0


@dataclasses.dataclass
class DeltaOptions:
    """Options of `--method=delta`."""

    delta_alpha: float = option(
        0.64,
        "delta: weight of the feature-map distance to the pretrained network (averaged over "
        "the batch; the authors' 0.01 summed over a batch of 64).",
        lower=0.0,
    )
    delta_beta: float = option(
        0.01, "delta: weight of the L2 penalty 0.5 * ||w||^2 on the new head.", lower=0.0
    )
    delta_attention: bool = option(
        True,
        "delta: weight channels by the supervised attention (loss increase when a channel is "
        "removed); false: every channel of a layer weighs the same (the paper's variant "
        "without attention).",
    )
    delta_layers: str = option(
        None,
        "delta: comma-separated names of the layers whose outputs are regularised. Unset: "
        "the output of every downsampling stage.",
    )
    delta_attention_images: int = option(
        256,
        "delta: most target training images (a seeded sample) the channel attention is "
        "measured on.",
        lower=1,
    )

    @staticmethod
    def validate(config):
        """Raises ValueError for a `delta_layers` that names no layer."""
        layer_names(config.delta_layers)


def layer_names(spec):
    """The layer names of a `delta_layers` spec (None: every stage output)."""
    return name_list(spec, "delta_layers")


def probe_classifier(backbone, images, labels, num_classes):
    """`backbone` with a softmax head fitted by logistic regression on its
    features of `images` (the backbone is left unchanged)."""
    classifier = build_classifier(backbone, num_classes)
    features = backbone.predict(images, batch_size=256, verbose=0)
    present = np.unique(labels)
    kernel = np.zeros((features.shape[1], num_classes), "float32")
    bias = np.zeros(num_classes, "float32")
    if len(present) > 1:
        fit = LogisticRegression(C=1.0, max_iter=2000).fit(features, labels)
        if len(present) == 2:
            # A binary fit gives one logit z for the second class; the softmax
            # of (0, z) is its sigmoid.
            kernel[:, present[1]], bias[present[1]] = fit.coef_[0], fit.intercept_[0]
        else:
            kernel[:, present], bias[present] = fit.coef_.T, fit.intercept_
    else:
        bias[present] = 1.0
    classifier.get_layer("target_head").set_weights([kernel, bias])
    return classifier


class Delta(Method):
    """Fine-tuning regularised toward the pretrained network's feature maps."""

    name = "delta"
    summary = (
        "DELTA (Li et al., ICLR 2019): fine-tuning with the attention-weighted distance of "
        "the feature maps to the pretrained network's and an L2 penalty on the new head"
    )
    options = (DeltaOptions,)
    order = 50

    def setup(self, config, model, context):
        """The report gains `"delta"`: the layers, weights and, with
        attention, each layer's channel weights and loss increases."""
        names = layer_names(config.delta_layers) or stage_outputs(model)
        report = {
            "layers": names,
            "alpha": config.delta_alpha,
            "beta": config.delta_beta,
            "attention": config.delta_attention,
        }
        weights = None
        if config.delta_attention:
            channels = int(model.inputs[0].shape[-1])
            train = context.train
            if len(train) > config.delta_attention_images:
                ids = np.random.default_rng(config.seed).choice(
                    len(train), config.delta_attention_images, replace=False
                )
                train = train.subset(np.sort(ids))
            images = data_lib.prepared_images(train, config.image_size, channels)
            probe = probe_classifier(
                context.load_backbone(),
                images,
                np.asarray(train.labels),
                context.num_classes,
            )
            increases = channel_loss_increases(
                probe, images, train.labels, names, verbose=min(int(config.verbose), 1)
            )
            weights = channel_attention(increases, ATTENTION_TEMPERATURE)
            report["attention_images"] = len(train)
            report["loss_increases"] = [np.round(d, 6).tolist() for d in increases]
            report["channel_weights"] = [np.round(w, 6).tolist() for w in weights]
        with context.strategy.scope():
            trainer = DeltaModel(
                model,
                context.load_backbone(),
                names,
                channel_weights=weights,
                alpha=config.delta_alpha,
                beta=config.delta_beta,
                name="delta",
            )
        return MethodSetup(
            model=trainer, classifier=model, report=lambda fit_info: {"delta": report}
        )


register(Delta())
