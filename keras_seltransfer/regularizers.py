"""L2-SP: fine-tuning with a penalty toward the pretrained weights."""

import keras
from keras import ops

from keras_seltransfer.models.classifier import iter_layers


class L2SP(keras.regularizers.Regularizer):
    """Penalty `alpha / 2 * ||w - w0||^2` toward a starting point `w0`.

    Li, Grandvalet and Davoine's L2-SP keeps fine-tuned weights close to the
    pretrained solution instead of close to zero. The reference `w0` is held
    in a non-trainable variable created under the current distribution
    strategy scope, so the penalty also works under `MirroredStrategy`.

    This is a training-time term: it is attached to variables by
    `apply_l2sp`, not to layer configs, so saved models do not carry it.

    Args:
        alpha: penalty strength.
        reference: the starting-point values (array-like, the variable's shape).

    Example:

    ```python
    penalty = L2SP(alpha=0.1, reference=np.zeros((3, 2)))
    penalty(keras.ops.ones((3, 2)))  # 0.3 = 0.1 / 2 * 6
    ```

    Reference:
        Li, Grandvalet, Davoine. Explicit Inductive Bias for Transfer
        Learning with Convolutional Networks. ICML 2018.
    """

    def __init__(self, alpha, reference):
        if float(alpha) < 0:
            raise ValueError(f"`alpha` must be >= 0. Received: alpha={alpha}")
        self.alpha = float(alpha)
        self.reference = keras.Variable(
            reference, trainable=False, name="l2sp_reference"
        )

    def __call__(self, x):
        delta = x - ops.cast(self.reference, x.dtype)
        return 0.5 * self.alpha * ops.sum(ops.square(delta))

    def get_config(self):
        # The reference values are not part of a config: the penalty belongs to
        # one training run and is not serialised with the model.
        return {"alpha": self.alpha}


def apply_l2sp(model, alpha=0.1, beta=0.01, head_layers=("target_head",)):
    """Attaches L2-SP to every trainable weight of `model`.

    Weights of layers named in `head_layers` (new, randomly initialised
    layers) get a plain `beta / 2 * ||w||^2`; every other trainable weight
    gets `alpha / 2 * ||w - w0||^2` with `w0` its current (pretrained) value.
    Call it after the pretrained weights are in place and inside the
    strategy scope the model was built in, before `compile`. The penalties
    reach the loss through `model.losses`, which `model.fit` adds.

    Args:
        model: the classifier to regularise (changed in place).
        alpha: strength of the pull toward the pretrained weights. The
            authors' default for classification is 0.1.
        beta: weight decay of the new head. The authors' default is 0.01.
        head_layers: names of the layers that are new rather than pretrained.

    Returns:
        `(num_l2sp, num_head)`: how many variables got each penalty.

    Example:

    ```python
    model = build_classifier(small_cnn((32, 32, 1), widths=(8, 16)), num_classes=5)
    # ... load the pretrained backbone weights into `model` here ...
    apply_l2sp(model, alpha=0.1, beta=0.01)  # (6, 2): (num_l2sp, num_head) variables
    model.compile("adam", "sparse_categorical_crossentropy")
    ```
    """
    if float(beta) < 0:
        raise ValueError(f"`beta` must be >= 0. Received: beta={beta}")
    names = {layer.name for layer in iter_layers(model)}
    missing = [h for h in head_layers if h not in names]
    if missing:
        raise ValueError(
            f"`head_layers` names layers that are not in the model: {missing}. "
            f"Received: head_layers={tuple(head_layers)}"
        )
    head_vars = set()
    for layer in iter_layers(model):
        if layer.name in head_layers:
            head_vars.update(id(v) for v in layer.trainable_weights)
    num_sp = num_head = 0
    for variable in model.trainable_weights:
        if id(variable) in head_vars:
            variable.regularizer = keras.regularizers.L2(0.5 * float(beta))
            num_head += 1
        else:
            variable.regularizer = L2SP(alpha, ops.convert_to_numpy(variable))
            num_sp += 1
    return num_sp, num_head


def l2sp_penalty(model):
    """Sum of the weight penalties attached to `model`'s variables.

    Example:

    ```python
    apply_l2sp(model)
    l2sp_penalty(model)  # only the head's weight decay until the weights move
    ```
    """
    terms = [
        v.regularizer(v) for v in model.trainable_weights if v.regularizer is not None
    ]
    if not terms:
        return ops.convert_to_tensor(0.0)
    return ops.sum(ops.stack(terms))


__all__ = [
    "L2SP",
    "apply_l2sp",
    "l2sp_penalty",
]
