"""instdiff: InstanceDiffusion (Wang et al., CVPR 2024) re-implemented on pinned diffusers, with its evaluation.

The packages follow the data flow, and imports point downward only (``tests/test_architecture.py`` checks it):

    layouts, model            the bottom: layouts; configs, UniFusion tokens, the gated-fuser UNet, skips, text
    weights                   checkpoint loading, key maps, converted folders, the embedded default models
    sampling                  sampler (PLMS/DDIM, CFG, alpha, MIS), pipeline, generate-from-a-layout-file
    datasets                  COCO and the procedural Shapes world (the data)
    evaluation                protocol generation, metrics, scoring, experiments, the evaluation worlds
    extension, training       LLM-planned layouts + placement check; training the Shapes model and evaluators
    playground                the JupyterLab playground (draw a layout, Generate): editor, session, widgets
    report                    the notebooks' steps, runner and blog
    cli, bench                the ``instdiff`` command and the benchmarks

Top-level helpers used across layers: ``fileio`` (atomic writes, sha256), ``offline`` (no-network setup),
``results`` (results files with provenance), ``viz`` (drawing layouts), ``parity`` (golden-tensor checks).
"""
