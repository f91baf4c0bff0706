"""REST for the GPU doctor (``sage_nb/api/doctor/gpu``)."""
