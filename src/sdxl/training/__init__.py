"""Training: data sets (image folders with captions, aspect-ratio buckets, the procedural shapes set) and the trainer.

Size / crop micro-conditioning and multi-aspect bucketing follow the SDXL paper (Podell et al. 2023,
sections 2.2-2.3 and appendix I).
"""
