rule pack:
    input:
        train=f"{paths.NORMALIZE}/train.parquet",
        validation=f"{paths.NORMALIZE}/validation.parquet",
        base=[] if SCRATCH else [base_model()],
        code=code("pack") + templates(),
    output:
        packed=packed_dirs(),
        tokenizer=directory(f"{paths.PACK}/tokenizer"),
        stats=f"{paths.PACK}/stats.json",
        config=f"{paths.PACK}/config.yaml",  # what made them (ftflow.freshness): DVC versions it with them
    log:
        f"{paths.LOGS}/pack.log",
    conda:
        "../envs/data.yaml"
    threads: ALL_CORES
    resources:
        **slurm_resources("pack"),
    params:
        cfg=params_of("pack"),
    script:
        "../scripts/pack.py"
