from .paths import cache_dir, data_dir, output_root, profile_dir
from .data import CIFAR10_CLASSES, load_cifar10, load_mnist, prepare_data, raw_cifar10, raw_mnist
from .cache import cached
from .metrics import pearson, sign_agreement, spearman
from .results import NotebookRun, set_seed
from .plots import image_grid, scatter_predicted_vs_actual, use_style
