"""Loading the resident models (SD from a hub id, a directory or tiny-random; CLIP), the calls
into them, and the attention processors that capture their maps."""
