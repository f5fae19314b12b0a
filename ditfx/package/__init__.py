"""Export packages: what :func:`ditfx.export` writes and :func:`ditfx.load` runs, without the model's code, Dynamo
or a compiler.

A package is a directory::

    manifest.json        format, ditfx and torch versions, device and CPU ISA or GPU architecture, model class,
                         each file's size and SHA-256
    call.json            the model's call signature: which argument (or weight) feeds each graph input, the
                         non-tensor arguments it was exported with, the output structure, the model's config
    plan/plan.json       the Plan without graphs (regions, IO spec, variants offered, policy configs and files)
    weights.safetensors  the weights the graph reads, once (blocks of one structure share an artifact)
    artifacts/*.pt2      one AOTInductor model per region signature and variant (dynamic batch, or one per
                         row count the runtime may run where the graph cannot take a dynamic one)
    programs/*.pt2       the exported programs they were compiled from (``ditfx rebuild``: another target)

:mod:`~ditfx.package.build` writes it, :mod:`~ditfx.package.loaded` runs it with the ordinary runtime
(:class:`~ditfx.runtime.executor.Executor` and the policies), :mod:`~ditfx.package.manifest` checks it.
"""
