"""Class counts of the paper's benchmarks: the head sizes behind its Params columns.

Data, cited from the paper (Dong et al., CVPR 2024): appendix Table 1 (FGVC) and appendix Table 2
(VTAB-1k, the split of VPT); CIFAR-100 is Table 12's CNN benchmark. The paper's Params column is the
trainable count (adapters plus the classifier head) averaged over a benchmark's tasks, so these
counts decide the head part of every budget `python -m zoo.params` reproduces.
"""

from __future__ import annotations

# Appendix Table 1: Dataset statistics for FGVC.
FGVC: dict[str, int] = {
    "cub_200_2011": 200,
    "nabirds": 555,
    "oxford_flowers": 102,
    "stanford_dogs": 120,
    "stanford_cars": 196,
}

# Appendix Table 2: Dataset statistics for VTAB-1k (Natural 7, Specialized 4, Structured 8).
VTAB1K: dict[str, int] = {
    "cifar100": 100,
    "caltech101": 102,
    "dtd": 47,
    "flowers102": 102,
    "pets": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "retinopathy": 5,
    "clevr_count": 8,
    "clevr_distance": 6,
    "dmlab": 6,
    "kitti_distance": 4,
    "dsprites_location": 16,
    "dsprites_orientation": 16,
    "smallnorb_azimuth": 18,
    "smallnorb_elevation": 9,
}

# Table 12 (appendix G): RLRR on CNNs, fine-tuned on CIFAR-100.
CIFAR100: dict[str, int] = {"cifar100": 100}

BENCHMARKS: dict[str, dict[str, int]] = {"vtab1k": VTAB1K, "fgvc": FGVC, "cifar100": CIFAR100}
TITLES: dict[str, str] = {"vtab1k": "VTAB-1k (19 heads avg)", "fgvc": "FGVC (5 heads avg)", "cifar100": "CIFAR-100"}
