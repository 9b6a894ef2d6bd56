rule consolidate:
    input:
        trained=f"{paths.TRAIN}/model",
        probe=f"{paths.TRAIN}/probe.safetensors",
        tokenizer=f"{paths.PACK}/tokenizer",
        base=base_model(),
        code=code("consolidate"),
    output:
        model=directory(f"{paths.CONSOLIDATE}/model"),
        summary=f"{paths.CONSOLIDATE}/summary.json",
        verification=f"{paths.CONSOLIDATE}/verification.json",
        config=f"{paths.CONSOLIDATE}/config.yaml",  # what made them (ftflow.freshness): DVC versions it with them
    log:
        f"{paths.LOGS}/consolidate.log",
    conda:
        "../envs/train.yaml"
    threads: ALL_CORES
    resources:
        **slurm_resources("consolidate"),
    params:
        cfg=params_of("consolidate"),
    script:
        "../scripts/consolidate.py"
