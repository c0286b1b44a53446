"""Label maps leave the methods in the narrowest integer type that holds their labels."""

from __future__ import annotations

import numpy as np
import torch

from attnseg.rle import narrow_dtype


def to_numpy(labels: torch.Tensor) -> np.ndarray:
    """(H, W) int labels on any device -> numpy in the narrowest integer type that holds them.

    A 12 MP map of fewer than 256 labels is 12 MB, not 96 (maps wait in memory for their RLE);
    narrowed on the device, so a GPU sends the narrow map. Labels keep their values.
    """
    if labels.numel() == 0:
        return labels.cpu().numpy()
    dtype = narrow_dtype(int(labels.min()), int(labels.max()))
    return labels.to(torch.from_numpy(np.empty(0, dtype)).dtype).cpu().numpy()
