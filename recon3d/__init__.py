"""recon3d: a photo or a sentence -> a 3D model you can spin and download (``MultiViewSample3D`` (Zero123++ ->
InstantMesh) and ``Sample3D`` (DMV3D) for several samples of a photo, ``TextTo3D`` for sentences). Every pipeline's ``run``/``generate`` yields typed events
(:mod:`recon3d.pipelines.events`); ``run_to_end`` drains one and returns its result.

Python API::

    from recon3d import ImageTo3D
    gpu = torch.device("cuda")  # the caller picks; the default is CPU float32
    pipe = ImageTo3D.from_pretrained("zxhezexin/openlrm-mix-base-1.1", device=gpu, dtype=torch.float16)
    result = pipe("chair.png", mesh_resolution=256)
    result.save_glb("chair.glb")
"""

from .models.instant_nerf import InstantNeRF
from .pipelines.events import run_to_end
from .pipelines.image_to_3d import ImageTo3D, ImageTo3DOptions, ImageTo3DResult
from .pipelines.multiview_sample import MultiViewOptions, MultiViewSample3D
from .pipelines.sample_3d import Sample3D, SampleOptions
from .pipelines.text_to_3d import QuickLookOptions, TextTo3D, TextTo3DOptions, TextTo3DResult

__all__ = ["ImageTo3D", "ImageTo3DOptions", "ImageTo3DResult", "InstantNeRF", "MultiViewOptions",
           "MultiViewSample3D", "QuickLookOptions", "Sample3D", "SampleOptions",
           "TextTo3D", "TextTo3DOptions", "TextTo3DResult", "run_to_end"]
__version__ = "0.1.0"
