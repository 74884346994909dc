"""msif-lab: multi-stage influence functions (Chen et al., NeurIPS 2020), a tested library and a notebook course.

The influence primitives live in :mod:`msif_lab.stages`, :mod:`msif_lab.curvature`, :mod:`msif_lab.solvers`,
:mod:`msif_lab.scoring` and :mod:`msif_lab.influence`; notebook 00 gives the tour.
"""
import warnings

# Two notices torch emits from its own internals, once per process, that no user of msif_lab can act on:
# forward-mode AD (msif_lab.scoring's JVP path) loads decompositions with the deprecated torch.jit.script, and
# vmap loops over unfold's backward (MiniELMo's "conv" encoder; still ~3× faster than conv1d, see models.py).
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"There is a performance drop because we have not yet implemented the "
                                          r"batching rule for aten::unfold_backward", category=UserWarning)

from .paths import cache_dir, data_dir, output_root, profile_dir
from .data import CIFAR10_CLASSES, load_cifar10, load_mnist, prepare_data, raw_cifar10, raw_mnist
from .cache import cached
from .metrics import pearson, sign_agreement, spearman
from .results import NotebookRun, set_seed
from .plots import image_grid, scatter_predicted_vs_actual, use_style
