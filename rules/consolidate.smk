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
    threads: ALL_CORES
    log:
        f"{paths.LOGS}/consolidate.log",
    params:
        cfg=params_of("consolidate"),
    resources:
        **slurm_resources("consolidate"),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/consolidate.py"
