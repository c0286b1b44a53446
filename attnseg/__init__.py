"""attnseg: segmentation on Stable Diffusion attention maps, served over HTTP.

This package holds what the API (`service`) and the GPU workers (`workers`) share: settings, the
queue contract, the image store and the COCO RLE codec. It never imports torch.
"""
