"""scenecluster: cluster unlabelled remote-sensing scene archives.

DINOv2 features (optionally fine-tuned on a labelled source), a UMAP projection and a variational
Dirichlet-process Gaussian mixture, run as Ray jobs (Ray & Skurikhin 2024).
"""

__version__ = "0.1.0"
