"""Pure PyTorch layer: multitask network, losses, training, metrics, attribution, DP-SGD, baselines.

Knows no nvflare and no anndata.
"""
