"""scenecluster: cluster unlabelled remote-sensing scene archives.

DINOv2 features (optionally fine-tuned on a labelled source), a UMAP projection and a variational
Dirichlet-process Gaussian mixture, run as Ray jobs (Ray & Skurikhin 2024).
"""

import os

__version__ = "0.1.0"

# Ray's progress bars (ray.experimental.tqdm_ray) replace builtins.print with a Python function in any process
# that shows them, unless this is "0". Numba cannot type that function, so compiling a numba function that
# prints (pynndescent's nearest-neighbour descent, which umap-learn runs on 4,096 scenes or more) then fails
# with "Untyped global name 'print'" wherever its compiled cache is missing: a fresh node, a new version.
# Set here, on import, before this process starts Ray or shows a bar; Ray's local workers inherit it.
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
