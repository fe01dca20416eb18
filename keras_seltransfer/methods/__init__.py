"""Fine-tuning methods: one module per method, found by the registry.

Every module of this package (other than `base`) defines a method or a
model transform and registers it on import (see `base.Method`); importing
the package imports them all, so `names()` lists every method and
`keras_seltransfer.training.FinetuneConfig`, `apps.finetune`'s flags and its
`--help` are generated from what the modules declare. Adding a method is
one new module here (plus its tests and README section).

Example:

```python
from keras_seltransfer import methods

methods.names()          # ('baseline', 'l2sp', 'sjft', ...)
methods.get("sjft").joint  # True: trains on source images too
```
"""

import importlib
import pkgutil

from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodContext
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.methods.base import Transform
from keras_seltransfer.methods.registry import AUTO
from keras_seltransfer.methods.registry import apply_transforms
from keras_seltransfer.methods.registry import check_compose
from keras_seltransfer.utils.options import check_option
from keras_seltransfer.methods.registry import compose_names
from keras_seltransfer.methods.registry import get
from keras_seltransfer.methods.registry import get_transform
from keras_seltransfer.methods.registry import names
from keras_seltransfer.utils.options import option
from keras_seltransfer.methods.registry import options_classes
from keras_seltransfer.methods.registry import register
from keras_seltransfer.methods.registry import register_transform
from keras_seltransfer.methods.registry import transform_lr_multipliers
from keras_seltransfer.methods.registry import transform_names

# Import every method module so that it registers itself.
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in ("base", "registry") and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
del _module


def joint_methods():
    """Names of the methods that train on source images too (the SJFT family).

    These are the methods whose `Method.joint` is True, in listing order;
    they need `FinetuneConfig.source`'s neighbour index.

    Example:

    >>> from keras_seltransfer import methods
    >>> methods.joint_methods()
    ('sjft', 'sjft_nogrowth', 'sjft_all', 'sjft_random')
    """
    return tuple(name for name in names() if get(name).joint)


__all__ = [
    "AUTO",
    "Method",
    "MethodContext",
    "MethodSetup",
    "Transform",
    "apply_transforms",
    "check_compose",
    "check_option",
    "compose_names",
    "get",
    "get_transform",
    "joint_methods",
    "names",
    "option",
    "options_classes",
    "register",
    "register_transform",
    "transform_lr_multipliers",
    "transform_names",
]
