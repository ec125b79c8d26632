"""recon3d: a photo or a sentence -> a 3D model you can spin and download (``TextTo3D`` for sentences).

Python API::

    from recon3d import ImageTo3D
    gpu = torch.device("cuda")  # the caller picks; the default is CPU float32
    pipe = ImageTo3D.from_pretrained("zxhezexin/openlrm-mix-base-1.1", device=gpu, dtype=torch.float16)
    result = pipe("chair.png", mesh_resolution=256)
    result.save_glb("chair.glb")
"""

from .pipelines.image_to_3d import ImageTo3D, ImageTo3DOptions, ImageTo3DResult
from .pipelines.text_to_3d import TextTo3D, TextTo3DResult

__all__ = ["ImageTo3D", "ImageTo3DOptions", "ImageTo3DResult", "TextTo3D", "TextTo3DResult"]
__version__ = "0.1.0"
