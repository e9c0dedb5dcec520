"""Thin KFP components, one per stage: each body is one call of
:func:`nasforge.stages.runner.run_task`, which runs the stage from its declaration
(:mod:`nasforge.stages.declarations`) exactly as the CLI does.

They are lightweight Python components whose ``base_image`` is the project image (see
:mod:`nasforge.images`): on a cluster they run in that image, under ``kfp.local`` in the current
environment. Imports live inside the function bodies because KFP ships only the body. Their
signatures are literal because KFP compiles a component from its signature;
``tests/test_stage_declarations.py`` checks them against the declarations.
"""
