"""Small real data sets and backbones the tests train on."""

import numpy as np

from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import small_cnn


def easy_images(num_per_class=24, size=16, seed=0, num_classes=2):
    """Images whose class is their brightness band: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(num_classes):
        level = 40 + 180 * c / max(1, num_classes - 1)
        noise = rng.normal(0, 20, size=(num_per_class, size, size, 1))
        images.append(np.clip(level + noise, 0, 255).astype("uint8"))
        labels.append(np.full(num_per_class, c))
    return np.concatenate(images), np.concatenate(labels).astype("int64")


def write_npz(path, num_per_class=24, size=16, seed=0, num_classes=2):
    images, labels = easy_images(num_per_class, size, seed, num_classes)
    names = np.array([f"class{c}" for c in range(num_classes)])
    np.savez(path, images=images, labels=labels, class_names=names)
    return str(path)


# The small, quiet budget the end-to-end fine-tuning tests train with.
SMALL_RUN = dict(
    image_size=16,
    epochs=3,
    patience=3,
    batch_size=16,
    learning_rate=1e-2,
    verbose=0,
    tensorboard=False,
)


def small_run_config(**fields):
    """A `FinetuneConfig` of `SMALL_RUN` with `fields` on top."""
    from keras_seltransfer import training

    return training.FinetuneConfig(**{**SMALL_RUN, **fields})


def saved_backbone(path, size=16, widths=(4, 8), num_classes=3, pretrain_epochs=3):
    """A small classifier, briefly pretrained on a related source task and
    saved as .keras, as the pretrain app writes it (so its BatchNorm
    statistics and features are those of a trained network)."""
    import keras

    model = build_classifier(
        small_cnn((size, size, 1), widths=widths), num_classes, head_name="source_head"
    )
    if pretrain_epochs:
        images, labels = easy_images(32, size, seed=123, num_classes=num_classes)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        model.fit(images.astype("float32"), labels, epochs=pretrain_epochs, batch_size=16, verbose=0)
    model.save(str(path))
    return str(path)
