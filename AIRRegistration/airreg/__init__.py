"""AIR-net core: adversarial MR-TRUS rigid registration (Yan et al., MLMI 2018).

Slicer-free: depends on torch, numpy and SimpleITK only. Conventions used everywhere:

* physical space is LPS in millimetres (ITK / SimpleITK), angles in degrees;
* MR is the fixed image, TRUS the moving image;
* a registration transform maps a point in MR space to the same anatomical point in TRUS space
  (ITK's *resampling* convention), so ``SimpleITK.Resample(trus, mr, T)`` puts TRUS on the MR grid aligned.
"""

__version__ = "0.1.0"
