"""Thin KFP components, one per stage: each body only calls :func:`nasforge.stages.runner.execute`.

They are lightweight Python components whose ``base_image`` is the project image (see
:mod:`nasforge.images`): on a cluster they run in that image, under ``kfp.local`` in the current
environment. Imports live inside the function bodies because KFP ships only the body.
"""
